"""Pre-market and post-market (playbooks/runbooks/) against the scenario's real hosts.

Pre-market sets the change freeze first, verifies the live colour's release (each artifact's sha256 on disk against
its manifest; health, readiness, /version and the golden samples on the colour's own port) and that the front door
answers from it. The tests read the freeze file and the archives from the containers themselves and the live release
from the front door, never from the playbook's word; a tampered artifact and a wrong expected version must be named.
Post-market lifts the freeze, takes the ops host's PostgreSQL backup and reads it back, and archives the day's journal
once per day (no cache host here: Redis snapshots and the failures of backups are proven in molecule/data).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
FRONT = "http://127.0.0.1:28080"
APP = "gm-mol-rollout-app"
LB = "gm-mol-rollout-lb"
OPS = "gm-mol-rollout-ops"  # the scenario's PostgreSQL (group db) and Prometheus
FREEZE = "/etc/grandmodel/change-freeze.json"
ARCHIVE_DIR = "/var/log/grandmodel/archive"


def runbook(name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(PROJECT / ".venv/bin/ansible-playbook"), "-i", os.environ["MOLECULE_INVENTORY_FILE"],
           str(PROJECT / "playbooks" / "runbooks" / name), *extra]
    return subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, timeout=600, check=False)


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, timeout=120)


def host_path(host: str, path: str) -> Path:
    pid = podman("inspect", "-f", "{{.State.Pid}}", host).stdout.strip()
    return Path(f"/proc/{pid}/root{path}")


def front_version() -> dict[str, Any]:
    with urllib.request.urlopen(f"{FRONT}/version", timeout=5) as resp:
        return dict(json.load(resp))


def host_changes(output: str) -> int:
    """changed= of the recap lines of the scenario's hosts (the controller writes its report every run)."""
    return sum(int(line.split("changed=")[1].split()[0]) for line in output.splitlines()
               if " : ok=" in line and line.split()[0] in (APP, LB))


@pytest.fixture(scope="module")
def workdir() -> Path:
    path = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "market-runbooks"
    subprocess.run(["rm", "-rf", str(path)], check=True)
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module", autouse=True)
def never_leave_a_freeze() -> Any:
    """Later tests release: the freeze never outlives this module."""
    yield
    podman("exec", LB, "rm", "-f", FREEZE, check=False)


def reports(workdir: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(workdir.glob(f"reports/{name}-*/report.json"))]


def test_pre_market_sets_the_freeze_and_verifies_the_live_release(workdir: Path) -> None:
    assert not host_path(LB, FREEZE).exists()
    live = front_version()
    version = live["models"]["strategic"]["version"]
    proc = runbook("pre_market.yml", "-e", json.dumps({"runbook_reports_dir": str(workdir / "reports"),
                                                      "pre_market_freeze_reason": "session (scenario)"}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    freeze = json.loads(host_path(LB, FREEZE).read_text())
    assert freeze["reason"] == "session (scenario)"
    (report,) = reports(workdir, "pre_market")
    assert report["ready"] is True and report["problems"] == [], report["problems"]
    assert report["expected_version"] == version
    app = report["app_hosts"][APP]
    assert (app["live_color"], app["version"], app["gate_passed"]) == (live["color"], version, True)
    assert sorted(app["artifacts"]) == sorted(live["models"])
    for name, artifact in app["artifacts"].items():
        assert artifact["ok"] and artifact["found_sha256"] == live["models"][name]["sha256"], artifact
    assert report["front_doors"][LB]["color"] == live["color"]
    assert set(report["front_doors"][LB]["models"].values()) == {version}
    assert "Ready to trade on " + version in next(workdir.glob("reports/pre_market-*/report.md")).read_text()


def test_pre_market_names_a_tampered_artifact_and_a_wrong_expected_version(workdir: Path) -> None:
    live = front_version()
    version = live["models"]["tactical"]["version"]
    artifact = f"/opt/grandmodel/models/{version}/tactical-{version}.pt"
    podman("exec", APP, "cp", "-a", artifact, artifact + ".scenario-orig")
    try:
        podman("exec", APP, "sh", "-c", f"printf x >> {artifact}")
        proc = runbook("pre_market.yml", "-e", json.dumps({"runbook_reports_dir": str(workdir / "tampered"),
                                                          "pre_market_expected_version": "1999.01.1"}))
    finally:
        podman("exec", APP, "mv", "-f", artifact + ".scenario-orig", artifact)
    assert proc.returncode != 0
    (report,) = [json.loads(p.read_text()) for p in workdir.glob("tampered/pre_market-*/report.json")]
    problems = report["problems"]
    assert report["ready"] is False
    assert [p for p in problems if f"tactical-{version}.pt has sha256" in p and APP in p], problems
    assert [p for p in problems if f"runs {version}, expected 1999.01.1" in p], problems
    assert not [p for p in problems if "strategic-" in p], "only the tampered artifact is named"
    # Under molecule a failed task's message goes to stderr, run by hand to stdout.
    assert " problem(s) (the change freeze is set): " in " ".join((proc.stdout + proc.stderr).split())
    # The freeze stays set: a failed pre-market still protects the session.
    assert host_path(LB, FREEZE).exists()


def test_post_market_lifts_the_freeze_and_archives_the_day_once(workdir: Path) -> None:
    assert host_path(LB, FREEZE).exists()
    extra = json.dumps({"runbook_reports_dir": str(workdir / "post")})
    proc = runbook("post_market.yml", "-e", extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert not host_path(LB, FREEZE).exists()
    (report,) = [json.loads(p.read_text()) for p in workdir.glob("post/post_market-*/report.json")]
    assert report["ok"] is True and list(report["backups"]) == [f"{OPS} postgresql"], report
    backup = report["backups"][f"{OPS} postgresql"]
    # Read back: pg_restore --list names the data of the release records' table among others.
    assert backup["readable"] is True and int(backup["tables"]) > 0, backup
    assert host_path(OPS, backup["path"]).stat().st_size > 0, backup
    for host in (APP, LB):
        archive = report["archives"][host]
        path = host_path(host, archive["path"])
        assert archive["path"].startswith(ARCHIVE_DIR + "/") and path.stat().st_mode & 0o077 == 0
        text = gzip.decompress(path.read_bytes()).decode(errors="replace")
        assert ("nginx" if host == LB else "grandmodel-model@") in text
    again = runbook("post_market.yml", "-e", extra)
    assert again.returncode == 0, again.stdout[-3000:]
    assert host_changes(again.stdout) == 0, "a second post-market the same day changes nothing on the hosts"
