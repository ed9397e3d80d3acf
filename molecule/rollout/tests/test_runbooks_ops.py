"""security_incident and maintenance (playbooks/runbooks/) through the scenario's real front door.

Runs after test_runbooks.py: blue serves 2026.11.0 live, green holds the refused release 2026.11.9-badgolden and is
stopped (test_weighted_walk.py relies on that, so every test here leaves it so). One app host: the front door has
no other server, which is what the refusals are about.

The figures come from an independent client on this machine (test_runbooks.SteadyClient or
frontdoor_load.LoadGenerator: every answer's time, status, 503 reason or serving colour) and from the hosts
themselves (the service's /admin API asked with the old and the new token, apt-mark, the upstream file), never
from the playbook's word.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from test_runbooks import (
    APP,
    LB,
    PORTS,
    SteadyClient,
    app_ip,
    lb_path,
    live_color,
    output_of,
    podman,
    recap_changes,
    runbook,
)

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(PROJECT / "scripts"))

from frontdoor_load import LoadGenerator  # noqa: E402

UPSTREAM = "/etc/nginx/grandmodel/upstream.conf"
OUTAGE = "/etc/nginx/grandmodel/halt.d/10-maintenance.conf"
RESULTS: dict[str, Any] = {}


def token_file() -> Path:
    return Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "admin_token"


def admin_status(port: int, token: str) -> int:
    """The status the colour on `port` answers GET /admin/status with this bearer token."""
    req = urllib.request.Request(f"http://{app_ip()}:{port}/admin/status", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def app(*cmd: str) -> str:
    return podman("exec", APP, *cmd, check=False)


def idle_state(color: str) -> tuple[str, str, str]:
    """The colour's unit state, release link and settings without the token line (test_weighted_walk relies on
    green's)."""
    settings = app("grep", "-v", "^GRANDMODEL_ADMIN_TOKEN=", f"/etc/grandmodel/{color}.env")
    state = app("systemctl", "is-active", f"grandmodel-model@{color}").strip()
    return ("running" if state == "active" else "stopped",
            app("readlink", f"/opt/grandmodel/colors/{color}").strip(), settings)


@pytest.fixture(scope="module")
def workdir() -> Path:
    path = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "runbooks_ops"
    subprocess.run(["rm", "-rf", str(path)], check=True)
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module", autouse=True)
def never_leave_an_outage() -> Any:
    """Whatever happens here, the front door serves again afterwards; the figures are printed."""
    yield
    if lb_path(OUTAGE).exists():
        podman("exec", LB, "rm", "-f", OUTAGE)
        podman("exec", LB, "systemctl", "reload", "nginx")
    print("\nops runbooks in the rollout scenario:", json.dumps(RESULTS))


# -- security_incident ----------------------------------------------------------------------------------

def test_isolating_the_only_app_host_is_refused_and_changes_nothing(workdir: Path) -> None:
    token = token_file().read_text()
    upstream = lb_path(UPSTREAM).read_text()
    proc = runbook("security_incident.yml", "-e", json.dumps({
        "isolate_host": APP, "runbook_reports_dir": str(workdir / "reports"),
        "security_incident_files": {"service_admin": str(token_file())},
        "security_incident_rotate": ["service_admin"]}))
    assert proc.returncode != 0
    assert (f"isolating {APP} would leave the front doors {LB} with no server" in output_of(proc)
            and "security_incident_allow_outage=true" in output_of(proc)), output_of(proc)[-2000:]
    assert token_file().read_text() == token
    assert lb_path(UPSTREAM).read_text() == upstream
    assert not list(lb_path("/etc/nginx/grandmodel/halt.d").glob("10-*"))


def test_the_admin_token_is_rotated_with_no_failed_request(workdir: Path) -> None:
    old = token_file().read_text().strip()
    upstream = lb_path(UPSTREAM).read_text()
    live = live_color()
    idle = next(c for c in PORTS if c != live)
    idle_before = idle_state(idle)
    assert admin_status(PORTS[live], old) == 200
    gen = LoadGenerator(port=28080, rate=40.0, workers=8, seconds=600, max_requests=50_000).start()
    time.sleep(2.0)
    started = time.monotonic()
    proc = runbook("security_incident.yml", "-e", json.dumps({
        "runbook_reports_dir": str(workdir / "reports"), "security_incident_rotate": ["service_admin"],
        "security_incident_files": {"service_admin": str(token_file())},
        "security_incident_reason": "token leaked (scenario)"}))
    playbook_s = time.monotonic() - started
    time.sleep(2.0)
    summary = gen.stop().summary()
    RESULTS["security_incident"] = {"playbook_s": round(playbook_s, 1), **{
        k: summary[k] for k in ("requests", "failed", "by_status", "by_color", "color_sequence_settled",
                                "retried_reused_connection")}}
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    new = token_file().read_text().strip()
    assert new != old and len(new) == 40
    assert new not in proc.stdout + proc.stderr, "the new token was printed"
    # The running service: the old token is refused, the new one accepted.
    assert (admin_status(PORTS[live], old), admin_status(PORTS[live], new)) == (401, 200)
    # Every answer of the steady load, counted here: none failed; the idle colour carried it while the live one
    # restarted.
    assert summary["failed"] == 0, summary
    assert summary["color_sequence_settled"] == [live, idle, live], summary
    # The front door is as it was, and so is the idle colour (its own state and release; its settings, when it
    # has some, carry the new token).
    assert lb_path(UPSTREAM).read_text() == upstream
    assert idle_state(idle) == idle_before
    if idle_before[2]:
        assert app("grep", "-c", f"^GRANDMODEL_ADMIN_TOKEN={new}$", f"/etc/grandmodel/{idle}.env").strip() == "1"
    (report_dir,) = (workdir / "reports").glob("security_incident-*")
    report = json.loads((report_dir / "report.json").read_text())
    assert report["rotated"] == ["service_admin"]
    assert (report["re_encrypt"], report["plaintext_files"]) == ([], [str(token_file())])
    assert report["app_hosts"][APP]["restarted"] == [idle, live] + ([idle] if idle_before[0] == "running" else [])
    for text in ((report_dir / "report.json").read_text(), (report_dir / "report.md").read_text()):
        assert new not in text and old not in text


def test_a_check_mode_run_says_what_it_would_do_and_changes_nothing(workdir: Path) -> None:
    token = token_file().read_text()
    upstream = lb_path(UPSTREAM).read_text()
    live_pid = app("systemctl", "show", "-p", "MainPID", f"grandmodel-model@{live_color()}")
    proc = runbook("security_incident.yml", "--check", "-e", json.dumps({
        "runbook_reports_dir": str(workdir / "check"), "security_incident_rotate": ["service_admin"],
        "security_incident_files": {"service_admin": str(token_file())}}))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "check mode: would generate new values for service_admin" in output_of(proc)
    live = live_color()
    idle = next(c for c in PORTS if c != live)
    assert f"restart {idle} (staged on the live release), switch to it, restart {live}" in output_of(proc)
    assert recap_changes(proc.stdout) == 0, proc.stdout[-3000:]
    assert token_file().read_text() == token and lb_path(UPSTREAM).read_text() == upstream
    assert app("systemctl", "show", "-p", "MainPID", f"grandmodel-model@{live_color()}") == live_pid
    assert not (workdir / "check").exists()


# -- maintenance ----------------------------------------------------------------------------------------

def test_maintenance_with_one_app_host_is_refused_and_changes_nothing(workdir: Path) -> None:
    held = app("apt-mark", "showhold")
    upstream = lb_path(UPSTREAM).read_text()
    proc = runbook("maintenance.yml", "-e", json.dumps({"maintenance_apt_hold": ["sudo"],
                                                        "runbook_reports_dir": str(workdir / "reports")}))
    assert proc.returncode != 0
    assert (f"taking {APP} out would leave the front doors {LB} with no server" in output_of(proc)
            and "maintenance_allow_outage=true" in output_of(proc)), output_of(proc)[-2000:]
    assert app("apt-mark", "showhold") == held
    assert lb_path(UPSTREAM).read_text() == upstream and not lb_path(OUTAGE).exists()


def test_maintenance_with_allow_outage_answers_503_then_serves_with_no_failed_request(workdir: Path) -> None:
    # A held package must stay at its version: an upgradable one when the mirror has any, else sudo.
    app("apt-get", "update", "-qq")
    upgradable = [line.split("/")[0] for line in app("apt", "list", "--upgradable").splitlines() if "/" in line]
    package = upgradable[0] if upgradable else "sudo"
    version = app("dpkg-query", "-W", "-f", "${Version}", package)
    live = live_color()
    live_pid = app("systemctl", "show", "-p", "MainPID", "--value", f"grandmodel-model@{live}").strip()
    client = SteadyClient(seconds=400).start()
    time.sleep(2.0)
    started = time.monotonic()
    proc = runbook("maintenance.yml", "-e", json.dumps({
        "maintenance_apt_hold": [package], "maintenance_allow_outage": True,
        "runbook_reports_dir": str(workdir / "reports")}))
    playbook_s = time.monotonic() - started
    time.sleep(4.0)
    answers = client.stop()
    try:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        window = [a for a in answers if a.status == 503]
        assert window, "the front door never answered 503 during the window"
        assert {a.error for a in window} == {"maintenance"}, {a.error for a in window}
        last_503 = max(a.received for a in window)
        after = [a for a in answers if a.sent > last_503]
        failed_after = [a for a in after if a.status != 200]
        before = [a for a in answers if a.sent < started]
        RESULTS["maintenance"] = {"playbook_s": round(playbook_s, 1), "requests": len(answers),
                                  "answered_503_maintenance": len(window), "requests_after_window": len(after),
                                  "failed_after_window": len(failed_after), "held": package,
                                  "upgradable_before": len(upgradable)}
        assert all(a.status == 200 for a in before)
        assert not [a for a in answers if a.status not in (200, 503)], "an answer other than 200 or 503 maintenance"
        assert not failed_after and len(after) >= 100, RESULTS["maintenance"]
        assert package in app("apt-mark", "showhold").split()
        assert app("dpkg-query", "-W", "-f", "${Version}", package) == version
        assert app("systemctl", "show", "-p", "MainPID", "--value", f"grandmodel-model@{live}").strip() != live_pid
        assert not lb_path(OUTAGE).exists()
        (report_dir,) = (workdir / "reports").glob("maintenance-*")
        report = json.loads((report_dir / "report.json").read_text())
        assert report["front_door_outage"] is True and report["held"] == [package]
        assert live in report["app_hosts"][APP]["gated"]
    finally:
        app("apt-mark", "unhold", package)
