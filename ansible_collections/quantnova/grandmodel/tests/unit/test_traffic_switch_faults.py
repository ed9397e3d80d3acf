"""traffic_switch under faults, against a real nginx on loopback: every failure and interrupt restores.

Each test attacks one promise of the switch: the live file is replaced only after `nginx -t` accepted
the candidate; any exception, HTTP-level probe error or signal while applying or verifying puts the
previous file back and reloads; a switch killed outright is undone by the next run; two switches
never interleave; numeric inputs are refused before anything is touched; a warm backup colour
takes the requests the live colour cannot answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from ansible.module_utils.basic import AnsibleModule
from conftest import REPO, LoopbackServer, NginxUnderTest, free_port, run_module

from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic import (
    FrontDoorVerifier,
    NginxBackend,
    TrafficSwitchError,
    candidate_main_config,
    parse_active_color,
    parse_backup_color,
    switch_traffic,
)
from ansible_collections.quantnova.grandmodel.plugins.modules import traffic_switch

MODULE = "ansible_collections.quantnova.grandmodel.plugins.modules.traffic_switch"


def module_args(nginx: NginxUnderTest, color: str, **extra: Any) -> dict[str, Any]:
    args = dict(color=color, upstream_file=str(nginx.upstream_file), backends=nginx.backends(),
                nginx_binary=nginx.binary, nginx_config=str(nginx.conf), nginx_prefix=str(nginx.prefix),
                verify_url=nginx.url, verify_timeout=5.0, verify_consecutive=3, verify_interval=0.05)
    args.update(extra)
    return args


def workers(nginx: NginxUnderTest) -> set[int]:
    """PIDs of the nginx master's worker processes: a reload replaces them, no reload keeps them."""
    return nginx.worker_pids()


def leftovers(nginx: NginxUnderTest) -> list[str]:
    """Hidden helper files of an unfinished switch (candidate, journal, temporary files)."""
    return sorted(p.name for p in nginx.upstream_file.parent.iterdir()
                  if p.name.endswith((".candidate", ".pending", ".tmp")))


def start_module(args: dict[str, Any], tmp_path: Path, name: str) -> subprocess.Popen[str]:
    """Run the module as its own process (as Ansible does), arguments from a file, output on stdout."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", MODULE, str(path)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    try:
        result: dict[str, Any] = json.loads(out)
    except ValueError:
        pytest.fail(f"module printed no JSON (rc {proc.returncode}):\n{out}\n{err}")
    return result


def serving_steadily(nginx: NginxUnderTest, color: str, times: int = 5) -> bool:
    """`color` answers `times` fresh connections in a row, once the workers of an earlier configuration are gone."""
    return all(nginx.serving() == color for _attempt in range(times))


def answers(nginx: NginxUnderTest, times: int = 5) -> list[str | None]:
    """The colours `times` fresh connections get; a request that got no answer at all (None: refused, timed out
    on a loaded machine) is asked again, up to 3 times, so only a real answer from a colour counts."""
    got: list[str | None] = []
    for _attempt in range(times):
        answer = None
        for _retry in range(3):
            if (answer := nginx.serving()) is not None:
                break
        got.append(answer)
    return got


class HeldVerifyUrl(LoopbackServer):
    """A verify URL that answers "pending" while held, else what the front door answers right now.

    Holding it keeps a switch in its verification phase for as long as a test needs, with the new
    colour really live behind nginx; releasing it lets the restore's own verification see the truth.
    """

    def __init__(self, nginx: NginxUnderTest) -> None:
        super().__init__()
        self.held = True
        # Answers given while held: the first one proves the switch reached its verification phase (the
        # front door serving the new colour only proves the reload, which comes just before it).
        self.asked_while_held = 0
        self.routes[("GET", "/version")] = lambda _h, _b: (200, {"color": self._answer(nginx)})

    def _answer(self, nginx: NginxUnderTest) -> str:
        if self.held:
            self.asked_while_held += 1
            return "pending"
        return nginx.probe()


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- the candidate is tested before the live file is replaced -------------------------------------

def test_a_refused_candidate_never_replaces_the_live_file_nor_reloads(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str]) -> None:
    # An upstream of the same name elsewhere in the main configuration: only a test of the candidate
    # inside the real configuration can see the clash (the file on its own is valid).
    nginx.write_conf("    upstream grandmodel_backend { server 127.0.0.1:1; }")
    nginx.upstream_file.write_text(nginx.upstream_file.read_text())  # same content, fresh inode is fine
    before = nginx.upstream_file.stat()
    text = nginx.upstream_file.read_text()
    pids = workers(nginx)
    result = run_module(traffic_switch.main, module_args(nginx, "green"), capsys)
    assert result["failed"] is True
    assert "duplicate upstream" in result["msg"] and "with the candidate for" in result["msg"]
    assert f"the live {nginx.upstream_file} was never replaced" in result["msg"]
    after = nginx.upstream_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert nginx.upstream_file.read_text() == text
    assert workers(nginx) == pids  # no reload happened
    assert leftovers(nginx) == []
    assert not (nginx.conf.parent / (nginx.conf.name + ".candidate")).exists()
    assert not [p for p in nginx.conf.parent.iterdir() if p.name.endswith(".candidate")]


@pytest.mark.parametrize("include", ["glob", "path", "relative", "nested"])
def test_the_candidate_is_tested_inside_the_main_configuration_when_it_includes_the_file(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str], include: str) -> None:
    conf = nginx.conf.read_text()
    glob_include = f"include {nginx.prefix}/conf.d/*.conf;"
    if include == "path":
        nginx.conf.write_text(conf.replace(glob_include, f'include "{nginx.upstream_file}";'))
    elif include == "relative":
        nginx.conf.write_text(conf.replace(glob_include, "include conf.d/grandmodel_upstream.conf;"))
    elif include == "nested":
        (nginx.prefix / "site.inc").write_text(glob_include + "\n")
        nginx.conf.write_text(conf.replace(glob_include, f"include {nginx.prefix}/site.inc;"))
    result = run_module(traffic_switch.main, module_args(nginx, "green"), capsys)
    assert not result.get("failed"), result["msg"]
    assert result["config_test"]["tested"] == ("upstream_only" if include == "nested" else "main_config")
    assert nginx.serving() == "green"


def test_candidate_main_config_rewrites_only_the_include_of_the_upstream_file(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    for name in ("a.conf", "up.conf", "z.conf"):
        (tmp_path / "conf.d" / name).write_text("")
    upstream = str(tmp_path / "conf.d" / "up.conf")
    text = (f"# include {upstream};\nhttp {{\n    include mime.types;\n    include {tmp_path}/conf.d/*.conf; "
            "# trailing comment\n}\n")
    rewritten = candidate_main_config(text, str(tmp_path), upstream, "/c/cand")
    assert rewritten is not None
    assert rewritten.splitlines()[0] == f"# include {upstream};"  # comments are left alone
    assert "include mime.types;" in rewritten
    assert (f"include {tmp_path}/conf.d/a.conf; include /c/cand; include {tmp_path}/conf.d/z.conf; "
            "# trailing comment") in rewritten
    assert candidate_main_config("http { include other/*.conf; }", str(tmp_path), upstream, "/c/cand") is None


# -- restore on every failure -----------------------------------------------------------------------

class RawServer:
    """Answers every connection with fixed raw bytes: a broken front door for the verification probe."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _peer = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(self.answer)

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone leaves the port listening.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.mark.parametrize(("answer", "seen"), [
    (b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"color": "gr', "IncompleteRead"),
    (b"HTTP/1.1 2x0 OK\r\n\r\n", "BadStatusLine"),
])
def test_http_level_errors_of_the_verification_probe_restore(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str], answer: bytes, seen: str) -> None:
    before = nginx.upstream_file.read_text()
    broken = RawServer(answer)
    try:
        args = module_args(nginx, "green", verify_url=f"http://127.0.0.1:{broken.port}/version", verify_timeout=0.5)
        result = run_module(traffic_switch.main, args, capsys)
    finally:
        broken.close()
    assert result["failed"] is True and result["restored"] is True
    assert result["phase"] == "verifying"
    assert seen in result["msg"]
    assert nginx.upstream_file.read_text() == before
    assert serving_steadily(nginx, "blue")
    assert leftovers(nginx) == []


@pytest.mark.parametrize("fault", [RuntimeError("a bug in the verifier"), KeyboardInterrupt()])
def test_an_unexpected_exception_or_interrupt_restores_then_is_raised_again(
        nginx: NginxUnderTest, fault: BaseException, ansible_module: AnsibleModule) -> None:
    before = nginx.upstream_file.read_text()
    verifier = FrontDoorVerifier(nginx.url, timeout=5, consecutive=20, interval=0.01)
    seen: list[str] = []
    answer = verifier._answer

    def answer_then_fail() -> str:
        if "green" in seen and not getattr(verifier, "faulted", False):
            verifier.faulted = True  # type: ignore[attr-defined]  # the new colour took traffic: now the fault
            raise fault
        seen.append(answer())
        return seen[-1]
    verifier._answer = answer_then_fail  # type: ignore[method-assign]
    backend = NginxBackend(str(nginx.upstream_file), module=ansible_module, backends=nginx.backends(),
                           nginx_binary=nginx.binary, nginx_config=str(nginx.conf), nginx_prefix=str(nginx.prefix),
                           verifier=verifier)
    with pytest.raises(type(fault)) as info:
        switch_traffic(backend, "green")
    assert info.value is fault
    assert any("previous state restored" in note for note in getattr(info.value, "__notes__", []))
    assert nginx.upstream_file.read_text() == before
    assert [nginx.serving() for _attempt in range(5)] == ["blue"] * 5
    assert leftovers(nginx) == []


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_while_verifying_restores_and_reports(
        nginx: NginxUnderTest, tmp_path: Path, signame: str) -> None:
    before = nginx.upstream_file.read_text()
    held = HeldVerifyUrl(nginx).start()
    proc = start_module(module_args(nginx, "green", verify_url=held.url + "/version", verify_timeout=60), tmp_path,
                        "sig")
    try:
        wait_until(lambda: serving_steadily(nginx, "green"), 20, "the new colour to take traffic")
        # Under load the module can still be between the reload and its verification when nginx already
        # serves green (seen once in a full run: phase "applying"); signal it once it asks the verify URL.
        wait_until(lambda: held.asked_while_held > 0, 20, "the switch to start verifying")
        proc.send_signal(getattr(signal, signame))
        time.sleep(0.2)
        held.held = False
        result = finish(proc)
    finally:
        held.stop()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert result["failed"] is True and result["interrupted"] == signame and result["phase"] == "verifying"
    assert f"was interrupted by {signame} while verifying; previous state restored" in result["msg"]
    assert result["restore_verification"]["verified"] is True
    assert nginx.upstream_file.read_text() == before
    assert serving_steadily(nginx, "blue")
    assert leftovers(nginx) == []


def test_a_switch_killed_outright_is_undone_by_the_next_run(
        nginx: NginxUnderTest, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = nginx.upstream_file.read_text()
    held = HeldVerifyUrl(nginx).start()
    proc = start_module(module_args(nginx, "green", verify_url=held.url + "/version", verify_timeout=60), tmp_path,
                        "kill")
    try:
        wait_until(lambda: serving_steadily(nginx, "green"), 20, "the new colour to take traffic")
        proc.kill()  # SIGKILL: no handler runs, nothing is restored
        proc.communicate(timeout=10)
    finally:
        held.stop()
    after_kill = answers(nginx)
    assert after_kill == ["green"] * 5, f"after the kill the front door answered {after_kill}"
    assert leftovers(nginx) == [".grandmodel_upstream.conf.pending"]
    # The next run (whatever it wants) first undoes the dead switch under the lock.
    result = run_module(traffic_switch.main, module_args(nginx, "blue", keepalive=8), capsys, diff=True)
    assert not result.get("failed"), result
    assert result["changed"] is True
    assert "a switch to green" in result["recovered"] and "had died without finishing" in result["recovered"]
    assert "restored" in result["recovered"] and "reloaded nginx" in result["recovered"]
    # The recovery put the old file back before this run planned: blue with the same settings is no change.
    assert result["diff"]["before"] == before == nginx.upstream_file.read_text()
    assert result["verified"] is True  # and the recovery was proven through the front door
    assert serving_steadily(nginx, "blue")
    assert leftovers(nginx) == []


# -- no interleaving --------------------------------------------------------------------------------

def test_two_switches_at_once_run_one_after_the_other(nginx: NginxUnderTest, tmp_path: Path) -> None:
    # The first holds the lock in its verification phase for as long as the test keeps its verify URL
    # pending (no timing guess: a loaded machine only makes the hold longer); the second waits for it.
    held = HeldVerifyUrl(nginx).start()
    try:
        first = start_module(module_args(nginx, "green", verify_url=held.url + "/version", verify_timeout=60),
                             tmp_path, "a")
        wait_until(lambda: serving_steadily(nginx, "green"), 20, "the first switch to hold the lock, verifying")
        second = start_module(module_args(nginx, "blue"), tmp_path, "b")
        impatient = start_module(module_args(nginx, "blue", lock_timeout=0.1), tmp_path, "c")
        c = finish(impatient)  # refused while the first holds the lock: the lock really was held
        time.sleep(1.0)  # the second, started before the impatient one, is polling for the lock by now
        assert first.poll() is None and second.poll() is None
        held.held = False
        a, b = finish(first), finish(second)
    finally:
        held.stop()
    assert not a.get("failed") and not b.get("failed"), (a, b)
    assert a["lock"]["lock_waited_s"] < 0.5
    assert b["lock"]["lock_waited_s"] > 0.3  # it waited for the first switch to finish
    assert (a["active_color"], b["active_color"], b["previous_color"]) == ("green", "blue", "green")
    assert c["failed"] is True and "another traffic switch holds the lock" in c["msg"] and "pid" in c["msg"]
    assert parse_active_color(nginx.upstream_file.read_text()) == "blue" == nginx.serving()
    record = json.loads((nginx.upstream_file.parent / ".grandmodel_upstream.conf.state.json").read_text())
    assert (record["active"], record["previous"]) == ("blue", "green")
    assert leftovers(nginx) == []


# -- numeric inputs ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("option", "value", "message"), [
    ("verify_interval", -1.0, "verify_interval must be 0 or more (got -1.0)"),
    ("verify_timeout", 0.0, "verify_timeout must be more than 0 (got 0.0)"),
    ("verify_timeout", float("nan"), "verify_timeout must be a finite number (got nan)"),
    ("verify_consecutive", 0, "verify_consecutive must be 1 or more (got 0)"),
    ("keepalive", -1, "keepalive must be 0 or more (got -1)"),
    ("lock_timeout", float("inf"), "lock_timeout must be a finite number (got inf)"),
    ("command_timeout", -5.0, "command_timeout must be more than 0 (got -5.0)"),
])
def test_numeric_inputs_are_refused_before_anything_is_touched(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str], option: str, value: Any, message: str) -> None:
    listing = sorted(os.listdir(nginx.upstream_file.parent))
    result = run_module(traffic_switch.main, module_args(nginx, "green", **{option: value}), capsys)
    assert result["failed"] is True
    assert result["msg"] == message
    assert sorted(os.listdir(nginx.upstream_file.parent)) == listing
    assert nginx.serving() == "blue"


# -- the warm colour as nginx backup --------------------------------------------------------------

def test_a_backup_colour_answers_when_the_live_one_dies_and_leaves_in_the_same_switch(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    nginx.write_conf(next_upstream="error timeout http_502 http_503 non_idempotent")
    metrics = tmp_path / "grandmodel_traffic.prom"
    result = run_module(traffic_switch.main, module_args(nginx, "green", backup_color="blue",
                                                         metrics_file=str(metrics)), capsys)
    assert not result.get("failed"), result
    assert (result["active_color"], result["backup_color"], result["metrics_changed"]) == ("green", "blue", True)
    text = nginx.upstream_file.read_text()
    assert parse_backup_color(text) == "blue"
    assert f"server 127.0.0.1:{nginx.green.port} max_fails=1 fail_timeout=5s;" in text
    assert f"server 127.0.0.1:{nginx.blue.port} backup;" in text
    assert 'grandmodel_traffic_active_color{color="green",upstream="grandmodel_backend"} 1' in metrics.read_text()
    assert 'grandmodel_traffic_backup_color{color="blue",upstream="grandmodel_backend"} 1' in metrics.read_text()
    # The live colour dies: every request is answered by the backup at once, none fails.
    nginx.green.stop()
    assert [nginx.serving() for _attempt in range(20)] == ["blue"] * 20
    query = run_module(traffic_switch.main, dict(state="query", upstream_file=str(nginx.upstream_file)), capsys)
    assert (query["active_color"], query["backup_color"]) == ("green", "blue")
    # Switching back without a backup drops the backup line in the same atomic switch.
    back = run_module(traffic_switch.main, module_args(nginx, "blue", metrics_file=str(metrics)), capsys)
    assert not back.get("failed"), back
    assert back["backup_color"] is None and parse_backup_color(nginx.upstream_file.read_text()) is None
    assert "backup" not in nginx.upstream_file.read_text().split("upstream", 1)[1]
    assert 'grandmodel_traffic_active_color{color="blue",upstream="grandmodel_backend"} 1' in metrics.read_text()
    assert 'grandmodel_traffic_backup_color{color="blue",upstream="grandmodel_backend"} 0' in metrics.read_text()


def test_state_previous_switches_back_to_the_recorded_colour(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str]) -> None:
    previous_args = {k: v for k, v in module_args(nginx, "green").items() if k != "color"}
    refused = run_module(traffic_switch.main, dict(previous_args, state="previous"), capsys)
    assert refused["failed"] is True and "no previous colour is recorded" in refused["msg"]
    assert not run_module(traffic_switch.main, module_args(nginx, "green", backup_color="blue"), capsys).get("failed")
    back = run_module(traffic_switch.main, dict(previous_args, state="previous"), capsys)
    assert not back.get("failed"), back
    assert (back["active_color"], back["previous_color"], back["backup_color"]) == ("blue", "green", None)
    assert nginx.serving() == "blue"


def test_metrics_after_a_failed_switch_say_the_restored_colour(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    metrics = tmp_path / "traffic.prom"
    dead = nginx.backends(green=[f"127.0.0.1:{free_port()}"])
    result = run_module(traffic_switch.main, module_args(nginx, "green", backends=dead, verify_timeout=0.5,
                                                         metrics_file=str(metrics)), capsys)
    assert result["failed"] is True and result["restored"] is True
    assert 'grandmodel_traffic_active_color{color="blue",upstream="grandmodel_backend"} 1' in metrics.read_text()
    # The check mode of the same switch touches neither the upstream nor the metrics.
    metrics.unlink()
    checked = run_module(traffic_switch.main, module_args(nginx, "green", metrics_file=str(metrics)), capsys,
                         check_mode=True)
    assert checked["changed"] is True and not metrics.exists()


def test_a_missing_metrics_directory_is_named(nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_module(traffic_switch.main, module_args(nginx, "green", metrics_file="/nonexistent/dir/x.prom"),
                        capsys)
    assert result["failed"] is True
    assert result["msg"].startswith("traffic is on green, but cannot export the live colour to /nonexistent/dir/x.prom")
    assert nginx.serving() == "green"


def test_numeric_checks_of_the_backend_itself(tmp_path: Path) -> None:
    with pytest.raises(TrafficSwitchError, match=r"keepalive must be a whole number \(got 1.5\)"):
        NginxBackend(str(tmp_path / "u.conf"), keepalive=1.5)


def test_a_colour_that_is_down_is_refused_before_anything_is_touched(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str]) -> None:
    before = nginx.upstream_file.stat()
    pids = workers(nginx)
    dead = nginx.backends(green=[f"127.0.0.1:{free_port()}"])
    result = run_module(traffic_switch.main, module_args(nginx, "green", backends=dead, precheck_path="/version"),
                        capsys)
    assert result["failed"] is True
    assert "refusing to switch" in result["msg"] and "not every server of green is ready" in result["msg"]
    assert "connection refused" in result["msg"] and result["precheck"]["ready"] is False
    after = nginx.upstream_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert workers(nginx) == pids
    ok = run_module(traffic_switch.main, module_args(nginx, "green", precheck_path="/version"), capsys)
    assert not ok.get("failed"), ok
    assert ok["precheck"] == {"path": "/version", "answers": {f"127.0.0.1:{nginx.green.port}": 200}, "ready": True}
    bad = run_module(traffic_switch.main, module_args(nginx, "blue", precheck_path="ready"), capsys)
    assert bad["failed"] is True and bad["msg"] == "precheck_path must be an absolute path such as /ready (got 'ready')"
