"""Every role carries a README (Galaxy's importer refuses a collection without), generated from its specs.

scripts/role_readmes.py writes the reference part of roles/*/README.md from meta/argument_specs.yml;
a spec changed without `make readmes` leaves a README that documents other inputs than the role takes.
"""

from __future__ import annotations

import subprocess
import sys

import yaml

from .conftest import COLLECTION, REPO


def test_every_role_has_a_readme_generated_from_its_current_specs() -> None:
    proc = subprocess.run([sys.executable, "scripts/role_readmes.py", "--check"], cwd=REPO, capture_output=True,
                          text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for role in (COLLECTION / "roles").iterdir():
        if role.is_dir():
            text = (role / "README.md").read_text()
            assert f"quantnova.grandmodel.{role.name}" in text
            # Every input the role declares is documented.
            specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
            for entry in specs.values():
                for option in entry.get("options", {}) or {}:
                    assert f"`{option}`" in text, f"{role.name}: {option} missing from README.md"
