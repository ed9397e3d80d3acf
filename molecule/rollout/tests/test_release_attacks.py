"""Attacks on the release's promises (issue 14), through the scenario's real nginx front door under load.

Runs after test_release_analysis.py: blue serves 2026.11.0, green holds 2026.11.1 and is stopped (on hosts fresh from
converge green holds nothing: the first release below deploys it). The module's fixture starts green, the releases
promote it with `rollout_deploy=false` over weighted steps [10, 100] with 4 s step windows and the steps' Prometheus
analysis on (test_release_analysis.py's settings), and the module leaves blue live and green stopped for
test_rollback_version.py. An independent client on this machine sends 60 predictions/s through the front door and
logs every answer's status and serving colour; a watcher logs each split of the load balancer's upstream file
(test_weighted_walk.py's). Never the playbook's word.

1. a client's X-GrandModel-Probe header does not cross the front door: its predictions are counted in the live
   colour's client series (requests and predictions), not in its probe series (exact deltas of its /metrics); the
   same header sent to the colour's own port is counted as a probe (the count can tell them apart);
2. Prometheus stopped as soon as the 10% split is live (the step's analysis window): the analysis is inconclusive
   (prometheus_unreachable), the release aborts at step 1 (the rollout's decision for inconclusive), every load
   balancer serves blue alone again, 0 failed requests; Prometheus is started again and ready;
3. green hung (SIGSTOP) 1 s into the 10% step's window and left hung until the release ends: aborted at step 1,
   never promoted, 0 failed requests (nginx retries what green holds on blue), green continued and ready afterwards;
4. two release runs started at the same instant: exactly one takes the release lock (roles/rollout/tasks/lock.yml)
   and promotes green, the other is refused before it changes anything, naming the holder; the upstream went
   blue -> green once, 0 failed requests, no lock left; a lock left by a dead run is refused as stale, with the
   way to take it over;
5. the controller killed (SIGKILL to ansible-playbook's process group) while blue has 10% of a release: the split
   is served without it, switch_back.yml returns every answer to green with the dead run's lock in place, a release
   is refused naming the dead run and how to take its lock over, and a release with -e rollout_lock_break=<id> takes
   it over and promotes blue (2026.11.0, its warm copy): 0 failed requests throughout, no record from the dead run,
   the lock given back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
EPHEMERAL = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent"))
sys.path.insert(0, str(PROJECT / "scripts"))

from frontdoor_load import sample_body  # noqa: E402

# The scenario's hosts and helpers, as the other files of the scenario define them.
from test_release_analysis import CA_ON_LB, analysis_vars, on_ops  # noqa: E402
from test_rollout import (  # noqa: E402
    APP,
    FRONT,
    LB,
    OPS,
    app,
    container_ip,
    container_pid,
    front_color,
    playbook,
    playbook_argv,
    records,
    signal_colour,
    wait_green_ready,
)
from test_weighted_walk import (  # noqa: E402
    case_figures,
    lb_upstream,
    report_cases,
    said_by,
    share,
    split_of,
    under_load,
)

RELEASE = "2026.11.1"
STEPS = [10, 100]
WINDOW_S = 4
LOCK = "/var/lib/grandmodel/rollout.lock"
PREDICT = "/v1/models/strategic/predict"
TENTH = "blue=90 green=10"
RESULTS: dict[str, dict[str, Any]] = {}
STATE: dict[str, Any] = {}

testinfra_hosts = [f"ansible://{APP}"]


def attack_vars() -> Path:
    """The releases' extra variables: test_release_analysis.py's Prometheus analysis, 4 s windows, no database."""
    shared = analysis_vars()
    settings = json.loads(shared.read_text())
    shared.unlink()
    # The records stay in the file only (test_release_analysis.py proves them in PostgreSQL): a few seconds less each.
    settings.update(rollout_weight_steps=STEPS, rollout_step_analysis_seconds=WINDOW_S, rollout_records_db_host="")
    path = EPHEMERAL / "release_attacks.json"
    path.write_text(json.dumps(settings))
    path.chmod(0o600)
    return path


def app_file(path: str) -> Path:
    """A file of the app container, read from this machine."""
    return Path(f"/proc/{container_pid(APP)}/root{path}")


def series(port: int) -> dict[str, float]:
    """The colour's own counts of strategic predictions: answered to clients (200), to probes, and served."""
    with urllib.request.urlopen(f"http://{container_ip(APP)}:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()

    def total(pattern: str) -> float:
        return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))

    route = rf'route="{PREDICT}"'
    return {
        "client": total(rf'^grandmodel_http_requests_total\{{[^}}]*{route}[^}}]*status="200"[^}}]*\}}\s+(\S+)'),
        "probe": total(rf"^grandmodel_probe_requests_total\{{[^}}]*{route}[^}}]*\}}\s+(\S+)"),
        "predictions": total(r'^grandmodel_predictions_total\{[^}]*model="strategic"[^}]*\}\s+(\S+)'),
    }


def predict(url: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=sample_body(), headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()
        return int(resp.status)


def prometheus_ready(timeout: float = 60) -> bool:
    """/-/ready of the ops host's Prometheus (TLS with the scenario's CA, the web login) answers 200."""
    password = (EPHEMERAL / "secrets" / "monitoring_web_password").read_text().split()[0]
    context = ssl.create_default_context(cafile=str(EPHEMERAL / "secrets" / "pki" / "ca.crt"))
    context.check_hostname = False
    auth = "Basic " + b64encode(f"grandmodel:{password}".encode()).decode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            req = urllib.request.Request(f"https://{container_ip(OPS)}:9090/-/ready", headers={"Authorization": auth})
            with urllib.request.urlopen(req, timeout=3, context=context) as resp:
                if resp.status == 200:
                    return True
        time.sleep(0.5)
    return False


def release(vars_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    deploy = "true" if STATE.get("deploy") else "false"
    proc = playbook(
        "rollout.yml",
        "-e",
        f"release_version={RELEASE}",
        "-e",
        f"rollout_deploy={deploy}",
        "-e",
        f"@{vars_file}",
        *extra,
    )
    if proc.returncode == 0 or "aborted at weighted step" in said_by(proc):
        STATE["deploy"] = False  # green holds the release now
    return proc


def assert_aborted_at_the_first_step(
    host: Any, proc: subprocess.CompletedProcess[str], case: dict[str, Any], before: int
) -> dict[str, Any]:
    """Aborted at step 1, blue alone in the upstream and through the front door, green never got more than 10%."""
    assert proc.returncode != 0, said_by(proc)[-4000:]
    assert "aborted at weighted step 1 of 2 (10% to green)" in said_by(proc), said_by(proc)[-4000:]
    assert split_of(lb_upstream()) == "blue=100"
    assert front_color() == "blue"
    splits = [s["split"] for s in case["splits"]]
    assert not any(s.startswith("green=100") for s in splits), case["splits"]
    assert splits[-1] == "blue=100" and share(case["splits"][-1], "blue") == 100.0, case["splits"]
    (record,) = records(host)[before:]
    assert record["outcome"] == "aborted_step", record
    failed_step = record["evidence"]["failed_step"]
    assert int(failed_step["step"]["weight"]) == 10, failed_step
    assert not app_file(LOCK).exists(), "the aborted release left its lock"
    return dict(failed_step)


@pytest.fixture(scope="module")
def vars_file() -> Iterator[Path]:
    subprocess.run(["podman", "cp", str(EPHEMERAL / "secrets" / "pki" / "ca.crt"), f"{LB}:{CA_ON_LB}"], check=True)
    path = attack_vars()
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module", autouse=True)
def green_idle() -> Iterator[None]:
    """Green running the release (or deployed by the first release), blue live; blue live and green stopped after."""
    assert front_color() == "blue"
    held = app_file("/var/lib/grandmodel/colors/green.json")
    STATE["deploy"] = not held.exists() or json.loads(held.read_text()).get("model_version") != RELEASE
    if not STATE["deploy"]:
        app("systemctl", "start", "grandmodel-model@green")
        assert wait_green_ready(120), "green did not become ready"
    yield
    with contextlib.suppress(Exception):
        signal_colour("green", signal.SIGCONT)
        on_ops("systemctl", "start", "prometheus", check=False)
        app("rm", "-f", LOCK, check=False)  # only after a failed case (the cases assert none is left)
        if front_color() != "blue":
            playbook("switch_back.yml", "-e", "rollback_to=blue")
        app("systemctl", "disable", "--now", "grandmodel-model@green", check=False)
    report_cases(RESULTS, "rollout-attacks", "attacks on the release's promises")
    for name, case in RESULTS.items():
        print(f"  {name}: " + json.dumps({k: v for k, v in case.items() if k not in ("splits", "first_failures")}))


def test_a_clients_probe_header_is_stripped_by_the_front_door_and_counted_as_client_traffic(host):
    started = time.monotonic()
    through, direct = 25, 3
    before = series(8001)
    statuses = [predict(f"{FRONT}{PREDICT}", {"X-GrandModel-Probe": "1"}) for _ in range(through)]
    statuses += [
        predict(f"http://{container_ip(APP)}:8001{PREDICT}", {"X-GrandModel-Probe": "1"}) for _ in range(direct)
    ]
    after = series(8001)
    delta = {k: after[k] - before[k] for k in after}
    RESULTS["probe_header_from_a_client"] = {
        "seconds": round(time.monotonic() - started, 1),
        "through_front_door": through,
        "direct": direct,
        "delta": delta,
    }
    assert statuses == [200] * (through + direct)
    # Through the front door: clients (the header dropped); to the colour's own port: a probe, as a gate's.
    assert delta == {"client": through, "probe": direct, "predictions": through}, delta


def test_prometheus_stopped_during_a_steps_analysis_aborts_the_release(host, vars_file):
    before = len(records(host))
    stopped: dict[str, float] = {}

    def stop_prometheus() -> None:
        on_ops("systemctl", "stop", "prometheus")
        stopped["at"] = time.monotonic()

    STATE["deployed"] = STATE["deploy"]
    try:
        proc, report, watcher, elapsed = under_load(lambda: release(vars_file), act_on=TENTH, act=stop_prometheus)
    finally:
        on_ops("systemctl", "start", "prometheus")
        restarted = prometheus_ready()
    case = case_figures(
        RESULTS, "prometheus_stopped_mid_step", report, watcher, elapsed, [proc], deployed=STATE["deployed"]
    )
    assert watcher.fired_at is not None, said_by(proc)[-4000:]
    assert report.failed == [], case
    failed_step = assert_aborted_at_the_first_step(host, proc, case, before)
    analysis = failed_step["prometheus"]
    case["analysis"] = {k: analysis.get(k) for k in ("outcome", "reason", "message")}
    assert (analysis["outcome"], analysis["reason"]) == ("inconclusive", "prometheus_unreachable"), analysis
    # The step gate (the colour's own health, on its own port) passed: only the missing analysis stopped it.
    (gate,) = failed_step["gate"].values()
    assert gate["verdict"] == "passed", failed_step
    assert restarted and on_ops("systemctl", "is-active", "prometheus").stdout.strip() == "active"


def test_a_colour_hung_during_a_steps_window_is_never_promoted_and_recovers(host, vars_file):
    assert wait_green_ready(120), "green is not ready"
    before = len(records(host))
    moments: dict[str, Any] = {}
    safety = threading.Timer(90, signal_colour, ("green", signal.SIGCONT))  # the fault is bounded in any case

    def hang_green() -> None:
        time.sleep(1.0)  # inside the step's 4 s window, after its first measurements
        moments["stopped_pids"] = signal_colour("green", signal.SIGSTOP)
        moments["at"] = time.monotonic()

    safety.start()
    try:
        proc, report, watcher, elapsed = under_load(lambda: release(vars_file), act_on=TENTH, act=hang_green)
    finally:
        signal_colour("green", signal.SIGCONT)
        safety.cancel()
    continued = time.monotonic()
    case = case_figures(
        RESULTS,
        "green_hung_mid_step",
        report,
        watcher,
        elapsed,
        [proc],
        hung_s=round(continued - moments.get("at", continued), 1),
    )
    assert moments.get("stopped_pids"), said_by(proc)[-4000:]
    assert report.failed == [], case
    failed_step = assert_aborted_at_the_first_step(host, proc, case, before)
    case["message"] = failed_step["message"][:300]
    # Continued: no process of green left stopped, and it answers ready again.
    for pid in signal_colour("green", signal.SIGCONT):
        with contextlib.suppress(OSError):
            assert Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "T", pid
    assert wait_green_ready(60), "green did not answer ready after SIGCONT"
    case["ready_again_s"] = round(time.monotonic() - continued, 1)


def test_two_releases_at_once_one_takes_the_lock_the_other_is_refused(host):
    assert wait_green_ready(120), "green is not ready"
    before = len(records(host))
    barrier = threading.Barrier(2)
    runs: list[subprocess.CompletedProcess[str]] = []

    def one() -> None:
        barrier.wait()
        runs.append(playbook("rollout.yml", "-e", f"release_version={RELEASE}", "-e", "rollout_deploy=false"))

    def both() -> None:
        threads = [threading.Thread(target=one) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)

    _, report, watcher, elapsed = under_load(both)
    case = case_figures(RESULTS, "two_releases_at_once", report, watcher, elapsed, runs)
    assert len(runs) == 2
    won = [r for r in runs if r.returncode == 0]
    lost = [r for r in runs if r.returncode != 0]
    assert len(won) == 1 and len(lost) == 1, [said_by(r)[-2000:] for r in runs]
    refusal = said_by(lost[0])
    assert f"release {RELEASE} refused: another release run holds the release lock {APP}:{LOCK}" in refusal, refusal[
        -3000:
    ]
    assert "Wait for it to end" in refusal
    case["refusal"] = refusal[refusal.index("release 2026.11.1 refused") :][:400]
    # One release, one record, one flip: blue alone, then green with blue as its backup, and nothing else.
    assert front_color() == "green"
    (record,) = records(host)[before:]
    assert record["outcome"] == "success", record
    splits = [s["split"] for s in case["splits"]]
    assert splits[splits.index("blue=100") :] == ["blue=100", "green=100 +backup blue"], case["splits"]
    assert report.failed == [], case
    assert not app_file(LOCK).exists(), "the release left its lock"


def test_a_lock_left_by_a_dead_run_is_refused_as_stale_with_the_way_to_take_it_over(host):
    started = time.monotonic()
    holder = {
        "id": "20261204T000000Z-2026.11.9-deadrun0",
        "release": "2026.11.9",
        "who": "ci",
        "controller": "gone",
        "awx_job_id": "",
        "started": "2026-12-04T00:00:00Z",
        "started_epoch": int(time.time()) - 7200,
    }
    app("sh", "-c", f"printf '%s' '{json.dumps(holder)}' > {LOCK}")
    try:
        proc = playbook("rollout.yml", "-e", "release_version=2026.11.0")
    finally:
        left = app_file(LOCK).read_text() if app_file(LOCK).exists() else ""
        app("rm", "-f", LOCK)
    refusal = said_by(proc)
    RESULTS["stale_lock"] = {
        "seconds": round(time.monotonic() - started, 1),
        "returncode": proc.returncode,
        "refusal": refusal[refusal.find("release 2026.11.0 refused") :][:600],
    }
    assert proc.returncode != 0
    assert (
        "another release run holds the release lock" in refusal and "older than rollout_lock_stale_seconds" in refusal
    ), refusal[-3000:]
    assert f"-e rollout_lock_break={holder['id']}" in refusal
    assert json.loads(left) == holder, "the refused run touched another run's lock"
    assert front_color() == "green"


def test_a_release_run_killed_mid_step_drops_nothing_and_its_lock_is_taken_over(host, vars_file):
    """The controller killed (SIGKILL to ansible-playbook and its workers) while 10% goes to the new colour: the
    front door keeps both colours' split without it and drops nothing; switch_back.yml returns every answer to
    the live colour with the dead run's lock still in place (a rollback is never blocked); the lock keeps naming
    the dead run until a release takes it over with -e rollout_lock_break=<its id>, which then promotes."""
    assert front_color() == "green"  # the two-releases case promoted green; blue (2026.11.0) is its warm backup
    before = len(records(host))
    cmd = playbook_argv("rollout.yml", "-e", "release_version=2026.11.0", "-e", "rollout_deploy=false",
                        "-e", f"@{vars_file}")
    moments: dict[str, Any] = {}

    def killed_then_switched_back() -> list[subprocess.CompletedProcess[str]]:
        run = subprocess.Popen(cmd, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
        moments["popen"] = run
        out, _ = run.communicate(timeout=600)
        killed = subprocess.CompletedProcess(cmd, run.returncode, out, "")
        time.sleep(3.0)  # the split is served with no controller at all
        moments["lock"] = app_file(LOCK).read_text() if app_file(LOCK).exists() else ""
        back = playbook("switch_back.yml", "-e", "rollback_to=green")
        return [killed, back]

    def kill_controller() -> None:
        os.killpg(moments["popen"].pid, signal.SIGKILL)

    runs, report, watcher, elapsed = under_load(killed_then_switched_back, act_on="blue=10 green=90",
                                                act=kill_controller)
    case = case_figures(RESULTS, "controller_killed_mid_step", report, watcher, elapsed, runs)
    killed, back = runs
    assert watcher.fired_at is not None, said_by(killed)[-4000:]
    assert killed.returncode == -signal.SIGKILL, said_by(killed)[-4000:]
    assert back.returncode == 0, said_by(back)[-4000:]
    assert report.failed == [], case
    splits = [s["split"] for s in case["splits"]]
    assert "blue=10 green=90" in splits and not any(s.startswith("blue=100") for s in splits), case["splits"]
    assert split_of(lb_upstream()).startswith("green=100") and front_color() == "green"
    # Blue answered its 10% while the controller was dead, and nothing after the switch back.
    assert share(case["splits"][-1], "green") == 100.0, case["splits"]
    # The dead run left no record and its lock, naming it.
    holder = json.loads(moments["lock"])
    case["dead_lock"] = holder["id"]
    assert holder["release"] == "2026.11.0", holder
    assert records(host)[before:] == []
    assert json.loads(app_file(LOCK).read_text())["id"] == holder["id"]

    # A release (a named rollback alike: it runs the release flow) is refused while the lock names the dead run, and
    # the refusal says how to take it over, not only to wait for a run that will never end.
    refused = playbook("rollout.yml", "-e", "release_version=2026.11.0", "-e", "rollout_deploy=false")
    refusal = said_by(refused)
    case["refusal"] = refusal[refusal.find("release 2026.11.0 refused"):][:700]
    assert refused.returncode != 0 and "Wait for it to end" in refusal, refusal[-3000:]
    assert f"-e rollout_lock_break={holder['id']} takes it over" in refusal, refusal[-3000:]
    assert json.loads(app_file(LOCK).read_text())["id"] == holder["id"]

    # Taken over by the next release, which promotes blue (2026.11.0) and gives the lock back.
    runs, report, watcher, elapsed = under_load(
        lambda: playbook("rollout.yml", "-e", "release_version=2026.11.0", "-e", "rollout_deploy=false",
                         "-e", f"@{vars_file}", "-e", f"rollout_lock_break={holder['id']}"))
    taken = case_figures(RESULTS, "lock_taken_over", report, watcher, elapsed, [runs])
    assert runs.returncode == 0, said_by(runs)[-4000:]
    assert report.failed == [], taken
    assert front_color() == "blue"
    (record,) = [r for r in records(host)[before:] if r.get("outcome") == "success"]
    assert record["to_version"] == "2026.11.0", record
    assert not app_file(LOCK).exists(), "the release that took the lock over did not give it back"
