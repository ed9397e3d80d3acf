"""The repository layout the design asks for: one home for roles and plugins, a clean build."""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from .conftest import COLLECTION, GROUPS, INVENTORIES, REPO, VENV_BIN

ROLES = sorted(p.parent.parent.name for p in (COLLECTION / "roles").glob("*/tasks/main.yml"))


@pytest.mark.parametrize("name", ["roles", "plugins"])
def test_top_level_dirs_are_links_into_the_collection(name: str) -> None:
    link = REPO / name
    assert link.is_symlink(), f"{name}/ must be a link, never a copy"
    assert link.resolve() == (COLLECTION / name).resolve()


def test_no_role_lives_outside_the_collection() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    strays = [f for f in tracked if f.endswith("tasks/main.yml")
              and not f.startswith("ansible_collections/quantnova/grandmodel/roles/")]
    assert not strays


def test_collection_builds_without_tests_molecule_or_service(tmp_path: Path) -> None:
    subprocess.run([str(VENV_BIN / "ansible-galaxy"), "collection", "build", str(COLLECTION),
                    "--output-path", str(tmp_path)], check=True, capture_output=True)
    (tarball,) = tmp_path.glob("quantnova-grandmodel-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("MANIFEST.json"))  # type: ignore[arg-type]
    assert manifest["collection_info"]["namespace"] == "quantnova"
    assert "roles/common/tasks/main.yml" in names
    assert "meta/runtime.yml" in names
    assert not [n for n in names if n.split("/")[0] in ("tests", "molecule", "model_service")
                or n.endswith((".pt", ".pyc"))]
    # galaxy-importer refuses a collection without a README; the license travels with it.
    assert "README.md" in names
    assert "LICENSE" in names
    assert manifest["collection_info"]["readme"] == "README.md"


class _AnsibleLoader(yaml.SafeLoader):
    """Safe YAML that reads Ansible's tags (!unsafe, !vault) as plain values."""


_AnsibleLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def test_galaxy_dependencies_are_exactly_the_collections_the_content_uses() -> None:
    galaxy = yaml.safe_load((COLLECTION / "galaxy.yml").read_text())
    declared = set(galaxy.get("dependencies") or {})
    used: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "name" in node or "hosts" in node:  # a task or a play: its keys name modules
                for key in node:
                    parts = str(key).split(".")
                    external = parts[0] not in ("quantnova", "ansible") or parts[1] == "posix"
                    if len(parts) == 3 and external:
                        used.add(".".join(parts[:2]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in [*(COLLECTION / "roles").rglob("*.yml"), *(COLLECTION / "playbooks").rglob("*.yml")]:
        walk(yaml.load(path.read_text(), Loader=_AnsibleLoader))
    assert declared == used, (f"galaxy.yml dependencies {sorted(declared)} must be exactly the "
                              f"collections the roles and playbooks call: {sorted(used)}")


def test_requires_ansible_is_the_tested_range() -> None:
    from packaging.specifiers import SpecifierSet

    runtime = yaml.safe_load((COLLECTION / "meta" / "runtime.yml").read_text())
    pinned = re.search(r"^ansible-core==([0-9.]+)$", (REPO / "requirements.txt").read_text(), re.M)
    assert pinned, "requirements.txt must pin ansible-core"
    spec = SpecifierSet(runtime["requires_ansible"])
    assert pinned.group(1) in spec
    major_minor = tuple(int(x) for x in pinned.group(1).split(".")[:2])
    untested_next = f"{major_minor[0]}.{major_minor[1] + 1}.0"
    assert untested_next not in spec, f"requires_ansible claims {untested_next}, never tested"


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_match_defaults_key_for_key(role: str) -> None:
    role_dir = COLLECTION / "roles" / role
    specs = yaml.safe_load((role_dir / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    defaults_file = role_dir / "defaults" / "main.yml"
    defaults = yaml.safe_load(defaults_file.read_text()) if defaults_file.exists() else {}
    defaults = defaults or {}
    assert set(defaults) - set(options) == set(), "defaults without an argument spec"
    assert {k for k, v in options.items() if not v.get("required")} - set(defaults) == set(), \
        "optional arguments without a default in defaults/main.yml"
    for key, value in defaults.items():
        if "default" in options[key] and not (isinstance(value, str) and "{{" in value):
            assert options[key]["default"] == value, f"{key}: spec default differs from defaults/main.yml"
    assert all(k.startswith(f"{role}_") for k in options), "public inputs are named <role>_*"


@pytest.mark.parametrize("role", ROLES)
def test_templates_carry_the_managed_header(role: str) -> None:
    for template in (COLLECTION / "roles" / role / "templates").glob("*.j2"):
        lines = template.read_text().lstrip().splitlines()
        # A script keeps its shebang first; the managed header follows it.
        first = lines[1] if lines[0].startswith("#!") else lines[0]
        assert "ansible_managed" in first, f"{template.name} must start with ansible_managed"


def inventory(env: str) -> dict:
    proc = subprocess.run([str(VENV_BIN / "ansible-inventory"), "-i", str(REPO / "inventories" / env),
                           "--list"], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


@pytest.mark.parametrize(("env", "hosts"), [("production", 5), ("staging", 3), ("development", 1),
                                            ("sandbox", 4)])
def test_inventories_share_the_production_groups(env: str, hosts: int) -> None:
    data = inventory(env)
    assert set(data) >= GROUPS, f"{env} lacks groups {GROUPS - set(data)}"
    for group in GROUPS:
        assert data[group]["hosts"], f"{env}: group {group} has no host"
    assert len(data["_meta"]["hostvars"]) == hosts
    assert {hv["grandmodel_environment"] for hv in data["_meta"]["hostvars"].values()} == {env}


@pytest.mark.parametrize("env", INVENTORIES)
def test_site_syntax_checks_against_every_inventory(env: str) -> None:
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "site.yml", "-i", f"inventories/{env}",
                           "--syntax-check"], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("env", INVENTORIES)
def test_secrets_come_only_from_vault_or_lookups(env: str) -> None:
    for path in (REPO / "inventories" / env).rglob("*.yml"):
        if path.name.endswith(".example"):
            continue
        data = yaml.safe_load(path.read_text()) or {}
        for key, value in data.items():
            if any(w in key for w in ("password", "token", "secret", "passphrase")) and not key.startswith("__"):
                text = str(value)
                # Either the secret's source (vault or lookup) or a plain reference to another
                # variable, which this test checks where that variable is defined.
                is_reference = re.fullmatch(r"\{\{\s*[a-z_][a-z0-9_]*\s*\}\}", text.strip()) is not None
                assert "vault_" in text or "lookup(" in text or is_reference, \
                    f"{path.relative_to(REPO)}: {key} must come from ansible-vault or a lookup"
    assert not list((REPO / "inventories" / env).rglob("vault.yml")) or all(
        p.read_text().startswith("$ANSIBLE_VAULT;") for p in (REPO / "inventories" / env).rglob("vault.yml")
    ), "a vault.yml must be encrypted"


def test_changelog_fragments_lint() -> None:
    proc = subprocess.run([str(VENV_BIN / "antsibull-changelog"), "lint"], cwd=COLLECTION,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in readme
    assert [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))] \
        == ["make test"]
