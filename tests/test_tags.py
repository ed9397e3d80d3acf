"""The documented tags select their tasks: `--tags <role>_install` lists that role's install tasks, nothing else.

CONTRIBUTING promises `<role>_preflight`, `<role>_install`, `<role>_configure` and `<role>_service` (and a role's
own sub-tags) on the steps of `tasks/main.yml`. A tag on a dynamic `include_tasks` selects only the include, so
the included tasks never run under `--tags`; static imports (or `apply: {tags: ...}`) hand the tag to every task.

For each role and each tag on its `tasks/main.yml`, the expected list is read from the YAML: every task of every
file imported under that tag, in order, nested imports and blocks expanded. A nested dynamic include counts as
one task only when its `apply` hands the tag on; otherwise its tasks are expected too, which `--list-tasks` cannot
show, so the case fails. That is compared with `ansible-playbook --list-tasks --tags <tag>` on a playbook that
applies the role alone. The one other line allowed is Ansible's own argument validation (tagged `always`).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import COLLECTION, REPO, VENV_BIN

ROLES_DIR = COLLECTION / "roles"
INCLUDES = {"include_tasks", "ansible.builtin.include_tasks", "import_tasks", "ansible.builtin.import_tasks"}
ROLE_INCLUDES = {"include_role", "ansible.builtin.include_role", "import_role", "ansible.builtin.import_role"}
STATIC_ROLE_IMPORTS = {"import_role", "ansible.builtin.import_role"}
VALIDATION = "Validating arguments against arg spec"
SHARED = "quantnova.grandmodel._common"
# "      <role> : <task name>\tTAGS: [...]"; an include_role task is listed without the role.
LISTED = re.compile(r"^\s{6}(?:(?P<role>\S+) : )?(?P<name>.*)\tTAGS: \[(?P<tags>[^\]]*)\]$")


def roles() -> list[str]:
    return sorted(p.parent.parent.name for p in ROLES_DIR.glob("*/tasks/main.yml"))


def load_tasks(path: Path) -> list[dict[str, Any]]:
    return yaml.safe_load(path.read_text()) or []


def task_action(task: dict[str, Any]) -> tuple[str, Any]:
    for key, value in task.items():
        if key in INCLUDES or key in ROLE_INCLUDES:
            return key, value
    return "", None


def role_entry_point(target: dict[str, Any]) -> tuple[Path, list[dict[str, Any]]]:
    """The tasks folder and tasks of an import_role's entry point (a role of this collection)."""
    tasks_dir = ROLES_DIR / target["name"].removeprefix("quantnova.grandmodel.") / "tasks"
    entry = target.get("tasks_from", "main")
    return tasks_dir, load_tasks(tasks_dir / (entry if entry.endswith(".yml") else entry + ".yml"))


def tags_of(task: dict[str, Any]) -> set[str]:
    tags = task.get("tags", [])
    return {tags} if isinstance(tags, str) else set(tags)


def apply_tags(target: Any) -> set[str]:
    return set(target.get("apply", {}).get("tags", [])) if isinstance(target, dict) else set()


def expand(tasks_dir: Path, tasks: list[dict[str, Any]], tag: str, nested: bool = False) -> list[str]:
    """The task names `--tags <tag>` should list for these tasks (all of them carry the tag).

    A step of tasks/main.yml must be static, so that its tasks are listed. Below that, a dynamic include
    whose `apply` hands the tag on is listed as itself (its tasks get the tag when it runs).
    """
    names: list[str] = []
    for task in tasks:
        sections = [section for section in ("block", "rescue", "always") if section in task]
        for section in sections:
            names.extend(expand(tasks_dir, task[section], tag, nested))
        if sections:
            continue
        action, target = task_action(task)
        handed_on = nested and tag in apply_tags(target)
        if action in INCLUDES and not handed_on:
            file_name = target if isinstance(target, str) else target["file"]
            names.extend(expand(tasks_dir, load_tasks(tasks_dir / file_name), tag, nested=True))
        elif action in STATIC_ROLE_IMPORTS:
            # A static import_role inlines the entry point's tasks, which inherit the tag (the platform assert of
            # role _common in every preflight).
            names.extend(expand(*role_entry_point(target), tag, nested=True))
        elif action in ROLE_INCLUDES and not handed_on:
            names.append(f"<{action} without apply: {{tags: [{tag}]}}: the tag would not reach its tasks>")
        else:
            names.append(task.get("name") or next(iter(task)))
    return names


def expected(role: str, tag: str) -> list[str]:
    tasks_dir = ROLES_DIR / role / "tasks"
    chosen = [task for task in load_tasks(tasks_dir / "main.yml") if tag in tags_of(task)]
    return expand(tasks_dir, chosen, tag)


def main_tags(role: str) -> list[str]:
    """The role's own tags on its tasks/main.yml, in order of first appearance."""
    found: list[str] = []
    for task in load_tasks(ROLES_DIR / role / "tasks" / "main.yml"):
        found.extend(t for t in sorted(tags_of(task)) if t.startswith(role + "_") and t not in found)
    return found


CASES = [(role, tag) for role in roles() for tag in main_tags(role)]


def list_all_tasks(playbook: Path) -> tuple[int, str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_FORCE_COLOR="0", NO_COLOR="1")
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", str(playbook), "--list-tasks"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    return proc.returncode, proc.stdout + proc.stderr


PLAY = re.compile(r"^\s{2}play #\d+ \(localhost\): Apply (?P<role>\S+) alone\t")


@pytest.fixture(scope="module")
def listings(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[int, str]]:
    """What `--tags <tag>` selects, for every selected case, from ONE `ansible-playbook --list-tasks` start.

    One play per role lists every task with its effective tags (imports and blocks inherit them, a dynamic
    include is one line); `--tags <tag>` runs exactly the lines whose tags hold <tag> or `always`. One start
    instead of one per case (about 70 starts took two minutes of CI).
    """
    selected = [(item.callspec.params["role"], item.callspec.params["tag"]) for item in request.session.items
                if getattr(item, "originalname", "") == "test_tag_lists_exactly_the_tasks_of_its_files"]
    if not selected:
        return {}
    book = tmp_path_factory.mktemp("tag-plays") / "roles.yml"
    book.write_text(yaml.safe_dump([{"name": f"Apply {role} alone", "hosts": "localhost", "gather_facts": False,
                                     "roles": [{"role": f"quantnova.grandmodel.{role}"}]}
                                    for role in sorted({role for role, _tag in selected})]))
    rc, output = list_all_tasks(book)
    per_role: dict[str, list[str]] = {}
    role = ""
    for line in output.splitlines():
        play = PLAY.match(line)
        if play:
            role = play["role"]
        elif role and LISTED.match(line):
            per_role.setdefault(role, []).append(line)
    out: dict[tuple[str, str], tuple[int, str]] = {}
    for role, tag in selected:
        lines = [line for line in per_role.get(role, [])
                 if {t.strip() for t in LISTED.match(line)["tags"].split(",")} & {tag, "always"}]  # type: ignore[index]
        out[(role, tag)] = (rc, "\n".join(lines) if rc == 0 and lines else output)
    return out


def params() -> list[Any]:
    return [pytest.param(role, tag, id=f"{role}-{tag}") for role, tag in CASES]


def test_every_role_has_its_documented_tags() -> None:
    for role in roles():
        tags = main_tags(role)
        steps = {path.stem for path in (ROLES_DIR / role / "tasks").glob("*.yml")}
        for step in ("preflight", "install", "configure", "service"):
            if step in steps:
                assert f"{role}_{step}" in tags, f"{role}: tasks/{step}.yml has no {role}_{step} tag"


@pytest.mark.parametrize(("role", "tag"), params())
def test_tag_lists_exactly_the_tasks_of_its_files(
        role: str, tag: str, listings: dict[tuple[str, str], tuple[int, str]]) -> None:
    rc, output = listings[(role, tag)]
    assert rc == 0, output
    listed = [LISTED.match(line) for line in output.splitlines()]
    rows = [(m["role"], m["name"], m["tags"]) for m in listed if m]
    assert rows, output
    # The shared-values role (_common, a dependency of most roles) adds its argument validation (tagged always,
    # for its main values and, imported by a preflight, for its platform entry point) and the tasks of the
    # entry points a role imports statically (the platform assert), which expected() expands.
    rows = [row for row in rows if not (row[0] == SHARED and row[1].startswith(VALIDATION)
                                        and "always" in {t.strip() for t in row[2].split(",")})]
    assert all(r in (None, f"quantnova.grandmodel.{role}", SHARED) for r, _name, _tags in rows), output
    names = [name for _role, name, tags in rows if not (name.startswith(VALIDATION) and tags == "always")]
    want = expected(role, tag)
    assert want, f"nothing in {role}/tasks/main.yml carries {tag}"
    assert names == want, f"--tags {tag} listed\n  " + "\n  ".join(names) + "\nexpected\n  " + "\n  ".join(want)


def static_tasks(tasks_dir: Path, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every task these tasks run, static imports and blocks expanded (the steps of tasks/main.yml are static)."""
    out: list[dict[str, Any]] = []
    for task in tasks:
        sections = [section for section in ("block", "rescue", "always") if section in task]
        for section in sections:
            out.extend(static_tasks(tasks_dir, task[section]))
        action, target = task_action(task)
        if action in INCLUDES:
            file_name = target if isinstance(target, str) else target["file"]
            out.extend(static_tasks(tasks_dir, load_tasks(tasks_dir / file_name)))
        elif not sections:
            out.append(task)
    return out


def own_vars(role: str, text: str) -> set[str]:
    return set(re.findall(rf"\b__{role}_[a-z0-9_]+", text))


@pytest.mark.parametrize(("role", "tag"), CASES, ids=[f"{role}-{tag}" for role, tag in CASES])
def test_a_tag_alone_sets_what_its_steps_test(role: str, tag: str) -> None:
    """`--tags <tag>` alone must not stop on an undefined variable: a `when` of a step of tasks/main.yml that
    reads a variable the role sets at run time (set_fact or register) needs the task setting it under the same
    tag (model_service's --tags model_service_install once failed on an undefined __model_service_target_color).
    """
    tasks_dir = ROLES_DIR / role / "tasks"
    steps = [task for task in load_tasks(tasks_dir / "main.yml") if tag in tags_of(task)]
    selected = static_tasks(tasks_dir, steps)
    set_here = {task["register"] for task in selected if "register" in task}
    for task in selected:
        for key in ("ansible.builtin.set_fact", "set_fact"):
            if isinstance(task.get(key), dict):
                set_here.update(task[key])
    set_anywhere = set_here.copy()
    for task in static_tasks(tasks_dir, load_tasks(tasks_dir / "main.yml")):
        set_anywhere.update([task["register"]] if "register" in task else [])
        for key in ("ansible.builtin.set_fact", "set_fact"):
            if isinstance(task.get(key), dict):
                set_anywhere.update(task[key])
    for step in steps:
        when = step.get("when", [])
        tested = own_vars(role, " ".join(when) if isinstance(when, list) else str(when)) & set_anywhere
        missing = sorted(tested - set_here)
        assert not missing, (f"{role}: step '{step.get('name')}' tests {missing}, set at run time by a task that "
                             f"--tags {tag} does not select; give that task the tag too")


def test_a_tag_on_a_dynamic_include_is_caught(tmp_path: Path) -> None:
    """The check itself: a role whose step is a bare include_tasks fails it (the fault this test guards)."""
    role = tmp_path / "ansible_collections" / "probe" / "tags" / "roles" / "probe"
    (role / "tasks").mkdir(parents=True)
    (role / "tasks" / "main.yml").write_text(
        "- name: Install\n  ansible.builtin.include_tasks: install.yml\n  tags: [probe_install]\n"
        "- name: Install statically\n  ansible.builtin.import_tasks: install.yml\n  tags: [probe_static]\n")
    (role / "tasks" / "install.yml").write_text(
        "- name: Ensure the probe package is present\n  ansible.builtin.debug:\n    msg: install\n")
    book = tmp_path / "probe.yml"
    book.write_text("- name: Probe\n  hosts: localhost\n  gather_facts: false\n  roles: [probe.tags.probe]\n")
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
               ANSIBLE_COLLECTIONS_PATH=f"{tmp_path}:{REPO}")
    shown = {}
    for tag in ("probe_install", "probe_static"):
        proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", str(book), "--list-tasks",
                               "--tags", tag], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                              check=True)
        shown[tag] = [m["name"] for m in map(LISTED.match, proc.stdout.splitlines()) if m]
    assert shown == {"probe_install": ["Install"], "probe_static": ["Ensure the probe package is present"]}
    # The fixture's shortcut (one full listing, filtered by each line's tags) selects what --tags selects.
    full = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", str(book), "--list-tasks"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
    rows = [m for m in map(LISTED.match, full.stdout.splitlines()) if m]
    filtered = {tag: [m["name"] for m in rows if tag in {t.strip() for t in m["tags"].split(",")}] for tag in shown}
    assert filtered == shown
