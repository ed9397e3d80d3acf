"""Daily health, emergency stop and resume (playbooks/runbooks/) through the scenario's real front door.

An independent client on this machine sends steady predictions to the front door published on
127.0.0.1:28080 (half the workers on keep-alive connections, half on a new connection each) and logs
every answer: when it was sent and received, its status and, for a 503, the `error` of its JSON body.
The figures come from that log and from each colour's own /metrics (its request counters), never from
the playbook's word. The tests run in order: daily health, check mode, stop, a refused resume, stop
again (with the daily health during the halt), resume.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(PROJECT / "scripts"))

from frontdoor_load import LoadGenerator, check_target, sample_body  # noqa: E402
from test_rollout import container_ip, container_pid  # noqa: E402

FRONT_HOST, FRONT_PORT = "127.0.0.1", 28080
FRONT = f"http://{FRONT_HOST}:{FRONT_PORT}"
PREDICT = "/v1/models/strategic/predict"
APP = "gm-mol-rollout-app"
LB = "gm-mol-rollout-lb"
HALT = "/etc/nginx/grandmodel/halt.d/00-emergency-stop.conf"
PORTS = {"blue": 8001, "green": 8002}
REASON = "risk limit breached (scenario)"
RESULTS: dict[str, dict[str, Any]] = {}


# -- an independent client ----------------------------------------------------------------------------

@dataclass
class Answer:
    sent: float
    received: float
    status: int
    error: str  # the JSON body's "error" of a non-200 answer, or the exception when none came


class SteadyClient:
    """Workers sending one prediction each every `workers / rate` s, bounded in time and count."""

    def __init__(self, rate: float = 40.0, workers: int = 4, seconds: float = 300.0) -> None:
        check_target(FRONT_HOST)
        self.interval = workers / rate
        self.workers = workers
        self.deadline = time.monotonic() + seconds
        self.max_requests = int(rate * seconds)
        self.body = sample_body()
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _one(self, conn: http.client.HTTPConnection, keepalive: bool) -> Answer:
        if keepalive:
            # nginx closes idle keep-alive connections when it reloads: reconnect first, as pools do.
            LoadGenerator._drop_if_closed(conn)
        sent = time.monotonic()
        headers = {"Content-Type": "application/json", **({} if keepalive else {"Connection": "close"})}
        try:
            reused = conn.sock is not None
            try:
                conn.request("POST", PREDICT, body=self.body, headers=headers)
                resp = conn.getresponse()
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                # A reused connection closed by a reload before any answer: resent once on a new one, as
                # RFC 9112 9.3.1 allows for an idempotent request (a prediction is a pure function).
                if not reused:
                    raise
                conn.close()
                conn.request("POST", PREDICT, body=self.body, headers=headers)
                resp = conn.getresponse()
            data = resp.read()
            error = ""
            if resp.status != 200:
                try:
                    error = str(json.loads(data).get("error", ""))
                except (ValueError, AttributeError):
                    error = data[:80].decode(errors="replace")
            if not keepalive or resp.getheader("Connection", "").lower() == "close":
                conn.close()
            return Answer(sent, time.monotonic(), resp.status, error)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            return Answer(sent, time.monotonic(), 0, f"{type(exc).__name__}: {exc}")

    def _worker(self, index: int) -> None:
        keepalive = index % 2 == 0
        conn = http.client.HTTPConnection(FRONT_HOST, FRONT_PORT, timeout=5)
        next_at = time.monotonic() + index * self.interval / self.workers
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            with self._lock:
                if len(self.answers) >= self.max_requests:
                    break
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at += self.interval
            answer = self._one(conn, keepalive)
            with self._lock:
                self.answers.append(answer)
        conn.close()

    def start(self) -> SteadyClient:
        for i in range(self.workers):
            thread = threading.Thread(target=self._worker, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        return sorted(self.answers, key=lambda a: a.sent)


# -- helpers ------------------------------------------------------------------------------------------

def runbook(name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(PROJECT / ".venv/bin/ansible-playbook"), "-i", os.environ["MOLECULE_INVENTORY_FILE"],
           str(PROJECT / "playbooks" / "runbooks" / name), *extra]
    return subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, timeout=600, check=False)


def recap_changes(output: str) -> int:
    return sum(int(line.split("changed=")[1].split()[0]) for line in output.splitlines()
               if " : ok=" in line and "changed=" in line)


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    return " ".join((proc.stdout + proc.stderr).split())


def podman(*args: str, check: bool = True) -> str:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, timeout=120).stdout


def app_ip() -> str:
    return container_ip(APP)  # asked of podman once (test_rollout.py), not at every poll


def lb_path(path: str) -> Path:
    """A file of the load balancer container, read from this machine."""
    return Path(f"/proc/{container_pid(LB)}/root{path}")


def get(path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{FRONT}{path}", timeout=5) as resp:
            return resp.status, dict(json.load(resp))
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError):
            return exc.code, dict(json.loads(exc.read()))
        return exc.code, {}


def live_color() -> str:
    status, body = get("/version")
    assert status == 200, body
    return str(body["color"])


def predictions_served() -> dict[str, float]:
    """Predict requests each running colour has counted on its own /metrics (this machine reads it directly)."""
    pattern = re.compile(r'^grandmodel_http_requests_total\{[^}]*route="[^"]*(?:predict|process)[^"]*"[^}]*\}\s+(\S+)',
                         re.MULTILINE)
    counts = {}
    for color, port in PORTS.items():
        try:
            with urllib.request.urlopen(f"http://{app_ip()}:{port}/metrics", timeout=2) as resp:
                counts[color] = sum(float(v) for v in pattern.findall(resp.read().decode()))
        except OSError:
            continue
    return counts


def wait_ready(color: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), \
                urllib.request.urlopen(f"http://{app_ip()}:{PORTS[color]}/ready", timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"{color} did not become ready again")


@pytest.fixture(scope="module")
def workdir() -> Path:
    path = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "runbooks"
    subprocess.run(["rm", "-rf", str(path)], check=True)
    path.mkdir(parents=True)
    return path


def stop_vars(workdir: Path, reason: str) -> tuple[str, str]:
    hook = ["sh", "-c", 'printf "%s|%s|%s\\n" "$GRANDMODEL_HALT_ID" "$GRANDMODEL_HALT_REASON" '
            '"$GRANDMODEL_HALT_SINCE" >> "$0"', str(workdir / "hook.log")]
    return "-e", json.dumps({"emergency_stop_reason": reason, "emergency_stop_hook_command": hook,
                             "runbook_reports_dir": str(workdir / "reports")})


@pytest.fixture(scope="module", autouse=True)
def never_leave_a_halt() -> Any:
    """Whatever happens here, the scenario's front door serves again afterwards; figures are kept."""
    yield
    if lb_path(HALT).exists():
        podman("exec", LB, "rm", "-f", HALT)
        podman("exec", LB, "systemctl", "reload", "nginx")
    out = PROJECT / "reports" / "runbooks-scenario.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=2) + "\n")
    print("\nrunbooks in the rollout scenario:", json.dumps(RESULTS))


# -- daily health -------------------------------------------------------------------------------------

def reports_of(workdir: Path, runbook_name: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(workdir.glob(f"reports/{runbook_name}-*/report.json"))]


def test_daily_health_reports_a_healthy_scenario(workdir: Path) -> None:
    color = live_color()
    proc = runbook("daily_health.yml", "-e", json.dumps({"runbook_reports_dir": str(workdir / "reports")}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    (report,) = reports_of(workdir, "daily_health")
    assert report["healthy"] is True and report["problems"] == [], report["problems"]
    door = report["front_doors"][LB]
    assert (door["live_color"], door["halted"]) == (color, False)
    assert report["hosts"][APP]["units"] == {f"grandmodel-model@{color}": "active"}
    assert report["hosts"][LB]["units"] == {"nginx": "active"}
    assert report["hosts"][APP]["version"]["color"] == color
    assert report["hosts"][APP]["disks"]["/"] >= 0 and report["hosts"][LB]["memory_available_percent"] > 0
    lb = report["hosts"][LB]  # containers share this machine's clock: no offset beyond the measurement's own
    assert abs(lb["clock_offset_s"]) - lb["clock_uncertainty_s"] < 0.5, lb
    assert "Healthy" in next(workdir.glob("reports/daily_health-*/report.md")).read_text()


# -- the emergency stop -------------------------------------------------------------------------------

def test_check_mode_only_says_what_it_would_do(workdir: Path) -> None:
    proc = runbook("emergency_stop.yml", "--check", *stop_vars(workdir, REASON))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "check mode: would write" in output_of(proc)
    assert not lb_path(HALT).exists()
    assert get("/version")[0] == 200
    assert not (workdir / "hook.log").exists()
    assert not list(workdir.glob("reports/emergency_stop-*"))


def test_emergency_stop_answers_503_trading_halted_within_5_s_and_no_request_reaches_a_colour(
        workdir: Path) -> None:
    color = live_color()
    client = SteadyClient().start()
    time.sleep(2.0)
    started = time.monotonic()
    proc = runbook("emergency_stop.yml", *stop_vars(workdir, REASON))
    playbook_s = time.monotonic() - started
    time.sleep(1.0)  # old nginx workers finish requests they already had
    served_before = predictions_served()
    time.sleep(3.0)
    served_after = predictions_served()
    health = urllib.request.urlopen(f"{FRONT}/lb-health", timeout=5).status
    answers = client.stop()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]

    halted = [a for a in answers if a.status == 503]
    assert halted, "the front door never answered 503"
    first_503 = min(a.received for a in halted)
    # A graceful reload is not one instant: a request that an old nginx worker already holds on its
    # connection is answered with the configuration it started with, so a 200 may still come a few ms
    # after another connection's first 503. The promise is when the LAST prediction is served (within
    # 5 s of the start) and that, once the playbook has proved the halt, every request is refused.
    served = [a for a in answers if a.status == 200 and a.sent >= started]
    last_200 = max((a.received for a in served), default=started)
    proved = started + playbook_s
    after = [a for a in answers if a.sent >= proved]
    not_halted = [a for a in after if (a.status, a.error) != (503, "trading_halted")]
    other = [a for a in answers if (a.status, a.error) not in {(200, ""), (503, "trading_halted")}]
    before = [a for a in answers if a.sent < started]
    RESULTS["emergency_stop"] = {
        "seconds_to_first_503": round(first_503 - started, 2), "seconds_to_last_200": round(last_200 - started, 2),
        "served_after_first_503": sum(1 for a in served if a.sent >= first_503),
        "playbook_s": round(playbook_s, 1), "requests": len(answers), "sent_after_playbook": len(after),
        "not_halted_after_playbook": len(not_halted), "neither_200_nor_halted": len(other),
        "served_by_colours_during_halt": {c: served_after[c] - served_before[c] for c in served_before},
    }
    assert all(a.status == 200 for a in before), "the front door failed before the stop"
    assert not other, other[:5]  # no 502, no reset, no timeout: served or refused with the reason
    assert first_503 - started <= 5.0, RESULTS["emergency_stop"]
    assert last_200 - started <= 5.0, RESULTS["emergency_stop"]
    assert not not_halted, not_halted[:5]
    assert len(after) >= 100, RESULTS["emergency_stop"]  # the client kept sending through the halt
    # Drained: no prediction reached either colour once halted, while both keep running.
    assert color in served_before and served_before == served_after, (served_before, served_after)
    assert podman("exec", APP, "systemctl", "is-active", f"grandmodel-model@{color}", check=False).strip() == "active"
    assert health == 200  # the load balancer's own health endpoint still answers

    status, body = get("/version")  # every route, not only predictions
    assert status == 503 and body["error"] == "trading_halted" and body["reason"] == REASON, body
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["since"]), body

    # The operator's hook ran once, with the halt in its environment.
    calls = (workdir / "hook.log").read_text().splitlines()
    assert len(calls) == 1 and calls[0].split("|")[1:] == [REASON, body["since"]], calls

    (report_dir,) = (workdir / "reports").glob("emergency_stop-*")
    report = json.loads((report_dir / "report.json").read_text())
    assert report["halt"]["since"] == body["since"] and report["newly_halted"] is True
    assert report["problems"] == [] and report["hook"]["ok"] is True
    # The ops host's app database counted before and after: no table lost a row.
    (rows,) = report["databases"].values()
    assert rows["tables"] > 0 and rows["lost"] == [] and rows["rows_after"] >= rows["rows_before"], rows
    assert report["front_doors"][LB]["halted"] is True and report["live_colour"][LB]["active_color"] == color
    assert "Trading halted since" in (report_dir / "report.md").read_text()

    # The bundle holds what it claims, from both hosts.
    with tarfile.open(report_dir / "diagnostics.tar.gz") as tar:
        files = {m.name.split("diagnostics/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}

        def text(name: str) -> str:
            member = tar.extractfile(files[name])
            assert member is not None
            return member.read().decode()

        assert "halt.d/00-emergency-stop.conf" in text(f"{LB}/nginx-T.txt") and "trading_halted" in text(
            f"{LB}/nginx-T.txt")
        assert "Active: active (running)" in text(f"{LB}/nginx-systemctl-status.txt")
        assert "Active connections" in text(f"{LB}/nginx-stub-status.txt")
        assert f"grandmodel-model@{color}" in text(f"{APP}/app-systemctl-status.txt")
        assert "# rc=0" in text(f"{APP}/app-journal.txt")
        assert "grandmodel_http_requests_total" in text(f"{APP}/{color}-metrics.txt")
        assert f'"color": "{color}"' in text(f"{APP}/{color}-version.txt").replace('":"', '": "')
        assert json.loads(text("front_doors.json"))[LB]["halt"]["error"] == "trading_halted"


def test_resume_is_refused_while_the_live_colour_is_down(workdir: Path) -> None:
    color = live_color() if get("/version")[0] == 200 else json.loads(
        lb_path("/etc/nginx/grandmodel/.upstream.conf.state.json").read_text())["active"]
    podman("exec", APP, "systemctl", "stop", f"grandmodel-model@{color}")
    try:
        proc = runbook("resume.yml")
    finally:
        podman("exec", APP, "systemctl", "start", f"grandmodel-model@{color}")
    assert proc.returncode != 0
    out = output_of(proc)
    assert "refusing to resume; the halt stays" in out and f"live colour {color}" in out, out[-2000:]
    assert f"systemctl start grandmodel-model@{color}" in out
    assert lb_path(HALT).exists()
    assert get("/version")[1].get("error") == "trading_halted"
    # The colour loads its models meanwhile; the resume test waits for it (the next test needs no colour).


def test_a_second_stop_changes_nothing(workdir: Path) -> None:
    halt_before = lb_path(HALT).read_bytes()
    proc = runbook("emergency_stop.yml", *stop_vars(workdir, "another reason"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert recap_changes(proc.stdout) == 0, proc.stdout[-3000:]
    assert "already halted: nothing changed" in output_of(proc)
    assert lb_path(HALT).read_bytes() == halt_before
    assert get("/version")[1]["reason"] == REASON  # the first halt's reason and time stand
    assert len((workdir / "hook.log").read_text().splitlines()) == 1  # the hook is not called twice

    # The daily health check lists the halt among what is wrong, with any other problem (a disk limit of 0%).
    health = runbook("daily_health.yml", "-e", json.dumps({"runbook_reports_dir": str(workdir / "reports"),
                                                           "daily_health_disk_max_percent": 0}))
    assert health.returncode != 0
    problems = reports_of(workdir, "daily_health")[-1]["problems"]
    assert f"{LB}: trading is halted (emergency stop; playbooks/runbooks/resume.yml lifts it)" in problems
    assert any(p.startswith(f"{APP}: / is ") for p in problems), problems
    assert "trading is halted" in output_of(health)


# -- resume -------------------------------------------------------------------------------------------

def test_resume_brings_traffic_back_with_no_failed_request(workdir: Path) -> None:
    wait_ready(json.loads(lb_path("/etc/nginx/grandmodel/.upstream.conf.state.json").read_text())["active"])
    client = SteadyClient().start()
    time.sleep(2.0)
    started = time.monotonic()
    proc = runbook("resume.yml", "-e", json.dumps({"runbook_reports_dir": str(workdir / "reports")}))
    playbook_s = time.monotonic() - started
    time.sleep(4.0)
    answers = client.stop()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]

    served = [a for a in answers if a.status == 200]
    assert served, "no prediction was answered after the resume"
    first_200 = min(a.received for a in served)
    # As for the stop: during the graceful reload a request an old worker already holds is still
    # answered 503 trading_halted a few ms after another connection's first 200 (CI saw two, 26 ms
    # apart). Neither is a failure: every answer is a 200 or the halt with its reason, the halt ends
    # within the playbook, and every request sent once the playbook has proved the front door is served.
    still_halted = [a for a in answers if a.sent >= first_200 and a.status == 503]
    last_503 = max((a.received for a in answers if a.status == 503), default=started)
    proved = started + playbook_s
    after = [a for a in answers if a.sent >= proved]
    failed = [a for a in after if a.status != 200]
    other = [a for a in answers if (a.status, a.error) not in {(200, ""), (503, "trading_halted")}]
    before = [a for a in answers if a.sent < started]
    RESULTS["resume"] = {"seconds_to_first_200": round(first_200 - started, 2),
                         "seconds_to_last_503": round(last_503 - started, 2),
                         "halted_after_first_200": len(still_halted), "playbook_s": round(playbook_s, 1),
                         "sent_after_playbook": len(after), "failed_after_playbook": len(failed),
                         "neither_200_nor_halted": len(other)}
    assert all((a.status, a.error) == (503, "trading_halted") for a in before)
    assert not other, other[:5]
    assert last_503 <= proved, RESULTS["resume"]
    assert not failed, failed[:5]
    assert len(after) >= 100, RESULTS["resume"]
    assert not lb_path(HALT).exists()
    (report_dir,) = (workdir / "reports").glob("resume-*")
    report = json.loads((report_dir / "report.json").read_text())
    assert report["was_halted"] is True and report["front_doors"][LB]["predict_status"] == 200

    again = runbook("resume.yml")
    assert again.returncode == 0 and recap_changes(again.stdout) == 0, again.stdout[-3000:]
    assert "no front door is halted: nothing to do" in output_of(again)
