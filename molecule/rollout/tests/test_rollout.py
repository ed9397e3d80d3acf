"""The blue-green release flow under load, through the real nginx front door.

converge left release 2026.11.0 live on blue. The tests run in order, each driving
playbooks/rollout.yml or playbooks/rollback.yml against the scenario's hosts while a bounded load
generator (scripts/frontdoor_load.py) sends predictions to the front door published on
127.0.0.1:28080 and logs every request's status and serving colour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(PROJECT / "scripts"))

from frontdoor_load import LoadGenerator, Report  # noqa: E402

FRONT = "http://127.0.0.1:28080"
APP = "gm-mol-rollout-app"
LB = "gm-mol-rollout-lb"
UPSTREAM = "/etc/nginx/grandmodel/upstream.conf"
RATE = 40.0
RESULTS: dict[str, dict[str, object]] = {}

testinfra_hosts = [f"ansible://{APP}"]


def front_color() -> str:
    with urllib.request.urlopen(f"{FRONT}/version", timeout=5) as resp:
        return json.load(resp)["color"]


def playbook(name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(PROJECT / ".venv/bin/ansible-playbook"), "-i", os.environ["MOLECULE_INVENTORY_FILE"],
           str(PROJECT / "playbooks" / name), *extra]
    return subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, timeout=900, check=False)


def under_load(action, seconds_after: float = 2.0) -> tuple[object, Report, float]:
    """Run action() while the front door takes a steady load; return its result and the load."""
    gen = LoadGenerator(port=28080, rate=RATE, workers=8, seconds=900, max_requests=200_000)
    gen.start()
    time.sleep(2.0)
    started = time.monotonic()
    result = action()
    elapsed = time.monotonic() - started
    time.sleep(seconds_after)
    return result, gen.stop(), elapsed


def records(host) -> list[dict[str, object]]:
    text = host.check_output("cat /var/lib/grandmodel/deployments.jsonl 2>/dev/null || true")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def recap_changes(output: str) -> int:
    total = 0
    for line in output.splitlines():
        if " : ok=" in line and "changed=" in line:
            total += int(line.split("changed=")[1].split()[0])
    return total


def test_initial_release_is_live_on_blue(host):
    assert front_color() == "blue"
    assert host.service("grandmodel-model@blue").is_running
    unit = host.file("/etc/systemd/system/grandmodel-model@.service")
    assert unit.contains("^NoNewPrivileges=yes") and unit.contains("^CapabilityBoundingSet=$")
    assert unit.contains("^ProtectSystem=strict")
    env = host.file("/etc/grandmodel/blue.env")
    assert env.user == "grandmodel" and env.mode == 0o400
    # The service runs unprivileged, with no capabilities at all.
    pid = host.check_output("systemctl show -p MainPID --value grandmodel-model@blue")
    status = host.check_output(f"cat /proc/{pid}/status")
    assert "CapEff:\t0000000000000000" in status
    assert host.check_output(f"stat -c %U /proc/{pid}") == "grandmodel"


def test_good_release_switches_to_green_with_zero_failed_requests(host):
    proc, report, elapsed = under_load(lambda: playbook("rollout.yml", "-e", "release_version=2026.11.1"))
    summary = report.summary()
    RESULTS["a_good_release"] = {"seconds": round(elapsed, 1), **summary}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert front_color() == "green"
    assert summary["color_sequence"] == ["blue", "green"], summary
    assert summary["failed"] == 0, summary
    last = records(host)[-1]
    assert last["outcome"] == "success" and last["to_version"] == "2026.11.1" and last["from_color"] == "blue"
    assert last["evidence"]["post_promotion"]["verdict"] == "passed"
    # The old colour stays warm for rollback, with its retirement scheduled.
    assert host.service("grandmodel-model@blue").is_running
    assert host.run("systemctl is-active grandmodel-retire-blue.timer").stdout.strip() == "active"


def test_rerunning_the_live_release_changes_nothing(host):
    before = len(records(host))
    proc = playbook("rollout.yml", "-e", "release_version=2026.11.1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "already live on green" in proc.stdout
    assert recap_changes(proc.stdout) == 0
    assert len(records(host)) == before
    assert front_color() == "green"


def test_rollback_returns_to_the_warm_colour_with_zero_failed_requests(host):
    proc, report, elapsed = under_load(lambda: playbook("rollback.yml"))
    summary = report.summary()
    RESULTS["d_rollback"] = {"seconds": round(elapsed, 1), **summary}
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert front_color() == "blue"
    assert summary["color_sequence"] == ["green", "blue"], summary
    assert summary["failed"] == 0, summary
    assert records(host)[-1]["outcome"] == "rolled_back"
    assert host.run("systemctl is-active grandmodel-retire-blue.timer").stdout.strip() != "active"


def test_release_with_wrong_golden_answers_is_stopped_before_the_switch(host):
    proc, report, elapsed = under_load(lambda: playbook("rollout.yml", "-e", "release_version=2026.11.9-badgolden"))
    summary = report.summary()
    RESULTS["b_bad_golden"] = {"seconds": round(elapsed, 1), **summary}
    assert proc.returncode != 0
    assert "refused by the pre-promotion gate" in proc.stdout + proc.stderr
    assert summary["color_sequence"] == ["blue"], summary
    assert summary["failed"] == 0, summary
    assert front_color() == "blue"
    last = records(host)[-1]
    assert last["outcome"] == "aborted_pre_promotion" and last["to_version"] == "2026.11.9-badgolden"
    assert not host.service("grandmodel-model@green").is_running


def drain_green_once_live(stop: threading.Event, token: str, fired: list[float]) -> None:
    """The new colour starts failing right after it takes traffic: drain it with the admin API."""
    while not stop.is_set():
        try:
            if front_color() == "green":
                subprocess.run(["podman", "exec", APP, "curl", "-sf", "-X", "POST", "-H",
                                f"Authorization: Bearer {token}", "http://127.0.0.1:8002/admin/drain"],
                               capture_output=True, check=False, timeout=30)
                fired.append(time.monotonic())
                return
        except OSError:
            pass
        time.sleep(0.05)


def test_release_that_breaks_after_the_switch_is_switched_back(host):
    token = (Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "admin_token").read_text().strip()
    stop, fired = threading.Event(), []
    saboteur = threading.Thread(target=drain_green_once_live, args=(stop, token, fired), daemon=True)

    def release() -> subprocess.CompletedProcess[str]:
        saboteur.start()
        try:
            return playbook("rollout.yml", "-e", "release_version=2026.11.2")
        finally:
            stop.set()

    proc, report, elapsed = under_load(release)
    summary = report.summary()
    RESULTS["c_breaks_after_switch"] = {"seconds": round(elapsed, 1), **summary}
    assert fired, "the new colour never took traffic"
    assert proc.returncode != 0
    assert "failed the post-promotion gate" in proc.stdout + proc.stderr
    assert "switched back to blue" in proc.stdout + proc.stderr
    assert front_color() == "blue"
    assert summary["color_sequence"][0] == "blue" and summary["color_sequence"][-1] == "blue", summary
    last = records(host)[-1]
    assert last["outcome"] == "rolled_back_post_promotion"
    # Requests answered by the drained colour before the switch back are the price of (c).
    print(f"\n(c) failed requests while green was broken: {summary['failed']} of {summary['requests']}")


def test_broken_nginx_config_from_the_switch_is_refused(host):
    lb = host.get_host(f"ansible://{LB}", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"])
    before = lb.check_output(f"sha256sum {UPSTREAM}")

    def bad_switch() -> subprocess.CompletedProcess[str]:
        args = json.dumps({"state": "active", "color": "green", "upstream_file": UPSTREAM,
                           "backends": {"blue": ["gm-mol-rollout-app:8001"], "green": ["gm-mol-rollout-app:99999"]},
                           "reload_command": ["systemctl", "reload", "nginx"]})
        return subprocess.run([str(PROJECT / ".venv/bin/ansible"), LB, "-i", os.environ["MOLECULE_INVENTORY_FILE"],
                               "-m", "quantnova.grandmodel.traffic_switch", "-a", args],
                              cwd=PROJECT, capture_output=True, text=True, timeout=300, check=False)

    proc, report, _ = under_load(bad_switch)
    summary = report.summary()
    RESULTS["e_broken_config"] = summary
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "nginx" in output and "99999" in output, output[-2000:]
    assert lb.check_output(f"sha256sum {UPSTREAM}") == before
    assert summary["failed"] == 0 and summary["color_sequence"] == ["blue"], summary
    assert front_color() == "blue"


@pytest.fixture(scope="module", autouse=True)
def report_results():
    yield
    out = PROJECT / "reports" / "rollout-scenario.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=2) + "\n")
    print("\nrollout scenario:", json.dumps({k: {kk: v.get(kk) for kk in ("seconds", "requests", "failed")}
                                             for k, v in RESULTS.items()}))
