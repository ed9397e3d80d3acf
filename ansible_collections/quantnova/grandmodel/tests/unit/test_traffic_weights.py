"""traffic_switch state=weighted against a real nginx on loopback: the front door really splits traffic.

Each test attacks one promise of the weighted switch: the walk 10/25/50/100 splits the answers of the
front door in proportion (counted here, per colour, over 400 requests at every step) while a steady
client sees no failed request; the same weights again change nothing; check mode and diff tell the
truth; bad weights are refused before anything is touched; a refused candidate, a failed split and a
signal restore the previous file; a switch killed outright is undone by the next run; and going back
to state=active writes the exact bytes it wrote before.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from ansible.module_utils.basic import AnsibleModule
from conftest import NginxUnderTest, free_port, run_module
from test_traffic_switch_faults import HeldVerifyUrl, finish, leftovers, start_module, wait_until, workers

from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic import (
    FrontDoorVerifier,
    NginxBackend,
    TrafficSwitchError,
    check_weights,
    parse_active_color,
    parse_weights,
    render_upstream,
    render_weighted_upstream,
    switch_traffic,
)
from ansible_collections.quantnova.grandmodel.plugins.modules import traffic_switch

UPSTREAM = "grandmodel_backend"
# The front door's own retry rule (roles/loadbalancer): a failed request is retried on another server.
FRONT_DOOR_NEXT_UPSTREAM = "error timeout http_502 http_503 non_idempotent"
# The test's own count of the split: 400 fresh requests per step plus every answer the steady client
# got meanwhile (together: everything nginx answered in that time), each colour within 3 points of its
# weight. nginx's smooth weighted round robin is exact per worker; counting the 400 alone would
# measure how the two clients happened to interleave, not the split.
COUNT_REQUESTS = 400
COUNT_TOLERANCE_POINTS = 3.0


def base_args(nginx: NginxUnderTest, **extra: Any) -> dict[str, Any]:
    # keepalive 8: the value the fixture rendered the live file with, so state=active gives back its bytes.
    args = dict(upstream_file=str(nginx.upstream_file), backends=nginx.backends(), keepalive=8,
                nginx_binary=nginx.binary, nginx_config=str(nginx.conf), nginx_prefix=str(nginx.prefix),
                verify_url=nginx.url, verify_timeout=10.0, verify_consecutive=3, verify_interval=0.05)
    args.update(extra)
    return args


def weighted_args(nginx: NginxUnderTest, weights: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return base_args(nginx, state="weighted", weights=weights, **extra)


def split(green: int) -> dict[str, int]:
    return {"blue": 100 - green, "green": green}


def count_answers(nginx: NginxUnderTest, requests: int = COUNT_REQUESTS) -> dict[str, int]:
    """What the front door answers `requests` fresh connections, per colour (None: a failed request), once the
    workers of an earlier configuration are gone."""
    return dict(collections.Counter(str(nginx.serving()) for _attempt in range(requests)))


def assert_split(counts: dict[str, int], weights: dict[str, int]) -> None:
    total = sum(counts.values())
    assert set(counts) <= {color for color, weight in weights.items() if weight}, counts  # no failure, no 0 colour
    for color, weight in weights.items():
        share = 100.0 * counts.get(color, 0) / total
        assert abs(share - weight) <= COUNT_TOLERANCE_POINTS, (weights, counts)


class SteadyClient:
    """Asks the front door every few milliseconds on a fresh connection, counting colours and failures.

    Bounded in time and count (loopback only). Use as a context manager around the steps it watches.
    """

    def __init__(self, nginx: NginxUnderTest, interval: float = 0.004, limit_s: float = 180.0,
                 limit_requests: int = 60000) -> None:
        self.nginx = nginx
        self.interval = interval
        self.limit_s = limit_s
        self.limit_requests = limit_requests
        self.answers: collections.Counter[str] = collections.Counter()
        self.failures: list[float] = []
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        while not self._stop.is_set() and time.monotonic() < deadline and self.requests < self.limit_requests:
            answer = self.nginx.probe()
            self.requests += 1
            if answer is None:
                self.failures.append(time.monotonic())
            else:
                self.answers[answer] += 1
            time.sleep(self.interval)

    def __enter__(self) -> SteadyClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def unchanged_listing(nginx: NginxUnderTest) -> list[tuple[str, int, int]]:
    """Name, inode and mtime of every file beside the upstream file: any write shows."""
    directory = nginx.upstream_file.parent
    return sorted((p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir())


# -- rendering and parsing ---------------------------------------------------------------------------

@pytest.mark.parametrize(("weights", "backends", "servers"), [
    (split(10), {"blue": ["10.0.0.1:8001"], "green": ["10.0.0.1:8002"]},
     ["10.0.0.1:8001 weight=90 max_fails=1", "10.0.0.1:8002 weight=10 max_fails=1"]),
    # Two blue servers, one green: per-server weights keep the colour shares (180:20 = 90:10).
    (split(10), {"blue": ["a:1", "b:1"], "green": ["c:2"]},
     ["a:1 weight=90 max_fails=1", "b:1 weight=90 max_fails=1", "c:2 weight=20 max_fails=1"]),
    (split(25), {"blue": ["a:1", "b:1"], "green": ["c:2", "d:2", "e:2"]},
     ["a:1 weight=225 ", "b:1 weight=225 ", "c:2 weight=50 ", "d:2 weight=50 ", "e:2 weight=50 "]),
    # A colour at 0 has no server line; alone, the other is never marked failed (as state=active).
    (split(100), {"blue": ["a:1"], "green": ["c:2"]}, ["c:2 weight=100 max_fails=0;"]),
    ({"blue": 100}, {"blue": ["a:1"]}, ["a:1 weight=100 max_fails=0;"]),
])
def test_render_weighted_upstream_weighs_every_server_of_a_colour(
        weights: dict[str, int], backends: dict[str, list[str]], servers: list[str]) -> None:
    text = render_weighted_upstream(UPSTREAM, weights, backends, 32)
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("server ")]
    assert len(lines) == len(servers)
    for line, expected in zip(lines, servers, strict=True):
        assert line.startswith("server " + expected)
    assert parse_weights(text) == check_weights(weights)
    assert "backup" not in text
    assert text.endswith("    keepalive 32;\n}\n")


@pytest.mark.parametrize(("weights", "current", "active"), [
    (split(10), None, "blue"), (split(75), "blue", "green"),
    (split(50), "blue", "blue"), (split(50), "green", "green"), (split(50), None, "blue"),
])
def test_the_recorded_active_colour_is_the_largest_weight_and_a_tie_keeps_the_live_one(
        weights: dict[str, int], current: str | None, active: str) -> None:
    text = render_weighted_upstream(UPSTREAM, weights, {"blue": ["a:1"], "green": ["b:2"]}, 0, active=current)
    assert parse_active_color(text) == active
    assert "keepalive" not in text


def test_parse_weights_of_a_one_colour_file_is_none() -> None:
    assert parse_weights(render_upstream(UPSTREAM, "blue", ["a:1"], 8)) is None
    assert parse_weights(None) is None
    assert parse_weights("# weights: blue=90 green=10\n") == {"blue": 90, "green": 10}


def test_state_active_still_renders_the_same_bytes() -> None:
    # Pinned before weights existed: the loadbalancer role and the rollout depend on this exact text.
    header = "# Managed by quantnova.grandmodel.traffic_switch: edit the colour with that module, not by hand.\n"
    assert render_upstream(UPSTREAM, "blue", ["127.0.0.1:8001"], 32) == header + (
        "# active_color: blue\nupstream grandmodel_backend {\n    server 127.0.0.1:8001 max_fails=0;\n"
        "    keepalive 32;\n}\n")
    assert render_upstream("u", "green", ["a:1", "b:2"], 0, "blue", ["c:3"]) == header + (
        "# active_color: green\n# backup_color: blue\nupstream u {\n    server a:1 max_fails=1 fail_timeout=5s;\n"
        "    server b:2 max_fails=1 fail_timeout=5s;\n    server c:3 backup;\n}\n")


# -- the walk under a steady client ------------------------------------------------------------------

def test_walking_10_25_50_100_splits_the_front_door_with_no_failed_request(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str]) -> None:
    nginx.write_conf(next_upstream=FRONT_DOOR_NEXT_UPSTREAM)
    original = nginx.upstream_file.read_text()
    report = []
    with SteadyClient(nginx) as client:
        for green in (10, 25, 50, 100):
            weights = split(green)
            result = run_module(traffic_switch.main, weighted_args(nginx, weights), capsys)
            assert not result.get("failed"), result
            assert result["changed"] is True and result["verified"] is True
            assert result["weights"] == weights
            assert result["active_color"] == ("green" if green > 50 else "blue")
            evidence = result["verification"]
            assert evidence["expected_weights"] == weights and evidence["verified"] is True
            steady_before = client.answers.copy()
            counts = count_answers(nginx)
            steady = dict(client.answers - steady_before)
            together = dict(collections.Counter(counts) + collections.Counter(steady))
            assert_split(together, weights)
            # The same weights again: parsed back from the live file, nothing to do.
            again = run_module(traffic_switch.main, weighted_args(nginx, weights), capsys)
            assert again["changed"] is False and again["weights"] == weights, again
            query = run_module(traffic_switch.main, dict(state="query", upstream_file=str(nginx.upstream_file)),
                               capsys)
            assert (query["weights"], query["active_color"]) == (weights, result["active_color"])
            report.append((green, counts, steady, evidence["window_counts"], evidence["requests"]))
        # Back to one colour: exactly the bytes state=active wrote before the walk.
        back = run_module(traffic_switch.main, base_args(nginx, color="blue"), capsys)
        assert not back.get("failed"), back
        assert nginx.upstream_file.read_text() == original
        back_counts = count_answers(nginx, 100)
    assert back_counts == {"blue": 100}
    assert client.failures == [], f"{len(client.failures)} failed of {client.requests}"
    assert client.requests > 100 and set(client.answers) == {"blue", "green"}
    with capsys.disabled():
        for green, counts, steady, window, requests in report:
            print(f"\nweighted step green={green}: count of {COUNT_REQUESTS} {counts} + steady client meanwhile "
                  f"{steady}; the module's verify window {window} after {requests} requests")
        print(f"steady client: {client.requests} requests, {len(client.failures)} failed, {dict(client.answers)}")


# -- check mode and diff -----------------------------------------------------------------------------

def test_check_mode_reports_the_weight_lines_and_changes_nothing(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str]) -> None:
    before = nginx.upstream_file.read_text()
    listing = unchanged_listing(nginx)
    pids = workers(nginx)
    result = run_module(traffic_switch.main, weighted_args(nginx, split(10)), capsys, check_mode=True, diff=True)
    assert result["changed"] is True and result["verified"] is False
    assert result["verification"] == {"skipped": "check mode"}
    assert result["diff"]["before"] == before
    after = result["diff"]["after"]
    assert "# weights: blue=90 green=10" in after
    assert f"server 127.0.0.1:{nginx.blue.port} weight=90 max_fails=1 fail_timeout=5s;" in after
    assert f"server 127.0.0.1:{nginx.green.port} weight=10 max_fails=1 fail_timeout=5s;" in after
    assert unchanged_listing(nginx) == listing and workers(nginx) == pids
    assert nginx.upstream_file.read_text() == before
    # Once applied, check mode of the same weights says no change, and of other weights shows both sides.
    assert not run_module(traffic_switch.main, weighted_args(nginx, split(10)), capsys).get("failed")
    same = run_module(traffic_switch.main, weighted_args(nginx, split(10)), capsys, check_mode=True, diff=True)
    assert same["changed"] is False and same["diff"]["before"] == same["diff"]["after"]
    other = run_module(traffic_switch.main, weighted_args(nginx, split(25)), capsys, check_mode=True, diff=True)
    assert other["changed"] is True
    assert "weight=90" in other["diff"]["before"] and "weight=75" in other["diff"]["after"]
    assert parse_weights(nginx.upstream_file.read_text()) == split(10)


# -- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    (dict(weights={"blue": 90, "green": 20}), "weights must add up to 100 (got blue 90 + green 20 = 110)"),
    (dict(weights={"blue": 90}), "weights must add up to 100 (got blue 90 + green 0 = 90)"),
    (dict(weights={"blue": 110, "green": -10}), "weights.blue must be 100 or less (got 110)"),
    (dict(weights={"blue": 100, "green": -0.5}), "weights.green must be a whole number (got -0.5)"),
    (dict(weights={"blue": 90.5, "green": 9.5}), "weights.blue must be a whole number (got 90.5)"),
    (dict(weights={"blue": "ninety", "green": 10}), "weights.blue must be a whole number (got 'ninety')"),
    (dict(weights={"blue": True, "green": 99}), "weights.blue must be a whole number from 0 to 100 (got True)"),
    (dict(weights={"blue": 90, "purple": 10}), "weights names the unknown colour purple; the colours are blue, green"),
    (dict(weights={}), "state=weighted needs weights, the percentage of traffic per colour, for example "
                       "{blue: 90, green: 10}"),
    (dict(weights=split(10), color="green"), "color is for state=active; "),
    (dict(weights=split(10), backup_color="blue"), "backup_color is for state=active; "),
    (dict(weights=split(10), state="active", color="green"),
     "weights is for state=weighted (got state=active); state=active sends all traffic to color"),
    (dict(weights=split(10), backend="kubernetes"),
     "state=weighted is for backend nginx: a Kubernetes Service selector cannot split traffic by weight"),
    (dict(weights=split(10), backends={"blue": ["127.0.0.1:1"]}),
     "weights gives green 10% but backends has no address for colour green (known: blue)"),
    (dict(weights=split(10), verify_weight_sample=5), "verify_weight_sample must be 10 or more (got 5)"),
    (dict(weights=split(10), verify_weight_tolerance=-1.0), "verify_weight_tolerance must be 0 or more (got -1.0)"),
])
def test_bad_weights_are_refused_before_anything_is_touched(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str], change: dict[str, Any], message: str) -> None:
    listing = unchanged_listing(nginx)
    pids = workers(nginx)
    args = dict(weighted_args(nginx, {}), **change)
    result = run_module(traffic_switch.main, args, capsys)
    assert result["failed"] is True
    assert result["msg"].startswith(message), result["msg"]
    assert unchanged_listing(nginx) == listing and workers(nginx) == pids
    assert nginx.serving() == "blue"


def test_every_colour_given_a_weight_must_be_ready_before_anything_is_touched(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    listing = unchanged_listing(nginx)
    pids = workers(nginx)
    dead = nginx.backends(green=[f"127.0.0.1:{free_port()}"])
    refused = run_module(traffic_switch.main, weighted_args(nginx, split(10), backends=dead, precheck_path="/version"),
                         capsys)
    assert refused["failed"] is True and refused["precheck"]["ready"] is False
    assert refused["msg"].startswith(f"switching nginx traffic to weights blue=90 green=10 on {nginx.upstream_file} "
                                     f"failed: refusing to switch {nginx.upstream_file} to weights blue=90 green=10: "
                                     "not every server of green is ready")
    assert [name for name, _ino, _mtime in unchanged_listing(nginx)] == sorted(
        [name for name, _ino, _mtime in listing] + [".grandmodel_upstream.conf.lock"])
    assert nginx.upstream_file.read_text() == render_upstream(UPSTREAM, "blue", [f"127.0.0.1:{nginx.blue.port}"], 8)
    assert workers(nginx) == pids
    # Both colours ready: both are asked, and the metrics say the split.
    metrics = tmp_path / "traffic.prom"
    ok = run_module(traffic_switch.main, weighted_args(nginx, split(10), precheck_path="/version",
                                                       metrics_file=str(metrics)), capsys)
    assert not ok.get("failed"), ok
    assert set(ok["precheck"]["answers"]) == {f"127.0.0.1:{nginx.blue.port}", f"127.0.0.1:{nginx.green.port}"}
    text = metrics.read_text()
    assert 'grandmodel_traffic_weight_percent{color="blue",upstream="grandmodel_backend"} 90' in text
    assert 'grandmodel_traffic_weight_percent{color="green",upstream="grandmodel_backend"} 10' in text
    assert 'grandmodel_traffic_active_color{color="blue",upstream="grandmodel_backend"} 1' in text
    back = run_module(traffic_switch.main, base_args(nginx, color="green", metrics_file=str(metrics)), capsys)
    assert not back.get("failed"), back
    assert 'grandmodel_traffic_weight_percent{color="green",upstream="grandmodel_backend"} 100' in metrics.read_text()
    assert 'grandmodel_traffic_weight_percent{color="blue",upstream="grandmodel_backend"} 0' in metrics.read_text()


# -- restore on failure ------------------------------------------------------------------------------

def test_a_refused_candidate_leaves_the_weighted_file_and_workers_alone(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str]) -> None:
    assert not run_module(traffic_switch.main, weighted_args(nginx, split(10)), capsys).get("failed")
    before = nginx.upstream_file.read_text()
    stat = nginx.upstream_file.stat()
    nginx.write_conf("    upstream grandmodel_backend { server 127.0.0.1:1; }")  # clashes only inside the config
    pids = workers(nginx)
    result = run_module(traffic_switch.main, weighted_args(nginx, split(25)), capsys)
    assert result["failed"] is True
    assert "duplicate upstream" in result["msg"] and "was never replaced" in result["msg"]
    assert result["msg"].startswith("switching nginx traffic to weights blue=75 green=25 on ")
    assert result["weights"] == split(10) and result["active_color"] == "blue"
    assert nginx.upstream_file.read_text() == before
    assert (nginx.upstream_file.stat().st_ino, nginx.upstream_file.stat().st_mtime_ns) == (
        stat.st_ino, stat.st_mtime_ns)
    assert workers(nginx) == pids and leftovers(nginx) == []


def test_a_split_that_does_not_answer_restores_the_previous_weights_with_no_failed_request(
        nginx: NginxUnderTest, capsys: pytest.CaptureFixture[str]) -> None:
    nginx.write_conf(next_upstream=FRONT_DOOR_NEXT_UPSTREAM)
    assert not run_module(traffic_switch.main, weighted_args(nginx, split(10)), capsys).get("failed")
    before = nginx.upstream_file.read_text()
    dead = nginx.backends(green=[f"127.0.0.1:{free_port()}"])  # the new colour's process is gone
    with SteadyClient(nginx) as client:
        result = run_module(traffic_switch.main, weighted_args(nginx, split(50), backends=dead, verify_timeout=2.0),
                            capsys)
        time.sleep(0.3)
    assert result["failed"] is True and result["restored"] is True and result["phase"] == "verifying"
    assert "did not split traffic as blue=50 green=50" in result["msg"]
    assert "green (weight 50) never answered" in result["msg"]
    assert "weights blue=90 green=10 answers again" in result["msg"]
    assert result["restore_verification"]["verified"] is True
    assert result["restore_verification"]["expected_weights"] == split(10)
    assert nginx.upstream_file.read_text() == before
    assert client.failures == [], f"{len(client.failures)} failed of {client.requests}"
    counts = count_answers(nginx, 200)
    assert set(counts) == {"blue", "green"} and abs(counts["green"] - 20) <= 10, counts


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_while_verifying_a_split_restores_and_reports(
        nginx: NginxUnderTest, tmp_path: Path, signame: str) -> None:
    before = nginx.upstream_file.read_text()
    held = HeldVerifyUrl(nginx)
    held.start()
    proc = start_module(weighted_args(nginx, split(25), verify_url=held.url + "/version", verify_timeout=60),
                        tmp_path, "sig")
    try:
        wait_until(lambda: "green" in count_answers(nginx, 20), 20, "the split to take traffic")
        proc.send_signal(getattr(signal, signame))
        time.sleep(0.2)
        held.held = False
        result = finish(proc)
    finally:
        held.stop()
        if proc.poll() is None:
            proc.kill()
    assert result["failed"] is True and result["interrupted"] == signame and result["phase"] == "verifying"
    assert f"weights blue=75 green=25 on {nginx.upstream_file} was interrupted by {signame}" in result["msg"]
    assert result["restore_verification"]["verified"] is True
    assert nginx.upstream_file.read_text() == before
    assert count_answers(nginx, 50) == {"blue": 50}
    assert leftovers(nginx) == []


def test_a_weighted_switch_killed_outright_is_undone_by_the_next_run(
        nginx: NginxUnderTest, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = nginx.upstream_file.read_text()
    held = HeldVerifyUrl(nginx)
    held.start()
    proc = start_module(weighted_args(nginx, split(25), verify_url=held.url + "/version", verify_timeout=60),
                        tmp_path, "kill")
    try:
        wait_until(lambda: "green" in count_answers(nginx, 20), 20, "the split to take traffic")
        proc.kill()  # SIGKILL: no handler runs, nothing is restored
        proc.communicate(timeout=10)
    finally:
        held.stop()
    assert parse_weights(nginx.upstream_file.read_text()) == split(25)
    assert leftovers(nginx) == [".grandmodel_upstream.conf.pending"]
    # The next run undoes the dead switch under the lock first, then plans from the restored file.
    result = run_module(traffic_switch.main, weighted_args(nginx, split(25)), capsys, diff=True)
    assert not result.get("failed"), result
    assert "a switch to weights blue=75 green=25" in result["recovered"]
    assert "had died without finishing" in result["recovered"] and "reloaded nginx" in result["recovered"]
    assert result["diff"]["before"] == before  # the one-colour file the dead switch replaced
    assert result["changed"] is True and result["verified"] is True
    assert result["verification"]["expected_weights"] == split(25)
    assert leftovers(nginx) == []
    assert_split(count_answers(nginx), split(25))


# -- the verifier on its own -------------------------------------------------------------------------

def test_the_split_verifier_waits_for_a_clean_window_and_sizes_it_for_small_weights() -> None:
    # Old workers answer blue only for a moment after the reload; the window slides past them.
    answers = iter(["blue"] * 30 + ["blue", "green"] * 100)
    verifier = FrontDoorVerifier("http://127.0.0.1:1/version", timeout=5, weight_sample=20, weight_tolerance=0)
    verifier._answer = lambda: next(answers)  # type: ignore[method-assign]
    evidence = verifier.verify_weights(split(50))
    assert evidence["verified"] is True and evidence["window"] == 20
    assert evidence["window_counts"] == {"blue": 10, "green": 10}
    assert evidence["requests"] == 50  # the first window with no answer of the blue-only moment in it
    assert verifier.weight_window(split(1)) == 300  # 1% expects 3 answers in 300
    assert verifier.weight_window({"blue": 100}) == 20


def test_the_split_verifier_fails_with_the_window_as_evidence() -> None:
    clock = iter(x * 0.01 for x in range(100000))
    verifier = FrontDoorVerifier("http://127.0.0.1:1/version", timeout=1, weight_sample=10, weight_tolerance=5,
                                 clock=lambda: next(clock))
    verifier._answer = lambda: "blue"  # type: ignore[method-assign]
    with pytest.raises(TrafficSwitchError) as info:
        verifier.verify_weights({"blue": 0, "green": 100})
    assert "did not split traffic as blue=0 green=100 within 1.0s over the last 10 answers" in str(info.value)
    assert "answers from outside the split: blue x10" in str(info.value)
    assert "green (weight 100) never answered" in str(info.value)
    evidence = info.value.result["verification"]
    assert evidence["verified"] is False and evidence["window_counts"] == {"blue": 10}


def test_switch_traffic_with_weights_from_a_missing_file_in_check_mode(
        tmp_path: Path, ansible_module: AnsibleModule) -> None:
    upstream = tmp_path / "up.conf"
    backend = NginxBackend(str(upstream), module=ansible_module, backends={"blue": ["a:1"], "green": ["b:2"]})
    result = switch_traffic(backend, None, check_mode=True, want_diff=True, weights=split(10))
    assert (result["changed"], result["active_color"], result["weights"]) == (True, "blue", split(10))
    assert result["diff"]["before"] == "" and "# weights: blue=90 green=10" in result["diff"]["after"]
    assert os.listdir(tmp_path) == []
