"""requirements.yml resolves from the installed `ansible` package; a missing one fails loudly."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .conftest import REPO, VENV_BIN


def check(requirements: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "python"), "scripts/check_collections.py", "--requirements",
                           str(requirements)], cwd=REPO, capture_output=True, text=True, check=False)


def test_every_required_collection_is_installed() -> None:
    proc = check(REPO / "requirements.yml")
    assert proc.returncode == 0, proc.stderr
    assert "community.postgresql" in proc.stdout


def test_a_missing_collection_fails_with_its_name(tmp_path: Path) -> None:
    req = tmp_path / "requirements.yml"
    req.write_text("collections:\n  - name: ansible.posix\n  - name: quantnova.doesnotexist\n"
                   "  - name: community.general\n    version: '>=999.0.0'\n")
    proc = check(req)
    assert proc.returncode == 1
    assert "quantnova.doesnotexist (*) is not installed" in proc.stderr
    assert "does not satisfy >=999.0.0" in proc.stderr
