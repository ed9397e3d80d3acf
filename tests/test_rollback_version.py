"""Rollback to a named release (issue 14 item 6): playbooks/rollback.yml -e rollback_version=<release>.

The real playbook runs here on this machine (connection local; this machine is the only app host and load
balancer of a throw-away inventory, every path in a temporary directory): the live colour is read from an
upstream file as the traffic switch writes it, each colour's release from its state file, the bundles from a
controller folder of small stand-in bundles (a manifest and an artifact whose sha256 it names). The plan step
of the release flow refuses before anything is touched, and these tests prove that nothing was: every file of
the directory is compared byte for byte before and after. The redeploy, the gates and the switch themselves
run on real hosts in molecule/rollout/tests/test_rollback_version.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import COLLECTION, REPO, VENV_BIN

PLAYBOOK = REPO / "playbooks" / "rollback.yml"
SPECS = yaml.safe_load((COLLECTION / "roles" / "rollout" / "meta" / "argument_specs.yml").read_text())
MODELS = ["strategic", "tactical"]
LIVE, OLDER = "2026.11.2", "2026.11.0"


def bundle(root: Path, version: str) -> Path:
    folder = root / version
    folder.mkdir(parents=True)
    for model in MODELS:
        artifact = folder / f"{model}-{version}.pt"
        artifact.write_bytes(f"{model} weights {version}".encode())
        (folder / f"{model}.manifest.json").write_text(json.dumps({
            "name": model, "version": version, "artifact": artifact.name,
            "sha256": hashlib.sha256(artifact.read_bytes()).hexdigest()}))
    return folder


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """Blue serves 2026.11.2, green (idle) runs 2026.11.1; the controller holds bundles 2026.11.0 and 2026.11.2."""
    (tmp_path / "colors").mkdir()
    for color, version in (("blue", LIVE), ("green", "2026.11.1")):
        (tmp_path / "colors" / f"{color}.json").write_text(json.dumps({"color": color, "model_version": version}))
    (tmp_path / "upstream.conf").write_text(
        "# active_color: blue\nupstream grandmodel_backend {\n    server 127.0.0.1:8001;\n}\n")
    (tmp_path / "halt.d").mkdir()
    records = [{"id": "r1", "kind": "rollout", "from_version": "2026.11.1", "to_version": LIVE, "outcome": "success"},
               {"id": "r0", "kind": "rollout", "from_version": "2026.10.7", "to_version": "2026.11.1",
                "outcome": "success"}]
    (tmp_path / "deployments.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    bundle(tmp_path / "releases", OLDER)
    bundle(tmp_path / "releases", LIVE)
    inventory = {"all": {"hosts": {"localhost": {"ansible_connection": "local",
                                                 "ansible_python_interpreter": sys.executable}},
                         "children": {"app": {"hosts": {"localhost": {}}}, "lb": {"hosts": {"localhost": {}}}}}}
    (tmp_path.parent / f"{tmp_path.name}-inventory.yml").write_text(yaml.safe_dump(inventory))
    return tmp_path


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rollback(site: Path, *extra: str, **variables: Any) -> tuple[subprocess.CompletedProcess[str], str]:
    values = {"ansible_become": False, "rollout_upstream_file": str(site / "upstream.conf"),
              "grandmodel_color_state_dir": str(site / "colors"),
              "rollout_record_file": str(site / "deployments.jsonl"),
              "model_service_artifacts_root": str(site / "releases"), "rollout_halt_dir": str(site / "halt.d"),
              "rollout_freeze_file": str(site / "change-freeze.json"), "rollout_traffic_metrics_file": "",
              **variables}
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(site.parent / f"{site.name}-inventory.yml"),
                           str(PLAYBOOK), "-e", json.dumps(values), *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False, env=dict(os.environ, ANSIBLE_NOCOLOR="1"))
    return proc, " ".join((proc.stdout + proc.stderr).split())


def changed(proc: subprocess.CompletedProcess[str]) -> int:
    found = re.search(r"localhost\s+: ok=\d+\s+changed=(\d+)", proc.stdout)
    assert found, proc.stdout[-2000:]
    return int(found.group(1))


def test_the_inputs_are_declared_for_the_role_and_awx() -> None:
    options = SPECS["argument_specs"]["rollback_version_check"]["options"]
    for name in ("rollback_version", "rollback_reason"):
        assert options[name]["type"] == "str" and options[name]["default"] == "", options[name]
    templates = {t["name"]: t for t in yaml.safe_load((REPO / "awx" / "job_templates.yml").read_text())[
        "awx_job_templates"]}
    survey = {q["variable"]: q for q in templates["GrandModel rollback"]["survey"]}
    assert {"rollback_to", "rollback_version", "rollback_reason"} <= set(survey)
    assert not survey["rollback_version"]["required"], "an empty answer is the rollback to the warm colour"


def test_the_playbook_parses() -> None:
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "--syntax-check", "-i", "localhost,", str(PLAYBOOK),
                           "-e", "rollback_version=2026.11.0"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_an_unknown_release_is_refused_and_nothing_changes(site: Path) -> None:
    before = files(site)
    proc, said = rollback(site, rollback_version="2026.09.9")
    assert proc.returncode != 0, said[-3000:]
    assert "cannot roll back to release 2026.09.9: it is unknown" in said, said[-3000:]
    # The known releases: the controller's bundles and what the records name are not all listed; bundles are.
    assert f"Known releases: {OLDER}, {LIVE}." in said, said[-3000:]
    assert "Nothing was changed; traffic stays on blue." in said
    assert files(site) == before


def test_a_known_release_without_its_bundle_is_refused_and_nothing_changes(site: Path) -> None:
    before = files(site)
    # 2026.11.1 is in the deployment records (and on green), but its bundle is not on the controller.
    proc, said = rollback(site, rollback_version="2026.11.1")
    assert proc.returncode != 0, said[-3000:]
    assert "cannot roll back to release 2026.11.1: its bundle is not available on the controller" in said, said[-3000:]
    assert "strategic.manifest.json missing; tactical.manifest.json missing" in said, said[-3000:]
    assert "scripts/build_release.py --version 2026.11.1" in said
    assert files(site) == before


def test_a_tampered_bundle_is_refused_and_nothing_changes(site: Path) -> None:
    artifact = site / "releases" / OLDER / f"tactical-{OLDER}.pt"
    artifact.write_bytes(artifact.read_bytes() + b"x")
    before = files(site)
    proc, said = rollback(site, rollback_version=OLDER)
    assert proc.returncode != 0, said[-3000:]
    assert f"tactical-{OLDER}.pt does not match the sha256 of its manifest" in said, said[-3000:]
    assert "strategic" not in said.split("its bundle is not available")[1].split("Nothing was changed")[0]
    assert files(site) == before


def test_the_live_release_is_said_and_changes_nothing(site: Path) -> None:
    (site / "change-freeze.json").write_text(json.dumps({"reason": "session", "set_by": "desk", "since": "x"}))
    before = files(site)
    proc, said = rollback(site, rollback_version=LIVE, rollback_reason="why not")
    assert proc.returncode == 0, said[-3000:]
    assert f"release {LIVE} is already live on blue: nothing to do, nothing changed" in said, said[-3000:]
    assert changed(proc) == 0
    assert files(site) == before


def test_check_mode_plans_through_a_freeze_and_says_what_it_would_do(site: Path) -> None:
    (site / "change-freeze.json").write_text(json.dumps({"reason": "trading session", "set_by": "desk",
                                                         "since": "2026-12-02T08:00:00Z"}))
    before = files(site)
    proc, said = rollback(site, "--check", rollback_version=OLDER, rollback_reason="bad fills since 10:02",
                          rollout_weight_steps=[10, 50, 100])
    assert proc.returncode == 0, said[-3000:]
    assert "a rollback is never blocked, the freeze is kept in its record" in said, said[-3000:]
    assert ("rollback (bad fills since 10:02, change freeze set: trading session): check mode: would redeploy "
            f"release {OLDER} to the idle colour green, gate it as a release (pre-promotion gate, shadow phase if "
            "configured, weighted steps 10, 50, switch, post-promotion gate) and switch every load balancer from blue "
            f"({LIVE}); nothing is deployed, gated or switched in check mode") in said, said[-3000:]
    assert changed(proc) == 0
    assert files(site) == before


@pytest.mark.parametrize(("variables", "message"), [
    ({"rollback_version": "2026.11.0; rm -rf /"}, 'got "2026.11.0; rm -rf /"'),
    ({"rollback_version": OLDER, "rollback_to": "green"}, 'or rollback_to (that is the rollback to the warm colour'),
    ({"rollback_version": OLDER, "release_version": LIVE}, f'without release_version (got "{LIVE}")'),
    ({"rollback_version": OLDER, "rollout_backend": "kubernetes"}, "a rollback to a named release redeploys it"),
])
def test_bad_inputs_are_refused_and_nothing_changes(site: Path, variables: dict[str, str], message: str) -> None:
    before = files(site)
    proc, said = rollback(site, **variables)
    assert proc.returncode != 0, said[-3000:]
    assert message in said and "Nothing was changed" in said, said[-3000:]
    assert files(site) == before


def test_an_emergency_stop_refuses_it(site: Path) -> None:
    (site / "halt.d" / "00-emergency-stop.conf").write_text("return 503;\n")
    before = files(site)
    proc, said = rollback(site, rollback_version=OLDER)
    assert proc.returncode != 0, said[-3000:]
    assert "a rollback to a named release is refused while the front door answers 503" in said, said[-3000:]
    assert files(site) == before
