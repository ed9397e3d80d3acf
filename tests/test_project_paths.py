"""Controller paths resolve to the project, whichever way the tiers are reached.

The tiers are collection playbooks (ansible_collections/quantnova/grandmodel/playbooks/) that site.yml and the
thin wrappers in playbooks/ import. A role default written relative to ``playbook_dir`` then points into the
collection: ``make demo`` stopped at the model_service preflight with "release 2026.11.0 lacks manifests ...
under .../ansible_collections/quantnova/grandmodel/playbooks/../build/releases" while every Molecule scenario
passed, because each scenario sets the folders itself. Here the real site.yml (and the collection playbook by
its FQCN) runs its model_service preflight on this machine, with a release version that does not exist, and
the refusal must name the project's own build/releases folder.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import COLLECTION, REPO, VENV_BIN

DEFAULTS = COLLECTION / "roles" / "model_service" / "defaults" / "main.yml"


@pytest.mark.parametrize("playbook", ["site.yml", "quantnova.grandmodel.app"])
def test_the_release_folder_is_the_projects_build_folder(tmp_path: Path, playbook: str) -> None:
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[app]\nprobe ansible_connection=local\n")
    version = f"probe-missing-{secrets.token_hex(4)}"
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), playbook, "-i", str(inventory), "--tags", "model_service_preflight",
         "-e", f"ansible_python_interpreter={sys.executable}", "-e", "ansible_become=false",
         "-e", "model_service_user=root", "-e", f"model_service_admin_token={secrets.token_urlsafe(24)}",
         "-e", f"model_service_model_version={version}"],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
        env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "ANSIBLE_NOCOLOR": "1", "HOME": str(tmp_path),
             "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"), "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(tmp_path / "facts")},
    )
    output = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0, output[-2000:]
    expected = f"lacks manifests for strategic, tactical under {REPO}/build/releases/{version};"
    assert expected in output, output[-2000:]


def test_the_wheelhouse_follows_the_same_project_folder() -> None:
    """Both controller folders share one anchor, so the release test above covers the wheelhouse too."""
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in DEFAULTS.read_text().splitlines()
             if line.startswith(("model_service_artifacts_root:", "model_service_wheelhouse_src:"))}
    releases, wheelhouse = lines["model_service_artifacts_root"], lines["model_service_wheelhouse_src"]
    assert releases.endswith('/build/releases"') and wheelhouse.endswith('/build/wheelhouse"')
    assert releases.removesuffix('/build/releases"') == wheelhouse.removesuffix('/build/wheelhouse"')
    assert "playbook_dir }}/.." not in releases
