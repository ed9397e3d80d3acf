"""The AWX definitions in awx/ agree with the playbooks they launch; no AWX server is needed.

- every job template's playbook, inventory source, credentials and teams exist;
- every survey variable is an input its playbook declares: an option of meta/argument_specs.yml of a
  role the playbook calls, or an extra var its header documents, whose type/choices/default are read
  from the code that consumes it; same type, same choices, same default, required where required;
- no survey variable is set by an inventory (a survey answer is an extra var and would beat it);
- the survey and workflow payloads that playbooks/awx_apply.yml really builds (its render mode) are
  valid AWX specs for those inputs;
- the workflow's nodes reference templates that exist, an approval precedes the rollout and the
  rollback, and only release-managers may launch a rollout;
- the schedules' RRULEs parse (python-dateutil) and fire at the stated New York times across a DST
  change; credentials and notifications carry no secret values;
- the apply playbook passes syntax-check and refuses to run without a controller, naming what is missing.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import os
import re
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from dateutil.rrule import rrulestr  # type: ignore[import-untyped]

from .conftest import COLLECTION, REPO, VENV_BIN

AWX = REPO / "awx"
APPLY = REPO / "playbooks" / "awx_apply.yml"
ROLES = COLLECTION / "roles"
EXCHANGE_TZ = ZoneInfo("America/New_York")
# The playbooks that exist today and must each have a job template.
REQUIRED_PLAYBOOKS = {
    "site.yml",
    "playbooks/rollout.yml",
    "playbooks/rollout_approve.yml",
    "playbooks/rollback.yml",
    "playbooks/switch_back.yml",
    "playbooks/backup.yml",
    "playbooks/restore.yml",
    "playbooks/drift_check.yml",
    "playbooks/k8s.yml",
    "playbooks/runbooks/emergency_stop.yml",
    "playbooks/runbooks/resume.yml",
    "playbooks/runbooks/daily_health.yml",
    "playbooks/runbooks/change_freeze.yml",
    "playbooks/runbooks/pre_market.yml",
    "playbooks/runbooks/post_market.yml",
    "playbooks/runbooks/degradation.yml",
    "playbooks/runbooks/security_check.yml",
    "playbooks/runbooks/access_review.yml",
    "playbooks/runbooks/daily_report.yml",
    "playbooks/runbooks/security_incident.yml",
    "playbooks/runbooks/maintenance.yml",
}
ARGSPEC_TYPES = {"str", "int", "bool", "list", "float"}


def load_definitions() -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in sorted(AWX.glob("*.yml")):
        data = yaml.safe_load(path.read_text())
        overlap = set(merged) & set(data)
        assert not overlap, f"{path.name} redefines {overlap}"
        merged.update(data)
    return merged


DEFS = load_definitions()
TEMPLATES = {t["name"]: t for t in DEFS["awx_job_templates"]}
WORKFLOWS = {w["name"]: w for w in DEFS["awx_workflows"]}
TEAMS = {t["name"] for t in DEFS["awx_teams"]}
SURVEYED = [(name, q) for name, t in (TEMPLATES | WORKFLOWS).items() for q in t.get("survey", [])]


# --- what a playbook declares ---------------------------------------------------------------------------


def imported_path(playbook: Path, imported: str) -> Path:
    """The file an import_playbook names: a collection playbook (quantnova.grandmodel.x, or
    quantnova.grandmodel.runbooks.x for one in a subfolder) or a relative path."""
    if imported.startswith("quantnova.grandmodel."):
        return COLLECTION / "playbooks" / (imported.removeprefix("quantnova.grandmodel.").replace(".", "/") + ".yml")
    return playbook.parent / imported


@functools.cache
def _parsed(path: Path) -> Any:
    """A YAML file parsed once per session (the survey checks read the same playbooks and argument specs for
    each of their questions): libyaml's loader where PyYAML has it, the same documents either way."""
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def parsed(path: Path) -> Any:
    return copy.deepcopy(_parsed(path.resolve()))


def source_of(playbook: Path) -> Path:
    """The playbook itself, or what it wraps when it is one import_playbook (the old top-level paths)."""
    plays = parsed(playbook)
    if len(plays) == 1:
        imported = plays[0].get("ansible.builtin.import_playbook") or plays[0].get("import_playbook")
        if imported:
            return source_of(imported_path(playbook, imported))
    return playbook


def plays_of(playbook: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every play of a playbook, import_playbook followed."""
    found: list[tuple[Path, dict[str, Any]]] = []
    for play in parsed(playbook):
        imported = play.get("ansible.builtin.import_playbook") or play.get("import_playbook")
        if imported:
            found += plays_of(imported_path(playbook, imported))
        else:
            found.append((playbook, play))
    return found


def roles_called(tasks: list[dict[str, Any]]) -> set[str]:
    names: set[str] = set()
    for task in tasks or []:
        for key in ("block", "rescue", "always"):
            names |= roles_called(task.get(key, []))
        for key in ("ansible.builtin.include_role", "ansible.builtin.import_role", "include_role", "import_role"):
            if key in task:
                names.add(task[key]["name"])
    return names


def role_dir(name: str) -> Path:
    assert name.startswith("quantnova.grandmodel."), f"role {name} is not addressed by FQCN"
    return ROLES / name.rsplit(".", 1)[1]


def argument_spec_options(playbook: Path) -> dict[str, dict[str, Any]]:
    """Options of every entry point of every role the playbook (and what it imports) calls."""
    options: dict[str, dict[str, Any]] = {}
    for _, play in plays_of(playbook):
        names = {r["role"] if isinstance(r, dict) else r for r in play.get("roles", [])}
        for key in ("pre_tasks", "tasks", "post_tasks", "handlers"):
            names |= roles_called(play.get(key, []))
        for name in names:
            spec_file = role_dir(name) / "meta" / "argument_specs.yml"
            if spec_file.exists():
                for entry in parsed(spec_file)["argument_specs"].values():
                    options.update(entry.get("options", {}))
    return options


def documented_extra_vars(playbook: Path) -> set[str]:
    """Names the playbook's header comment documents: `-e name=...` and `# name / other: ...` lines."""
    header = []
    for line in source_of(playbook).read_text().splitlines():
        if line.startswith("- "):
            break
        header.append(line)
    text = "\n".join(header)
    names = set(re.findall(r"-e ([a-z][a-z0-9_]*)=", text))
    for match in re.finditer(r"^# ((?:[a-z][a-z0-9_]* / )*[a-z][a-z0-9_]*):", text, re.M):
        names |= set(match.group(1).split(" / "))
    # The runbooks' form: "#   name (type): ..." or "#   one, two (type): ...".
    for match in re.finditer(r"^#\s+((?:[a-z][a-z0-9_]*, )*[a-z][a-z0-9_]*) \([a-z]+\):", text, re.M):
        names |= set(match.group(1).split(", "))
    return names


def _read(rel: str) -> str:
    return source_of(REPO / rel).read_text()


def _rollout_color_names() -> list[str]:
    # The rollout's colours default to the platform's (role _common), their one home.
    defaults = yaml.safe_load((ROLES / "rollout" / "defaults" / "main.yml").read_text())
    assert defaults["rollout_colors"] == "{{ grandmodel_colors }}", defaults["rollout_colors"]
    common = yaml.safe_load((ROLES / "_common" / "defaults" / "main.yml").read_text())
    return list(common["grandmodel_colors"])


def _release_version() -> dict[str, Any]:
    pattern = re.search(
        r"release_version is match\('\^\[[^\]]+\]\[[^\]]+\]\{0,(\d+)\}\$'\)",
        (ROLES / "rollout" / "tasks" / "preflight.yml").read_text(),
    )
    assert pattern, "roles/rollout/tasks/preflight.yml no longer checks release_version against its pattern"
    return {"type": "str", "required": True, "min": 1, "max": int(pattern.group(1)) + 1}


def _restore_targets() -> dict[str, Any]:
    text = _read("playbooks/restore.yml")
    default = re.search(r"restore_targets \| default\((\[[^\]]*\])\)", text)
    assert default, "playbooks/restore.yml no longer defaults restore_targets"
    return {
        "type": "list",
        "elements": "str",
        "default": yaml.safe_load(default.group(1)),
        "choices": sorted(set(re.findall(r"'(\w+)' in restore_targets", text))),
    }


def _restore_confirm() -> dict[str, Any]:
    # The inventory name of the host restored, required in every environment (the roles refuse without it).
    text = _read("playbooks/restore.yml")
    assert "restore_confirm | default('') | string" in text, "restore.yml no longer reads restore_confirm as text"
    assert "restore_confirm: the inventory name of the host restored (required" in text
    return {"type": "str", "required": True}


def _cut_text(playbook: str, variable: str) -> Callable[[], dict[str, Any]]:
    """Optional text the playbook cuts to a length (a longer survey answer would be cut silently)."""
    def spec() -> dict[str, Any]:
        text = _read(playbook)
        kept = re.search(rf"{variable} \| default\('[^']*', true\) \| string\)[^}}]*truncate\((\d+),", text)
        assert kept, f"{playbook} no longer cuts {variable} to a length"
        assert f"#   {variable} (str):" in text
        return {"type": "str", "max": int(kept.group(1))}
    return spec


def _required_choice(playbook: str, variable: str) -> dict[str, Any]:
    """A required string input that the playbook checks against a literal list of choices."""
    text = _read(f"playbooks/{playbook}")
    choices = re.search(rf"\({variable} \| default\(''\) \| string \| lower\) in (\[[^\]]*\])", text)
    assert choices, f"{playbook} no longer checks {variable} against its choices"
    assert f"#   {variable} (str):" in text
    return {"type": "str", "required": True, "choices": yaml.safe_load(choices.group(1))}


def _change_freeze() -> dict[str, Any]:
    return _required_choice("runbooks/change_freeze.yml", "change_freeze")


def _rollout_decision() -> dict[str, Any]:
    return _required_choice("rollout_approve.yml", "rollout_decision")


def _flag(playbook: str, variable: str) -> Callable[[], dict[str, Any]]:
    """An optional true/false the playbook reads with `| bool` (a survey sends the text true or false)."""
    def spec() -> dict[str, Any]:
        text = _read(playbook)
        default = re.search(rf"{variable} \| default\((true|false)\) \| string \| lower\) not in \['true', 'false'\]",
                            text)
        assert default, f"{playbook} no longer checks {variable} as true or false"
        assert f"#   {variable} (bool):" in text
        return {"type": "bool", "default": default.group(1) == "true"}
    return spec


def _maintenance_apt_upgrade() -> dict[str, Any]:
    text = _read("playbooks/runbooks/maintenance.yml")
    found = re.search(r"maintenance_apt_upgrade \| default\('(\w+)'\) not in (\[[^\]]*\])", text)
    assert found, "maintenance.yml no longer checks maintenance_apt_upgrade against its choices"
    return {"type": "str", "default": found.group(1), "choices": yaml.safe_load(found.group(2))}


# Inputs documented in a playbook header but not in any argument_specs: their spec is read from the code
# that consumes them, so a change there fails here.
EXTRA_VAR_SPECS: dict[str, Callable[[], dict[str, Any]]] = {
    "release_version": _release_version,
    "rollback_to": lambda: {"type": "str", "choices": _rollout_color_names()},
    "restore_targets": _restore_targets,
    "restore_confirm": _restore_confirm,
    "restore_postgresql_file": lambda: {"type": "str"},
    "restore_redis_file": lambda: {"type": "str"},
    "pre_market_expected_version": lambda: {"type": "str"},
    "emergency_stop_reason": _cut_text("playbooks/runbooks/emergency_stop.yml", "emergency_stop_reason"),
    "change_freeze": _change_freeze,
    "rollout_decision": _rollout_decision,
    "change_freeze_reason": _cut_text("playbooks/runbooks/change_freeze.yml", "change_freeze_reason"),
    "security_incident_reason": _cut_text("playbooks/runbooks/security_incident.yml", "security_incident_reason"),
    "isolate_host": lambda: {"type": "str"},
    "security_incident_allow_outage": _flag("playbooks/runbooks/security_incident.yml",
                                            "security_incident_allow_outage"),
    "security_incident_vars_file": lambda: {"type": "str"},
    "maintenance_apt_upgrade": _maintenance_apt_upgrade,
    "maintenance_allow_outage": _flag("playbooks/runbooks/maintenance.yml", "maintenance_allow_outage"),
    "maintenance_reason": _cut_text("playbooks/runbooks/maintenance.yml", "maintenance_reason"),
}


def declared_spec(playbook_rel: str, variable: str) -> dict[str, Any]:
    playbook = REPO / playbook_rel
    options = argument_spec_options(playbook)
    if variable in options:
        return options[variable]
    assert variable in documented_extra_vars(playbook), (
        f"{variable} is neither an argument_specs option of a role {playbook_rel} calls nor an extra var "
        f"its header documents ({sorted(documented_extra_vars(playbook))})"
    )
    assert variable in EXTRA_VAR_SPECS, f"no spec is derived for the documented extra var {variable}"
    return EXTRA_VAR_SPECS[variable]()


def playbooks_fed_by(name: str) -> list[str]:
    """The playbooks a template's (or a workflow's) survey answers reach."""
    if name in TEMPLATES:
        return [TEMPLATES[name]["playbook"]]
    return [TEMPLATES[n["template"]]["playbook"] for n in WORKFLOWS[name]["nodes"] if "template" in n]


# --- templates, inventories, credentials ------------------------------------------------------------------


def test_every_playbook_of_today_has_a_template() -> None:
    assert {t["playbook"] for t in TEMPLATES.values()} >= REQUIRED_PLAYBOOKS


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_references_exist(name: str) -> None:
    template = TEMPLATES[name]
    playbook = REPO / template["playbook"]
    assert playbook.is_file(), f"{name}: playbook {template['playbook']} does not exist"
    assert plays_of(playbook), f"{name}: {template['playbook']} has no play"
    inventories = {i["name"]: i for i in DEFS["awx_inventories"]}
    assert template["inventory"] in inventories, f"{name}: unknown inventory {template['inventory']}"
    assert set(template["credentials"]) <= {c["name"] for c in DEFS["awx_credentials"]}
    assert template["execute"] and set(template["execute"]) <= TEAMS
    for role in {r for _, p in plays_of(playbook) for r in roles_called(p.get("tasks", []))}:
        assert role_dir(role).is_dir(), f"{name}: {template['playbook']} calls {role}, which does not exist"


@pytest.mark.parametrize("inventory", DEFS["awx_inventories"], ids=lambda i: i["name"])
def test_inventory_sources_exist_in_the_repository(inventory: dict[str, Any]) -> None:
    source = REPO / inventory["source_path"]
    assert source.is_file(), f"{inventory['name']}: {inventory['source_path']} does not exist"
    assert (source.parent / "group_vars").is_dir()
    assert yaml.safe_load(source.read_text())["all"], f"{inventory['source_path']} has no hosts"
    assert set(inventory["use"]) <= TEAMS


def test_the_three_environments_are_inventories() -> None:
    paths = {i["source_path"] for i in DEFS["awx_inventories"]}
    assert paths == {f"inventories/{env}/hosts.yml" for env in ("sandbox", "staging", "production")}


def test_credentials_and_notifications_hold_no_secret() -> None:
    for credential in DEFS["awx_credentials"]:
        assert set(credential) <= {"name", "credential_type", "description", "inputs_from_env"}, credential["name"]
        for entry in credential["inputs_from_env"]:
            assert set(entry) == {"input", "env"}, f"{credential['name']}: {entry!r} needs exactly input and env"
            field, env = entry["input"], entry["env"]
            assert re.fullmatch(r"[a-z_]+", field), f"{credential['name']}: {field!r} is not an AWX input field"
            assert re.fullmatch(r"GM_AWX_[A-Z0-9_]+", env), f"{credential['name']}.{field}: {env!r} is not a name"
    assert {c["credential_type"] for c in DEFS["awx_credentials"]} >= {"Vault", "Machine"}
    for notification in DEFS["awx_notification_templates"]:
        assert re.fullmatch(r"[a-z_]+", notification["url_from"]), "a notification URL must come from a variable"
        assert "://" not in json.dumps(notification)
    assert set(DEFS["awx_notify_on_error"]) <= {n["name"] for n in DEFS["awx_notification_templates"]}
    assert "://" not in (AWX / "organization.yml").read_text(), "the SCM URL comes from a variable"


# --- surveys against the declared inputs -------------------------------------------------------------------


@pytest.mark.parametrize(("template", "question"), SURVEYED, ids=[f"{t}:{q['variable']}" for t, q in SURVEYED])
def test_survey_variable_is_a_declared_input(template: str, question: dict[str, Any]) -> None:
    assert question["type"] in ARGSPEC_TYPES
    assert question.get("question"), f"{template}: {question['variable']} has no question"
    # A workflow's answers reach every node; each input must be declared by at least one of them.
    candidates = playbooks_fed_by(template)
    declaring = [
        p
        for p in candidates
        if question["variable"] in argument_spec_options(REPO / p)
        or question["variable"] in documented_extra_vars(REPO / p)
    ]
    assert declaring, f"{template}: {question['variable']} is declared by none of {candidates}"
    for playbook in declaring:
        spec = declared_spec(playbook, question["variable"])
        where = f"{template}: {question['variable']} against {playbook}"
        assert question["type"] == spec.get("type", "str"), where
        if spec.get("elements") or question.get("elements"):
            assert question.get("elements") == spec.get("elements"), where
        assert sorted(question.get("choices", [])) == sorted(spec.get("choices", [])), where
        if spec.get("required"):
            assert question.get("required") is True, f"{where}: required by the playbook"
        if question.get("required") and not spec.get("required"):
            # A required question always sends a value: it must be the playbook's own default.
            assert "default" in question and "default" in spec, f"{where}: required in AWX, optional in the playbook"
        if "default" in question or "default" in spec:
            assert question.get("default") == spec.get("default"), f"{where}: defaults differ"
        if "max" in spec:
            assert question.get("max", 1024) <= spec["max"], where
            assert question.get("min", 0) >= spec.get("min", 0), where


def inventory_keys() -> set[str]:
    keys: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                keys.add(str(key))
                walk(value)

    for path in (REPO / "inventories").rglob("*.yml"):
        walk(yaml.safe_load(path.read_text()))
    return keys


def test_no_survey_variable_is_set_by_an_inventory() -> None:
    overridden = {q["variable"] for _, q in SURVEYED} & inventory_keys()
    assert not overridden, f"survey answers (extra vars) would beat these inventory values: {overridden}"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("awx-render")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTROLLER_", "GM_AWX_"))}
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), str(APPLY), "-e", f"awx_render_dir={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


AWX_TYPE = {"int": "integer", "list": "multiselect", "bool": "multiplechoice"}


def test_rendered_surveys_are_valid_awx_specs(rendered: dict[str, Any]) -> None:
    surveys = rendered["surveys"]
    assert set(surveys) == {name for name, t in (TEMPLATES | WORKFLOWS).items() if t.get("survey")}
    for name, spec in surveys.items():
        questions = (TEMPLATES | WORKFLOWS)[name]["survey"]
        assert [q["variable"] for q in spec] == [q["variable"] for q in questions], name
        assert len({q["variable"] for q in spec}) == len(spec), f"{name}: a variable asked twice"
        for awx_q, q in zip(spec, questions, strict=True):
            where = f"{name}: {q['variable']}"
            expected = AWX_TYPE.get(q["type"], "multiplechoice" if q.get("choices") else "text")
            assert awx_q["type"] == expected, where
            assert awx_q["required"] is bool(q.get("required")), where
            choices = awx_q["choices"].split("\n") if awx_q["choices"] else []
            if q["type"] == "bool":
                assert choices == ["true", "false"], where
                assert awx_q["default"] == str(q["default"]).lower(), where
            else:
                assert choices == q.get("choices", []), where
            if awx_q["type"] == "multiplechoice" and awx_q["default"]:
                assert awx_q["default"] in choices, where
            if awx_q["type"] == "multiselect":
                assert set(awx_q["default"].split("\n")) <= set(choices), where
                assert awx_q["default"].split("\n") == q.get("default", []), where
            if awx_q["type"] in {"text", "integer"}:
                assert isinstance(awx_q["min"], int) and isinstance(awx_q["max"], int), where
                assert awx_q["min"] <= awx_q["max"], where
                if q.get("default") not in (None, ""):
                    assert awx_q["default"] == q["default"], where


# --- the release workflow ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_nodes_reference_what_exists(name: str, rendered: dict[str, Any]) -> None:
    workflow = WORKFLOWS[name]
    ids = [n["id"] for n in workflow["nodes"]]
    assert len(ids) == len(set(ids)), f"{name}: duplicate node ids"
    for node in workflow["nodes"]:
        assert ("template" in node) != ("approval" in node), f"{name}: {node['id']} must be a template or an approval"
        if "template" in node:
            assert node["template"] in TEMPLATES, f"{name}: {node['id']} runs unknown template {node['template']}"
        else:
            assert node["approval"]["name"] and node["approval"]["timeout"] > 0
        for link in ("success", "failure", "always"):
            assert set(node.get(link, [])) <= set(ids), f"{name}: {node['id']} {link} -> unknown node"
    assert set(workflow["execute"]) <= TEAMS and set(workflow["approve"]) <= TEAMS
    nodes = {n["identifier"]: n for n in rendered["workflow_nodes"][name]}
    assert list(nodes) == ids
    for node in workflow["nodes"]:
        awx_node = nodes[node["id"]]
        if "template" in node:
            assert awx_node["unified_job_template"]["type"] == "job_template"
            assert awx_node["unified_job_template"]["name"] == node["template"]
        else:
            assert awx_node["unified_job_template"]["type"] == "workflow_approval"
        for link in ("success", "failure", "always"):
            assert [x["identifier"] for x in awx_node["related"][f"{link}_nodes"]] == node.get(link, [])


def test_release_workflow_approves_before_rollout_and_before_rollback() -> None:
    workflow = WORKFLOWS["GrandModel release"]
    nodes = {n["id"]: n for n in workflow["nodes"]}
    parents: dict[str, list[tuple[str, str]]] = {}
    for node in workflow["nodes"]:
        for link in ("success", "failure", "always"):
            for child in node.get(link, []):
                parents.setdefault(child, []).append((node["id"], link))
    roots = [i for i in nodes if i not in parents]
    assert len(roots) == 1 and "approval" in nodes[roots[0]], "the workflow must start with an approval"
    by_playbook = {n["id"]: TEMPLATES[n["template"]]["playbook"] for n in nodes.values() if "template" in n}
    rollout = [i for i, p in by_playbook.items() if p == "playbooks/rollout.yml"]
    rollback = [i for i, p in by_playbook.items() if p == "playbooks/rollback.yml"]
    assert len(rollout) == 1 and len(rollback) == 1
    for target in rollout + rollback:
        assert all("approval" in nodes[p] and link == "success" for p, link in parents[target]), target
    (approval,) = (p for p, _ in parents[rollback[0]])
    assert parents[approval] == [(rollout[0], "failure")], "the rollback must follow a failed rollout"


def test_the_release_workflow_holds_before_100_percent_then_promotes_or_aborts(rendered: dict[str, Any]) -> None:
    """The rollout node holds the release (rollout_approval=stop); its success awaits an approval whose approve
    runs the approval playbook with promote and whose deny (or timeout) runs it with abort. Each node's extra_data
    is an answer its template's survey accepts, and the rendered payload carries it."""
    workflow = WORKFLOWS["GrandModel release"]
    nodes = {n["id"]: n for n in workflow["nodes"]}
    (rollout,) = (n for n in nodes.values() if "template" in n
                  and TEMPLATES[n["template"]]["playbook"] == "playbooks/rollout.yml")
    assert rollout["extra_data"] == {"rollout_approval": "stop"}
    (held,) = rollout["success"]
    assert "approval" in nodes[held]
    decisions = {}
    for link in ("success", "failure"):
        (child,) = nodes[held][link]
        assert TEMPLATES[nodes[child]["template"]]["playbook"] == "playbooks/rollout_approve.yml"
        decisions[link] = nodes[child]["extra_data"]["rollout_decision"]
    assert decisions == {"success": "promote", "failure": "abort"}
    for node in nodes.values():
        survey = {q["variable"]: q for q in TEMPLATES.get(node.get("template", ""), {}).get("survey", [])}
        for variable, value in node.get("extra_data", {}).items():
            assert variable in survey, f"{node['id']}: {variable} is not a survey variable of {node['template']}"
            assert value in survey[variable].get("choices", [value]), f"{node['id']}: {variable}={value!r}"
    rendered_nodes = {n["identifier"]: n for n in rendered["workflow_nodes"]["GrandModel release"]}
    assert {i: n["extra_data"] for i, n in rendered_nodes.items() if n["extra_data"]} == {
        i: n["extra_data"] for i, n in nodes.items() if n.get("extra_data")}


def test_only_release_managers_launch_a_rollout() -> None:
    for name, template in TEMPLATES.items():
        if template["playbook"] in {"playbooks/rollout.yml", "playbooks/rollout_approve.yml", "site.yml",
                                    "playbooks/k8s.yml"}:
            assert template["execute"] == ["release-managers"], name
    for name, workflow in WORKFLOWS.items():
        if any(
            TEMPLATES[n["template"]]["playbook"] == "playbooks/rollout.yml"
            for n in workflow["nodes"]
            if "template" in n
        ):
            assert workflow["execute"] == ["release-managers"] and workflow["approve"] == ["release-managers"], name
    runbooks = {
        "playbooks/rollback.yml",
        "playbooks/switch_back.yml",
        "playbooks/backup.yml",
        "playbooks/drift_check.yml",
        "playbooks/restore.yml",
    }
    for name, template in TEMPLATES.items():
        if template["playbook"] in runbooks:
            assert "operators" in template["execute"], name


def test_every_template_notifies_on_failure() -> None:
    assert DEFS["awx_notify_on_error"], "templates and workflows send awx_notify_on_error when they fail"


# --- schedules ---------------------------------------------------------------------------------------------

RRULE = re.compile(
    r"DTSTART;TZID=(?P<tz>[A-Za-z_]+/[A-Za-z_]+):(?P<start>\d{8}T\d{6}) "
    r"RRULE:FREQ=(?:DAILY|WEEKLY|MONTHLY)(?:;INTERVAL=\d+)?(?:;BYDAY=(?:MO|TU|WE|TH|FR|SA|SU)(?:,(?:MO|TU|WE|TH|FR|SA|SU))*)?"
    r"(?:;BYMONTHDAY=\d{1,2})?"
)


def occurrences(rule: str, after: datetime, count: int) -> list[datetime]:
    parsed = rrulestr(rule.replace(" RRULE:", "\nRRULE:"))
    found: list[datetime] = []
    moment = after
    while len(found) < count:
        moment = parsed.after(moment)
        found.append(moment)
    return found


@pytest.mark.parametrize("schedule", DEFS["awx_schedules"], ids=lambda s: s["name"])
def test_schedule_rrule_parses_and_names_a_template(schedule: dict[str, Any]) -> None:
    assert schedule["template"] in TEMPLATES | WORKFLOWS
    match = RRULE.fullmatch(schedule["rrule"])
    assert match, f"{schedule['name']}: {schedule['rrule']!r} is not an AWX RRULE"
    assert match["tz"] == "America/New_York"
    # Ten occurrences across the start of daylight saving time (2027-03-14): the local time stays put.
    runs = occurrences(schedule["rrule"], datetime(2027, 3, 8, tzinfo=UTC), 10)
    local = [r.astimezone(EXCHANGE_TZ) for r in runs]
    start = datetime.strptime(match["start"], "%Y%m%dT%H%M%S")
    assert {(t.hour, t.minute) for t in local} == {(start.hour, start.minute)}
    assert len({r.utcoffset() for r in runs}) == 2, "the schedule must follow New York's DST, not a fixed offset"


def test_backups_run_after_the_close_on_exchange_days() -> None:
    (backup,) = (s for s in DEFS["awx_schedules"] if TEMPLATES[s["template"]]["playbook"] == "playbooks/backup.yml")
    local = [r.astimezone(EXCHANGE_TZ) for r in occurrences(backup["rrule"], datetime(2027, 3, 8, tzinfo=UTC), 15)]
    assert {t.weekday() for t in local} == {0, 1, 2, 3, 4}
    assert all((t.hour, t.minute) >= (16, 0) for t in local), "backups must start after the 16:00 close"


def test_daily_health_runs_before_the_open_on_exchange_days() -> None:
    (health,) = (s for s in DEFS["awx_schedules"]
                 if TEMPLATES[s["template"]]["playbook"] == "playbooks/runbooks/daily_health.yml")
    local = [r.astimezone(EXCHANGE_TZ) for r in occurrences(health["rrule"], datetime(2027, 3, 8, tzinfo=UTC), 15)]
    assert {t.weekday() for t in local} == {0, 1, 2, 3, 4}
    assert all((t.hour, t.minute) < (9, 30) for t in local), "the health check must end before the 09:30 open"


@pytest.mark.parametrize("schedule", DEFS["awx_schedules"], ids=lambda s: s["name"])
def test_schedule_answers_are_survey_answers_its_template_accepts(schedule: dict[str, Any]) -> None:
    """A schedule's extra_data is launched as survey answers: each key a survey variable, each value valid, and
    every required survey answer given (a scheduled launch cannot ask)."""
    survey = {q["variable"]: q for q in (TEMPLATES.get(schedule["template"]) or {}).get("survey", [])}
    for variable, value in schedule.get("extra_data", {}).items():
        assert variable in survey, f"{schedule['name']}: {variable} is not a survey variable of {schedule['template']}"
        question = survey[variable]
        if question["type"] == "str":
            assert isinstance(value, str), f"{schedule['name']}: {variable}={value!r} is not text"
        if "choices" in question:
            assert value in question["choices"], f"{schedule['name']}: {variable}={value!r} not a choice"
        if "max" in question:
            assert len(str(value)) <= question["max"]
    missing = [v for v, q in survey.items() if q.get("required") and v not in schedule.get("extra_data", {})]
    assert not missing, f"{schedule['name']}: the required survey answers {missing} are not given"


def test_the_freeze_covers_the_session_and_is_lifted_after_the_close() -> None:
    """Pre-market (which sets the freeze) before the 09:30 open, post-market (which lifts it) after the 16:00 close,
    on the same exchange days; no other schedule touches the freeze."""
    by_book = {TEMPLATES[s["template"]]["playbook"]: s for s in DEFS["awx_schedules"]}
    assert "playbooks/runbooks/change_freeze.yml" not in by_book, "the freeze is set and lifted by pre/post-market"
    pre, post = by_book["playbooks/runbooks/pre_market.yml"], by_book["playbooks/runbooks/post_market.yml"]
    start = datetime(2027, 3, 8, tzinfo=UTC)
    on = [r.astimezone(EXCHANGE_TZ) for r in occurrences(pre["rrule"], start, 15)]
    off = [r.astimezone(EXCHANGE_TZ) for r in occurrences(post["rrule"], start, 15)]
    assert [t.date() for t in on] == [t.date() for t in off]
    assert {t.weekday() for t in on} == {0, 1, 2, 3, 4}
    assert all((t.hour, t.minute) < (9, 30) for t in on) and all((t.hour, t.minute) >= (16, 0) for t in off)
    text = _read("playbooks/runbooks/pre_market.yml")
    assert 'change_freeze: "on"' in text and 'change_freeze: "off"' in _read("playbooks/runbooks/post_market.yml")


def test_the_access_review_runs_monthly() -> None:
    (review,) = (s for s in DEFS["awx_schedules"]
                 if TEMPLATES[s["template"]]["playbook"] == "playbooks/runbooks/access_review.yml")
    local = [r.astimezone(EXCHANGE_TZ) for r in occurrences(review["rrule"], datetime(2027, 3, 8, tzinfo=UTC), 12)]
    assert {t.day for t in local} == {1} and len({t.month for t in local}) == 12


def test_drift_check_runs_daily() -> None:
    (drift,) = (s for s in DEFS["awx_schedules"] if TEMPLATES[s["template"]]["playbook"] == "playbooks/drift_check.yml")
    local = [r.astimezone(EXCHANGE_TZ) for r in occurrences(drift["rrule"], datetime(2027, 3, 8, tzinfo=UTC), 14)]
    assert {t.weekday() for t in local} == set(range(7))
    assert all((b - a).days in {0, 1} and b.date() > a.date() for a, b in itertools.pairwise(local))


# --- the apply playbook ------------------------------------------------------------------------------------


def test_apply_playbook_passes_syntax_check() -> None:
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "--syntax-check", str(APPLY)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_apply_refuses_without_a_controller_and_names_what_is_missing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTROLLER_", "GM_AWX_"))}
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), str(APPLY), "--check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "controller host" in out and "project SCM URL" in out and "failure webhook URL" in out, out[-2000:]
    assert "Ensure the organization exists" not in out, "nothing may be sent to a controller"


def awx_tasks() -> list[tuple[str, str, dict[str, Any]]]:
    (play,) = yaml.safe_load(APPLY.read_text())

    def walk(tasks: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
        found = []
        for task in tasks:
            found += walk(task.get("block", []))
            for key, args in task.items():
                if key.startswith("awx.awx."):
                    found.append((task["name"], key, args))
        return found

    return walk(play["tasks"])


def test_apply_playbook_passes_only_parameters_the_awx_modules_take() -> None:
    """What syntax-check cannot see: a misspelt parameter or choice fails only on a controller."""
    tasks = awx_tasks()
    modules = sorted({module for _, module, _ in tasks})
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-doc"), "--json", *modules],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    docs = {name: doc["doc"]["options"] for name, doc in json.loads(proc.stdout).items()}
    assert set(docs) == set(modules)
    (play,) = yaml.safe_load(APPLY.read_text())
    for module, options in docs.items():
        assert set(play["module_defaults"]["group/awx.awx.controller"]) <= set(options), module
    for name, module, args in tasks:
        options = docs[module]
        assert set(args) <= set(options), f"{name}: {module} has no {set(args) - set(options)}"
        for key, value in args.items():
            if isinstance(value, str) and "{{" not in value and options[key].get("choices"):
                assert value in options[key]["choices"], f"{name}: {key}={value!r}"
    roles = {args["role"] for _, module, args in tasks if module == "awx.awx.role"}
    assert roles == {"execute", "approval", "use"}
