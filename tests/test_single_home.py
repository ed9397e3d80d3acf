"""One home for the platform's shared values: role quantnova.grandmodel._common (issue 12, "Done when", first line).

The colour map and its ports, the unit name, the colours and colour-state folders, the upstream file, the initial
colour, the container-type list and the project-folder expression are defined in roles/_common and nowhere else:
not in another role's defaults/ or vars/, not in an inventory (except once, in group_vars/all, under the _common
name), not in a playbook's vars. A copy under another name is caught by its value (the literal paths, the unit
name, 8001/8002 as colour ports, the container runtimes, the expression), and the tasks and templates of the roles
and playbooks spell none of those literals either: they read the variable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import COLLECTION, REPO

SHARED_NAMES = frozenset({
    "grandmodel_colors", "grandmodel_initial_color", "grandmodel_model_unit", "grandmodel_colors_dir",
    "grandmodel_color_state_dir", "grandmodel_upstream_file", "grandmodel_project_dir",
    "__grandmodel_container_types",
})
# Literal values of _common whose appearance anywhere else is a copy (whatever the variable is called).
PATH_LITERALS = ("/etc/nginx/grandmodel/upstream.conf", "/var/lib/grandmodel/colors", "/opt/grandmodel/colors")
UNIT_LITERAL = re.compile(r"grandmodel-model(?!@\.service\.j2)")  # the unit template's own file name is no value
PORT_LITERAL = re.compile(r"(?<![\d.])800[12](?![\d])")
CONTAINER_RUNTIMES = frozenset({"lxc", "systemd-nspawn", "podman", "containerd"})
COMMON = "roles/_common/"


@dataclass(frozen=True)
class Finding:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


class _AnyTagLoader(yaml.SafeLoader):
    """Safe loader that reads !vault and other tags as plain scalars."""


def _any_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    return None


_AnyTagLoader.add_multi_constructor("!", _any_tag)


def _load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_AnyTagLoader)


def _value_findings(where: str, key: str, value: Any) -> list[Finding]:
    """A copy of a shared value in a variable's value, whatever the variable's name."""
    found: list[Finding] = []
    if key.endswith("initial_color") and "grandmodel_initial_color" not in str(value):
        found.append(Finding(where, f"{key} sets the initial colour itself ({value!r}): default it to "
                                    "grandmodel_initial_color"))
    scalars: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for sub in node.values():
                walk(sub)
        elif isinstance(node, list):
            if {str(item) for item in node} >= CONTAINER_RUNTIMES:
                found.append(Finding(where, f"{key} lists the container runtimes: read __grandmodel_container_types"))
            for sub in node:
                walk(sub)
        else:
            scalars.append(node)

    walk(value)
    for scalar in scalars:
        text = str(scalar)
        for literal in PATH_LITERALS:
            if literal in text:
                found.append(Finding(where, f"{key} spells {literal}: read the _common variable"))
        if UNIT_LITERAL.search(text):
            found.append(Finding(where, f"{key} spells the unit name grandmodel-model: read grandmodel_model_unit"))
        port = scalar in (8001, 8002) if isinstance(scalar, int) else bool(PORT_LITERAL.search(text))
        if port:
            found.append(Finding(where, f"{key} spells a colour port ({text[:60]!r}): read grandmodel_colors"))
        if "ansible_config_file" in text and "playbook_dir" in text:
            found.append(Finding(where, f"{key} repeats the project-folder expression: read grandmodel_project_dir"))
    return found


def _vars_findings(where: str, data: Any, *, may_bind_shared: bool) -> list[Finding]:
    found: list[Finding] = []
    if not isinstance(data, dict):
        return found
    for raw_key, value in data.items():
        key = str(raw_key)
        if key in SHARED_NAMES and not may_bind_shared:
            found.append(Finding(where, f"{key} is _common's: define it in roles/_common only (an inventory sets "
                                        "it once, in group_vars/all)"))
        elif key not in SHARED_NAMES:
            found.extend(_value_findings(where, key, value))
    return found


def _yaml_files(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".yml", ".yaml", ".json", ""))


def _strip_yaml_comments(text: str) -> str:
    return "\n".join("" if line.lstrip().startswith("#") else line for line in text.splitlines())


def scan(collection: Path, repo: Path) -> list[Finding]:
    """Every definition or literal of a shared value outside roles/_common, under collection and repo."""
    found: list[Finding] = []
    roles = collection / "roles"
    for role in sorted(p for p in roles.iterdir() if p.is_dir() and p.name != "_common"):
        for kind in ("defaults", "vars"):
            for path in _yaml_files(role / kind) if (role / kind).exists() else []:
                found += _vars_findings(str(path.relative_to(collection)), _load(path), may_bind_shared=False)
    for inventory in sorted(p for p in (repo / "inventories").iterdir() if p.is_dir()):
        binders: list[str] = []
        for kind in ("group_vars", "host_vars"):
            for path in _yaml_files(inventory / kind) if (inventory / kind).exists() else []:
                rel = str(path.relative_to(repo))
                data = _load(path)
                in_all = path.relative_to(inventory / kind).parts[0] in ("all", "all.yml", "all.yaml") \
                    and kind == "group_vars"
                found += _vars_findings(rel, data, may_bind_shared=in_all)
                if isinstance(data, dict) and SHARED_NAMES & set(map(str, data)):
                    binders.append(rel)
        if len(binders) > 1:
            found.append(Finding(str(inventory.relative_to(repo)), f"binds _common values in {len(binders)} files "
                                                                  f"({', '.join(binders)}): once, in one file"))
    playbook_dirs = [collection / "playbooks", repo / "playbooks"]
    for folder in playbook_dirs:
        for path in sorted(folder.rglob("*.yml")):
            rel = str(path.relative_to(repo if folder.is_relative_to(repo) else collection))
            data = _load(path)
            if "vars" in path.relative_to(folder).parts[:-1]:
                found += _vars_findings(rel, data, may_bind_shared=False)
            elif isinstance(data, list):
                for play in data:
                    if isinstance(play, dict):
                        found += _vars_findings(f"{rel} play {play.get('name', '?')!r}", play.get("vars"),
                                                may_bind_shared=False)
    # Tasks, handlers and templates: a literal where the variable belongs (comments in YAML are prose, skipped).
    sources = [p for role in roles.iterdir() if role.is_dir() and role.name != "_common"
               for kind in ("tasks", "handlers", "templates") if (role / kind).exists()
               for p in (role / kind).rglob("*") if p.is_file()]
    sources += [p for folder in playbook_dirs for p in folder.rglob("*") if p.is_file() and p.suffix in (".yml", ".j2")]
    for path in sorted(sources):
        text = path.read_text()
        if path.suffix == ".yml":
            text = _strip_yaml_comments(text)
        rel = str(path.relative_to(repo)) if path.is_relative_to(repo) else str(path)
        for number, line in enumerate(text.splitlines(), 1):
            hits = [literal for literal in PATH_LITERALS if literal in line]
            hits += ["grandmodel-model"] if UNIT_LITERAL.search(line) else []
            hits += ["a colour port"] if PORT_LITERAL.search(line) else []
            if hits:
                found.append(Finding(f"{rel}:{number}", f"spells {', '.join(hits)}: read the _common variable"))
    return found


def test_shared_values_have_one_home() -> None:
    findings = scan(COLLECTION, REPO)
    assert not findings, "shared values defined or spelled outside roles/_common:\n" + "\n".join(map(str, findings))


def test_common_defines_every_shared_value() -> None:
    defaults = _load(COLLECTION / COMMON / "defaults" / "main.yml")
    variables = _load(COLLECTION / COMMON / "vars" / "main.yml")
    assert set(defaults) | set(variables) >= SHARED_NAMES, "a shared value lost its home in roles/_common"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(("relpath", "text", "expected"), [
    pytest.param("roles/x/defaults/main.yml", "grandmodel_colors: {blue: {port: 8001}}\n", "is _common's",
                 id="same-name-in-a-role"),
    pytest.param("roles/x/defaults/main.yml", "x_ports: {blue: 8001, green: 8002}\n", "colour port",
                 id="ports-other-shape"),
    pytest.param("roles/x/vars/main.yml", "x_map: {blue: {port: '8002'}}\n", "colour port", id="port-as-string"),
    pytest.param("roles/x/defaults/main.yml", "x_upstream: /etc/nginx/grandmodel/upstream.conf\n",
                 "/etc/nginx/grandmodel/upstream.conf", id="upstream-file"),
    pytest.param("roles/x/defaults/main.yml", "x_state: /var/lib/grandmodel/colors\n", "/var/lib/grandmodel/colors",
                 id="colour-state-dir"),
    pytest.param("roles/x/defaults/main.yml", "x_dir: /opt/grandmodel/colors\n", "/opt/grandmodel/colors",
                 id="colours-dir"),
    pytest.param("roles/x/vars/main.yml", "__x_unit: grandmodel-model@.service\n", "unit name", id="unit-name"),
    pytest.param("roles/x/defaults/main.yml", "x_initial_color: green\n", "initial colour", id="initial-colour"),
    pytest.param("roles/x/vars/main.yml", "__x_types: [container, containerd, docker, lxc, podman, systemd-nspawn]\n",
                 "container runtimes", id="container-types"),
    pytest.param("roles/x/defaults/main.yml",
                 "x_dir: \"{{ (ansible_config_file | default('', true) | dirname) or (playbook_dir ~ '/..') }}\"\n",
                 "project-folder", id="project-dir"),
    pytest.param("inventories/prod/group_vars/app/colors.yml", "grandmodel_colors: {blue: {port: 9001}}\n",
                 "is _common's", id="inventory-outside-all"),
    pytest.param("inventories/prod/group_vars/all/prometheus.yml", "monitoring_service_ports: {blue: 8001}\n",
                 "colour port", id="inventory-other-name"),
    pytest.param("playbooks/app.yml", "- name: p\n  hosts: app\n  vars:\n    up: /etc/nginx/grandmodel/upstream.conf\n",
                 "upstream.conf", id="play-vars"),
    pytest.param("playbooks/runbooks/vars/runbooks.yml", "__runbook_colors: {blue: {port: 8001}}\n", "colour port",
                 id="runbook-vars"),
    pytest.param("roles/x/tasks/main.yml",
                 "- name: t\n  ansible.builtin.command: systemctl stop grandmodel-model@blue\n",
                 "grandmodel-model", id="task-literal"),
    pytest.param("roles/x/templates/t.conf.j2", "server 127.0.0.1:8002;\n", "colour port", id="template-literal"),
])
def test_scan_catches_a_copy(tmp_path: Path, relpath: str, text: str, expected: str) -> None:
    """The scanner is not blind: every kind of copy, planted in an otherwise clean tree, is reported by name."""
    collection = tmp_path / "ansible_collections" / "q" / "g"
    for folder in ("roles/_common/defaults", "playbooks", "inventories/prod/group_vars/all"):
        (tmp_path / folder if folder.startswith("inventories") else collection / folder).mkdir(parents=True)
    (tmp_path / "playbooks").mkdir()
    base = tmp_path if relpath.startswith("inventories") or relpath.startswith("playbooks/app") else collection
    _write(base / relpath, "---\n" + text)
    findings = scan(collection, tmp_path)
    assert any(expected in str(f) for f in findings), f"not caught: {relpath}: {text!r} -> {findings}"


def test_inventory_binds_once_in_all(tmp_path: Path) -> None:
    collection = tmp_path / "ansible_collections" / "q" / "g"
    (collection / "roles" / "_common").mkdir(parents=True)
    (collection / "playbooks").mkdir()
    (tmp_path / "playbooks").mkdir()
    _write(tmp_path / "inventories/prod/group_vars/all/colors.yml", "---\ngrandmodel_colors: {blue: {port: 9001}}\n")
    assert scan(collection, tmp_path) == [], "setting a _common value once in group_vars/all is the documented way"
    _write(tmp_path / "inventories/prod/group_vars/all/more.yml", "---\ngrandmodel_model_unit: other\n")
    assert any("2 files" in str(f) for f in scan(collection, tmp_path))


def test_repository_paths_exist() -> None:
    assert (REPO / "inventories").is_dir() and (COLLECTION / "playbooks").is_dir()
