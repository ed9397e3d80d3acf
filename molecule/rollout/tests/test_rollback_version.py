"""Rollback to a named release (issue 14 item 6) through the scenario's real nginx front door, under load.

`playbooks/rollback.yml -e rollback_version=<release>` redeploys that release to the idle colour through the release
flow (pre-promotion gate, the scenario's direct switch, post-promotion gate) and switches; a change freeze never blocks
it, and the record names it a rollback with its reason.

Runs after test_market_runbooks.py (blue serves 2026.11.0, no freeze) and leaves blue serving 2026.11.0 for
test_rollout.py. A release to the newer 2026.11.2 goes to green; then, with the change freeze set (the change_freeze
runbook), blue (the warm colour, which still runs 2026.11.0) stopped and its 2026.11.0 release folder deleted on the
app host (as after a retirement and a clean-up: a rollback to the warm colour could not help), the rollback to
2026.11.0 ships the bundle again, starts and gates blue, and switches. An independent client on this machine sends
steady predictions through the front door and reads the release named in each answer's body and the serving colour
from nginx's X-Served-By: 0 failed requests, the releases answering in the order 2026.11.0, 2026.11.2, 2026.11.0, and
every answer after the rollback from 2026.11.0. A rollback to an unknown release is refused under the same load
with nothing changed on either host (files compared byte for byte, the colours' processes the same), and a rollback
to the live release says so and changes nothing. A webhook receiver on this machine hears rollback_started and
release_rolled_back, both with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(PROJECT / "scripts"))

from frontdoor_load import RELOAD_SETTLE_S, LoadGenerator, Report  # noqa: E402

# The scenario's hosts, files and helpers, as test_rollout.py defines them.
from test_rollout import APP, LB, UPSTREAM, app, front_version, lb_file, playbook, recap_changes, records  # noqa: E402
from webhook_receiver import WebhookReceiver  # noqa: E402

OLDER, NEWER = "2026.11.0", "2026.11.2"  # seeds 7 and 9 (prepare.yml)
FREEZE = "/etc/grandmodel/change-freeze.json"
REASON = "fills mispriced since 10:02"
RATE = 40.0
AFTER_S = 4.0  # load kept on after the rollback: every answer then must come from the named release

testinfra_hosts = [f"ansible://{APP}"]


@pytest.fixture(autouse=True)
def never_leave_a_freeze() -> Iterator[None]:
    yield
    subprocess.run(["podman", "exec", LB, "rm", "-f", FREEZE], check=False, timeout=60)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


def versioned_load() -> LoadGenerator:
    return LoadGenerator(port=28080, rate=RATE, workers=8, seconds=900, max_requests=200_000, read_version=True)


def releases_in_order(report: Report, since: float = 0.0) -> list[str]:
    """The releases that answered, in the order of the requests' start, repeats collapsed.

    As Report.colors(settle=...) does for colours: an answer of the previous release to a request that started at
    most RELOAD_SETTLE_S after the first answer of the new one is an nginx reload's overlap (old workers finishing
    requests already on their connections), not a switch back.
    """
    seq: list[str] = []
    switched_at = 0.0
    for r in sorted(report.requests, key=lambda x: x.started):
        if not r.ok or r.started < since or (seq and seq[-1] == r.version):
            continue
        if len(seq) >= 2 and r.version == seq[-2] and r.started - switched_at <= RELOAD_SETTLE_S:
            continue
        seq.append(r.version)
        switched_at = r.started
    return seq


def both_hosts() -> dict[str, str]:
    """Everything a refused rollback must not touch: the upstream, the colours' records and units, the releases."""
    return {
        "upstream": lb_file(UPSTREAM).read_text(),
        "freeze": lb_file(FREEZE).read_text() if lb_file(FREEZE).exists() else "",
        "colours": app("sh", "-c", "cat /var/lib/grandmodel/colors/*.json; ls /opt/grandmodel/models"),
        "processes": app("systemctl", "show", "--property=MainPID,InvocationID,ActiveState",
                         "grandmodel-model@blue", "grandmodel-model@green"),
        "records": app("sh", "-c", "wc -l < /var/lib/grandmodel/deployments.jsonl"),
    }


def test_a_rollback_to_a_named_release_during_a_freeze_redeploys_gates_and_switches(host, receiver):
    live = front_version()
    if live["models"]["strategic"]["version"] != OLDER:  # not after test_market_runbooks (a run of this file alone)
        assert playbook("rollout.yml", "-e", f"release_version={OLDER}").returncode == 0
        live = front_version()
    older_color = live["color"]
    newer_color = "green" if older_color == "blue" else "blue"
    gen = versioned_load().start()
    time.sleep(2.0)
    timings: dict[str, float] = {}
    try:
        started = time.monotonic()
        release = playbook("rollout.yml", "-e", f"release_version={NEWER}")
        timings["release_s"] = round(time.monotonic() - started, 1)
        assert release.returncode == 0, release.stdout[-3000:] + release.stderr[-2000:]
        assert front_version()["models"]["strategic"]["version"] == NEWER
        freeze = playbook("runbooks/change_freeze.yml", "-e", "change_freeze=on",
                          "-e", json.dumps({"change_freeze_reason": "trading session (scenario)"}))
        assert freeze.returncode == 0, freeze.stdout[-3000:]
        # The warm colour gone and its release folder cleaned up: only a redeploy can bring 2026.11.0 back.
        with host.sudo():
            host.run(f"systemctl stop grandmodel-retire-{older_color}.timer")
            host.run_expect([0], f"systemctl stop grandmodel-model@{older_color}")
            host.run_expect([0], f"rm -rf /opt/grandmodel/models/{OLDER}")
        before = len(records(host))
        rollback_started = time.monotonic()
        rollback = playbook("rollback.yml", "-e", f"rollback_version={OLDER}",
                            "-e", json.dumps({"rollback_reason": REASON, "rollout_notify_webhooks": [receiver.url]}))
        rollback_done = time.monotonic()
        timings["rollback_s"] = round(rollback_done - rollback_started, 1)
        time.sleep(AFTER_S)
    finally:
        report = gen.stop()
    said = " ".join((rollback.stdout + rollback.stderr).split())
    after = [r for r in report.requests if r.started >= rollback_done]
    figures = {**timings, **report.summary(), "releases": releases_in_order(report),
               "during_rollback": releases_in_order(report, rollback_started),
               "after_rollback": {"requests": len(after), "by_release": {v: sum(1 for r in after if r.version == v)
                                                                        for v in {r.version for r in after}}},
               "load": os.getloadavg()[0]}
    print("\nrollback to a named release:", json.dumps({k: figures[k] for k in (
        "release_s", "rollback_s", "requests", "failed", "releases", "during_rollback", "after_rollback", "load")}))
    assert rollback.returncode == 0, rollback.stdout[-4000:] + rollback.stderr[-2000:]
    assert "a rollback is never blocked, the freeze is kept in its record" in said, said[-3000:]
    # The client's own count: nothing failed, the named release answers everything once the rollback is done.
    assert report.failed == [], figures["first_failures"]
    assert figures["releases"] == [OLDER, NEWER, OLDER], figures
    assert figures["during_rollback"] == [NEWER, OLDER], figures
    assert len(after) >= RATE * AFTER_S * 0.8 and all(r.ok and r.version == OLDER for r in after), figures
    assert {r.color for r in after} == {older_color}, figures
    assert front_version()["color"] == older_color
    # The freeze is still set: a rollback goes through it, it does not lift it.
    assert json.loads(lb_file(FREEZE).read_text())["reason"] == "trading session (scenario)"
    # Redeployed, not merely switched back: the bundle was shipped again and the colour gated.
    assert host.file(f"/opt/grandmodel/models/{OLDER}/strategic.manifest.json").exists
    (record,) = records(host)[before:]
    assert (record["kind"], record["outcome"]) == ("rollback", "rolled_back"), record
    assert (record["from_color"], record["to_color"]) == (newer_color, older_color), record
    assert (record["from_version"], record["to_version"]) == (NEWER, OLDER), record
    assert record["reason"] == REASON and record["change_freeze"] == "trading session (scenario)", record
    assert record["evidence"]["pre_promotion"]["verdict"] == "passed", record["evidence"]["pre_promotion"]
    assert record["evidence"]["post_promotion"]["verdict"] == "passed", record["evidence"]["post_promotion"]
    # The webhook heard the rollback start and end, each with the reason.
    events = [(b["event"], b["record"]["kind"], b["record"]["reason"]) for b in receiver.bodies]
    assert events == [("rollback_started", "rollback", REASON), ("release_rolled_back", "rollback", REASON)], events
    assert receiver.bodies[1]["record"]["change_freeze"] == "trading session (scenario)", receiver.bodies[1]
    # The colour it replaced stays warm as nginx backup, its retirement armed (as after a release).
    assert f"# backup_color: {newer_color}" in lb_file(UPSTREAM).read_text()
    assert host.run(f"systemctl is-active grandmodel-retire-{newer_color}.timer").stdout.strip() == "active"
    assert host.run(f"systemctl is-active grandmodel-retire-{older_color}.timer").stdout.strip() != "active"


def test_a_rollback_to_an_unknown_release_or_the_live_one_changes_nothing(host):
    live = front_version()
    seen = both_hosts()
    gen = versioned_load().start()
    time.sleep(2.0)
    try:
        unknown = playbook("rollback.yml", "-e", "rollback_version=2026.99.9")
        again = playbook("rollback.yml", "-e", f"rollback_version={live['models']['strategic']['version']}")
        time.sleep(1.0)
    finally:
        report = gen.stop()
    said = " ".join((unknown.stdout + unknown.stderr).split())
    print("\nrefused rollbacks:", json.dumps({"requests": report.total, "failed": len(report.failed),
                                              "releases": releases_in_order(report)}))
    assert unknown.returncode != 0
    assert "cannot roll back to release 2026.99.9: it is unknown" in said, said[-3000:]
    assert f"Nothing was changed; traffic stays on {live['color']}." in said
    assert again.returncode == 0, again.stdout[-3000:]
    assert "is already live on " + live["color"] + ": nothing to do, nothing changed" in again.stdout, \
        again.stdout[-3000:]
    assert recap_changes(again.stdout) == 0
    assert both_hosts() == seen
    assert report.failed == [] and report.total >= RATE * 5, report.summary()
    assert releases_in_order(report) == [live["models"]["strategic"]["version"]]
