"""Approval before 100% (issue 14 item 4) through the scenario's real nginx front door, under load.

converge left release 2026.11.0 live on blue (the colours and releases below are those of that start; the test
reads what is live and works from there). An independent client on this machine (scripts/frontdoor_load.py)
sends steady predictions to the front door on 127.0.0.1:28080 and logs every answer's time, status and serving
colour; a watcher reads the load balancer's upstream file every 50 ms (test_weighted_walk.py's); a webhook receiver
on this machine keeps every release notification; the load balancer's textfile (grandmodel_rollout.prom) is read
from this machine through /proc and parsed with prometheus_client. Never the playbook's word.

1. release 2026.11.1 walks [10, 50, 100] with rollout_approval=stop: it ends successfully held at 50/50, the
   client's answers while it is held split about evenly, the state metric says awaiting_approval (weight 50,
   step 2 of 3), a new release is refused meanwhile; rollout_approve.yml -e rollout_decision=promote then switches
   to 100% green with the post-promotion gate: 0 failed requests over the whole release, record success with the
   approval, webhooks for every step, the hold, the decision and the outcome;
2. release 2026.11.0 to blue is held the same way at 50/50; under a change freeze a promotion is refused and an
   abort is not: every load balancer serves green (100%, the old colour) again with 0 failed requests, state
   aborted;
3. the same release held again, its colour killed (kill -9) during the hold and ready again after systemd's
   restart: the promotion refuses the process its gates never measured, every load balancer serves green (100%)
   again, blue is stopped, outcome aborted_switch, no request failed (at most one cut mid-answer).
The scenario's next files expect blue live and green stopped: the module's fixture puts them back.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(PROJECT / "scripts"))

from frontdoor_load import LoadGenerator, Report  # noqa: E402

# The scenario's hosts, files and helpers, as test_rollout.py and test_weighted_walk.py define them.
from test_rollout import (  # noqa: E402  # noqa: E402
    APP,
    LB,
    assert_no_failed_request,
    container_ip,
    front_color,
    front_version,
    lb_file,
    playbook,
    records,
    signal_colour,
)
from test_weighted_walk import (  # noqa: E402
    UpstreamWatcher,
    case_figures,
    lb_upstream,
    report_cases,
    said_by,
    share,
    split_of,
)
from webhook_receiver import WebhookReceiver  # noqa: E402

STATE_METRICS = "/var/lib/prometheus/node-exporter/grandmodel_rollout.prom"
FREEZE = "/etc/grandmodel/change-freeze.json"
RATE = 50.0
HOLD = {"rollout_weight_steps": [10, 50, 100], "rollout_approval": "stop"}
HELD_SECONDS = 5.0  # the client keeps sending while the release is held, no playbook running
RESULTS: dict[str, dict[str, Any]] = {}
RELEASES = ["2026.11.0", "2026.11.1", "2026.11.2"]  # the scenario's releases (prepare.yml)
START: dict[str, str] = {}  # the colour and release live when this file starts (converge: blue, 2026.11.0)

testinfra_hosts = [f"ansible://{APP}"]


class Receiver(WebhookReceiver):
    """The release webhooks this machine heard (the controller sends the notifications), as (event, step) pairs."""

    def events(self) -> list[tuple[str, Any]]:
        out = []
        for body in self.bodies:
            step = body["record"].get("step")
            out.append((body["event"], (step["weight"], step["verdict"]) if step else None))
        return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


def state_metrics() -> dict[str, Any]:
    """The release state the load balancer exports: the current state, weight, step, steps and labels."""
    families = {f.name: f for f in text_string_to_metric_families(lb_file(STATE_METRICS).read_text())}
    states = {s.labels["state"] for s in families["grandmodel_rollout_state"].samples if s.value == 1}
    (sample,) = families["grandmodel_rollout_step_weight_percent"].samples
    return {"states": sorted(states), "weight": sample.value, "labels": sample.labels,
            "index": families["grandmodel_rollout_step_index"].samples[0].value,
            "steps": families["grandmodel_rollout_steps"].samples[0].value,
            "changed": families["grandmodel_rollout_last_change_timestamp_seconds"].samples[0].value}


def weights_of(split: str) -> dict[str, int]:
    return {c: int(w) for c, w in (item.split("=") for item in split.split() if "=" in item)}


def held_then(release: str, then: list[tuple[str, list[str]] | Callable[[], Any]], hooks: Receiver,
              ) -> tuple[list[subprocess.CompletedProcess[str]], dict[str, Any], Report, UpstreamWatcher, float]:
    """Under one steady load: release `release` held for an approval, keep serving HELD_SECONDS, read the state,
    then run each (playbook, args) of `then` in order (a callable in `then` is called there: a fault)."""
    watcher = UpstreamWatcher()
    gen = LoadGenerator(port=28080, rate=RATE, workers=8, seconds=900, max_requests=200_000)
    watcher.start()
    gen.start()
    time.sleep(2.0)
    started = time.monotonic()
    runs: list[subprocess.CompletedProcess[str]] = []
    held: dict[str, Any] = {}
    try:
        runs.append(playbook("rollout.yml", "-e", f"release_version={release}", "-e",
                             json.dumps(HOLD | {"rollout_notify_webhooks": [hooks.url]})))
        if runs[0].returncode == 0:
            time.sleep(HELD_SECONDS)
            held = {"split": split_of(lb_upstream()), "metrics": state_metrics(), "front": front_color()}
            for step in then:
                if callable(step):
                    step()
                    continue
                name, args = step
                runs.append(playbook(name, "-e", json.dumps({"rollout_notify_webhooks": [hooks.url]}), *args))
    finally:
        elapsed = time.monotonic() - started
        time.sleep(2.0)
        report = gen.stop()
        watcher.stop.set()
        watcher.join(timeout=5)
    return runs, held, report, watcher, elapsed


def test_a_release_held_before_100_percent_then_promoted_serves_every_request(host, receiver):
    live = front_version()
    old, old_release = live["color"], live["models"]["strategic"]["version"]
    new = "green" if old == "blue" else "blue"
    release = next(r for r in RELEASES if r != old_release)
    other = next(r for r in RELEASES if r not in (old_release, release))
    START.update(old=old, new=new, old_release=old_release, release=release,
                 new_was_active=host.run(f"systemctl is-active grandmodel-model@{new}").stdout.strip())
    before = len(records(host))
    runs, held, report, watcher, elapsed = held_then(release, [
        ("rollout.yml", ["-e", f"release_version={other}"]),  # refused: a release awaits approval
        ("rollout_approve.yml", ["-e", "rollout_decision=promote"]),
    ], receiver)
    case = case_figures(RESULTS, "held_then_promoted", report, watcher, elapsed, runs)
    assert runs[0].returncode == 0 and len(runs) == 3, runs[0].stdout[-4000:] + runs[0].stderr[-2000:]
    hold, refused, promote = runs
    said = said_by(hold)
    assert f"release {release} awaits approval: every load balancer keeps 50% of the requests on {new}" in said, \
        said[-3000:]
    assert "rollout_approve.yml" in said and "rollout_decision=promote" in said
    # Held: the upstream stayed at 50/50 with no playbook running, and the state metric says so.
    assert weights_of(held["split"]) == {old: 50, new: 50}, held
    metrics = held["metrics"]
    assert metrics["states"] == ["awaiting_approval"], metrics
    assert (metrics["weight"], metrics["index"], metrics["steps"]) == (50, 2, 3), metrics
    assert metrics["labels"] == {"kind": "rollout", "from_color": old, "to_color": new,
                                 "from_version": old_release, "to_version": release}, metrics
    # A new release is refused while this one awaits approval, and changes nothing.
    assert refused.returncode != 0, refused.stderr[-2000:]
    assert f"release {release} awaits approval on {LB}" in said_by(refused), refused.stderr[-2000:]
    # The client's answers while held at 50/50 (the hold, the refused release): about half from green.
    fifty = [s for s in case["splits"] if weights_of(s["split"]) == {old: 50, new: 50}]
    assert len(fifty) == 1 and sum(fifty[0]["answers"].values()) >= RATE * HELD_SECONDS, case["splits"]
    assert abs(share(fifty[0], new) - 50) <= 8, fifty
    # Promoted: 100% green with blue as backup, every request of the whole release answered.
    assert promote.returncode == 0, promote.stdout[-4000:]
    assert front_color() == new
    assert split_of(lb_upstream()) == f"{new}=100 +backup {old}"
    assert report.failed == [], case
    splits = [s["split"] for s in case["splits"]]
    start = splits.index(f"{old}=100")
    assert [weights_of(s) for s in splits[start:]] == [{old: 100}, {old: 90, new: 10}, {old: 50, new: 50},
                                                        {new: 100}], splits
    after = state_metrics()
    assert (after["states"], after["weight"], after["index"]) == (["promoted"], 100, 3), after
    assert after["changed"] > metrics["changed"]
    written = records(host)[before:]
    assert [r["outcome"] for r in written] == ["awaiting_approval", "success"], written
    assert written[0]["id"] == written[1]["id"]
    assert [int(s["weight"]) for s in written[1]["evidence"]["steps"]] == [10, 50]
    assert written[1]["evidence"]["post_promotion"]["verdict"] == "passed"
    assert written[1]["evidence"]["approval"]["decision"] == "promote"
    assert written[1]["evidence"]["approval"]["waited_seconds"] >= HELD_SECONDS
    assert receiver.events() == [("release_started", None), ("release_step", (10, "passed")),
                                 ("release_step", (50, "passed")), ("release_awaiting_approval", None),
                                 ("release_approved", None), ("release_success", None)], receiver.events()


def test_a_held_release_is_aborted_during_a_freeze_a_promotion_is_not(host, receiver):
    """The release live before the first test goes back to its colour, held, then aborted: the first test's
    release keeps serving."""
    old, new, release = START["new"], START["old"], START["old_release"]
    assert front_color() == old
    before = len(records(host))
    freeze = ["-e", json.dumps({"change_freeze": "on", "change_freeze_reason": "trading session"})]
    try:
        runs, held, report, watcher, elapsed = held_then(release, [
            ("runbooks/change_freeze.yml", freeze),  # the pre-market runbook's freeze
            ("rollout_approve.yml", ["-e", "rollout_decision=promote"]),  # refused: frozen
            ("rollout_approve.yml", ["-e", "rollout_decision=abort"]),  # never blocked by a freeze
        ], receiver)
    finally:
        subprocess.run(["podman", "exec", LB, "rm", "-f", FREEZE], check=False)
    case = case_figures(RESULTS, "held_then_aborted", report, watcher, elapsed, runs)
    assert runs[0].returncode == 0 and len(runs) == 4, runs[0].stdout[-4000:] + runs[0].stderr[-2000:]
    _hold, freeze_on, promote, abort = runs
    assert weights_of(held["split"]) == {old: 50, new: 50} and held["metrics"]["states"] == ["awaiting_approval"]
    assert freeze_on.returncode == 0, freeze_on.stdout[-2000:]
    assert promote.returncode != 0, promote.stderr[-3000:]
    assert f"a change freeze is set on {LB}" in said_by(promote), promote.stderr[-3000:]
    assert abort.returncode == 0, abort.stdout[-4000:]
    assert f"aborted at its approval; every load balancer serves {old}" in said_by(abort)
    # 100% of the old colour, no weights, no backup, and not one failed request over the whole release.
    assert split_of(lb_upstream()) == f"{old}=100" and front_color() == old
    assert report.failed == [], case
    assert case["splits"][-1]["split"] == f"{old}=100" and share(case["splits"][-1], old) == 100.0, case["splits"]
    after = state_metrics()
    assert (after["states"], after["weight"], after["labels"]["to_version"]) == (["aborted"], 0, release), after
    written = records(host)[before:]
    assert [r["outcome"] for r in written] == ["awaiting_approval", "aborted_approval"], written
    assert written[1]["evidence"]["approval"]["decision"] == "abort"
    events = receiver.events()
    assert events[-3:] == [("release_awaiting_approval", None), ("release_rejected", None),
                           ("release_aborted_approval", None)], events


def colour_ready(color: str, timeout: float = 120) -> float:
    """Seconds until the colour's own /ready answers 200 (its port on the app host, not through the front door)."""
    port = {"blue": 8001, "green": 8002}[color]
    begun = time.monotonic()
    while time.monotonic() - begun < timeout:
        with contextlib.suppress(OSError), \
                urllib.request.urlopen(f"http://{container_ip(APP)}:{port}/ready", timeout=2) as resp:
            if resp.status == 200:
                return time.monotonic() - begun
        time.sleep(0.2)
    raise AssertionError(f"{color} was not ready within {timeout} s")


def test_a_held_release_whose_colour_was_killed_and_restarted_is_never_promoted(host, receiver):
    """Held at 50/50 again (the second test's release to the same colour), the new colour is killed (kill -9) while
    it serves half the requests; systemd starts it again and it answers ready, healthy to every probe. The
    promotion must refuse it (it is not the process the steps' gates measured): every load balancer back to 100% of
    the old colour, the new one stopped, outcome aborted_switch. The client's every answer is counted."""
    old, new, release = START["new"], START["old"], START["old_release"]
    assert front_color() == old
    before = len(records(host))
    moments: dict[str, Any] = {}

    def kill_then_ready() -> None:
        moments["killed_pids"] = signal_colour(new, signal.SIGKILL)
        moments["ready_again_s"] = round(colour_ready(new), 1)

    runs, held, report, watcher, elapsed = held_then(release, [
        kill_then_ready,
        ("rollout_approve.yml", ["-e", "rollout_decision=promote"]),
    ], receiver)
    case = case_figures(RESULTS, "held_killed_then_promoted", report, watcher, elapsed, runs)
    case.update(moments)
    assert runs[0].returncode == 0 and len(runs) == 2, runs[0].stdout[-4000:] + runs[0].stderr[-2000:]
    assert weights_of(held["split"]) == {old: 50, new: 50} and held["metrics"]["states"] == ["awaiting_approval"]
    assert moments["killed_pids"], "the held colour had no process to kill"
    promote = runs[1]
    assert promote.returncode != 0, promote.stdout[-4000:]
    assert f"stopped at the switch to {new}; every load balancer serves {old} again" in said_by(promote), \
        said_by(promote)[-3000:]
    assert split_of(lb_upstream()) == f"{old}=100" and front_color() == old
    assert host.run(f"systemctl is-active grandmodel-model@{new}").stdout.strip() != "active"
    written = records(host)[before:]
    assert [r["outcome"] for r in written] == ["awaiting_approval", "aborted_switch"], written
    # Half the requests went to the colour when it was killed: nginx retries an answer not begun on the other
    # colour (proxy_next_upstream ... non_idempotent); at most one cut mid-answer, and never a 5xx.
    summary = report.summary()
    case["failed_by_status"] = {k: v for k, v in summary["by_status"].items() if k != "200"}
    assert_no_failed_request(summary)
    assert case["splits"][-1]["split"] == f"{old}=100", case["splits"]


@pytest.fixture(scope="module", autouse=True)
def back_to_blue() -> Iterator[None]:
    """The scenario's next files start from the state this one found (converge's: blue live with 2026.11.0, green
    stopped): the first colour serves again, the other one is stopped unless it was running."""
    yield
    with contextlib.suppress(Exception):
        subprocess.run(["podman", "exec", LB, "rm", "-f", FREEZE], check=False)
        if START and front_color() != START["old"]:
            # The last test's release stops the colour it could not promote: switch_back.yml needs it running.
            subprocess.run(["podman", "exec", APP, "systemctl", "start", f"grandmodel-model@{START['old']}"],
                           check=False)
            colour_ready(START["old"])
            proc = playbook("switch_back.yml", "-e", f"rollback_to={START['old']}")
            RESULTS["back_to_start"] = {"returncode": proc.returncode, "colour": front_color()}
        if START and START["new_was_active"] != "active":
            subprocess.run(["podman", "exec", APP, "systemctl", "disable", "--now",
                            f"grandmodel-model@{START['new']}"], check=False)
    report_cases(RESULTS, "rollout-approval", "approval before 100%")
