"""quantnova.grandmodel.managed_file: the same bytes as ansible.builtin.template and copy, in one module run.

Every case runs the real action and module with ansible-playbook on this machine (one host per case, connection
local, each case in its own folder), and reads the files it left, their owner and mode, and what it reported.
The roles write their configuration with it, so a re-run of site.yml on a deployed sandbox that reports
changed=0 after a deployment by ansible.builtin.template proves the same bytes for every real template; these
cases prove what a re-run cannot: the edges, the refusals and the moment of the write.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path
from typing import Any

import pytest

from .ansible_batch import Batch, run_batch

MODULE = "quantnova.grandmodel.managed_file"

# Loops, trim_blocks, a trailing blank line, an include, a filter and the ansible_managed variable: what the
# role templates use.
TEMPLATE = """# {{ ansible_managed }}
{% for name in names %}
{{ name }} = {{ values[name] | default('none') }}
{% endfor %}
{% include 'part.j2' %}

last line without a newline"""
PART = "{% if flag %}flag on{% else %}flag off{% endif %}\n"


def cases_run(work: Path, tasks: list[dict[str, Any]], hosts: dict[str, dict[str, Any]], *extra: str) -> Batch:
    (work / "templates").mkdir(parents=True, exist_ok=True)
    (work / "templates" / "config.j2").write_text(TEMPLATE)
    (work / "templates" / "part.j2").write_text(PART)
    play = [{"name": "managed_file cases", "hosts": "all", "gather_facts": False,
             "vars": {"names": ["alpha", "beta"], "values": {"alpha": 1}, "flag": True}, "tasks": tasks}]
    return run_batch(work, play, hosts, *extra)


def mode_of(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


def test_same_bytes_as_builtin_and_a_second_run_changes_nothing(work: Path) -> None:
    out = work / "out"
    out.mkdir()
    tasks = [
        {"name": "builtin template", "ansible.builtin.template": {
            "src": "config.j2", "dest": f"{out}/builtin.conf", "mode": "0640"}},
        {"name": "managed template", MODULE: {"src": "config.j2", "dest": f"{out}/managed.conf", "mode": "0640"}},
        {"name": "builtin copy", "ansible.builtin.copy": {
            "content": "{{ values | to_nice_json }}\n", "dest": f"{out}/builtin.json", "mode": "0600"}},
        {"name": "managed copy", MODULE: {
            "content": "{{ values | to_nice_json }}\n", "dest": f"{out}/managed.json", "mode": "0600"}},
        {"name": "builtin dict", "ansible.builtin.copy": {"content": {"a": [1, 2]}, "dest": f"{out}/builtin.dict"}},
        {"name": "managed dict", MODULE: {"content": {"a": [1, 2]}, "dest": f"{out}/managed.dict"}},
    ]
    first = cases_run(work, tasks, {"one": {}})
    assert not first["one"].failed, first["one"]
    for kind in ("conf", "json", "dict"):
        assert (out / f"managed.{kind}").read_bytes() == (out / f"builtin.{kind}").read_bytes(), kind
    assert mode_of(out / "managed.conf") == "0o640" and mode_of(out / "managed.json") == "0o600"
    assert "flag on" in (out / "managed.conf").read_text()
    assert first["one"].stats["changed"] == 6

    second = cases_run(work, tasks, {"one": {}})
    assert not second["one"].failed, second["one"]
    assert second["one"].stats["changed"] == 0, second["one"]
    managed = [r for r in second["one"].results if "content_changed" in r]
    assert len(managed) == 3 and not any(r["content_changed"] for r in managed)


def test_changes_check_mode_and_diff_tell_the_truth(work: Path) -> None:
    out = work / "out"
    out.mkdir()
    (out / "content").write_text("old\n")
    os.chmod(out / "content", 0o644)
    (out / "attrs").write_text("same\n")
    os.chmod(out / "attrs", 0o644)
    tasks = [
        {"name": "content", MODULE: {"content": "new\n", "dest": f"{out}/content", "mode": "0644"}},
        {"name": "mode only", MODULE: {"content": "same\n", "dest": f"{out}/attrs", "mode": "0600"}},
        {"name": "new file", MODULE: {"content": "fresh\n", "dest": f"{out}/absent", "mode": "0640"}},
    ]
    # In check mode the directory an earlier task would create is not there: the file would be created in it.
    in_new_dir = cases_run(work, [{"name": "in a new directory", MODULE: {
        "content": "x\n", "dest": f"{out}/new_dir/file", "mode": "0644"}}], {"one": {}}, "--check")
    assert not in_new_dir["one"].failed and in_new_dir["one"].stats["changed"] == 1, in_new_dir["one"]
    assert not (out / "new_dir").exists()
    checked = cases_run(work, tasks, {"one": {}}, "--check", "--diff")
    assert not checked["one"].failed, checked["one"]
    assert checked["one"].stats["changed"] == 3
    assert (out / "content").read_text() == "old\n" and mode_of(out / "attrs") == "0o644"
    assert not (out / "absent").exists()
    diffs = [r.get("diff") for r in checked["one"].results]
    assert diffs[0][0]["before"] == "old\n" and diffs[0][0]["after"] == "new\n"
    assert diffs[1][0]["before"] == {"mode": "0644"} and diffs[1][0]["after"] == {"mode": "0600"}
    assert diffs[2][0]["before"] == "" and diffs[2][0]["after"] == "fresh\n"

    inode = (out / "attrs").stat().st_ino
    applied = cases_run(work, tasks, {"one": {}}, "--diff")
    assert not applied["one"].failed and applied["one"].stats["changed"] == 3, applied["one"]
    assert (out / "content").read_text() == "new\n" and (out / "absent").read_text() == "fresh\n"
    assert mode_of(out / "attrs") == "0o600" and (out / "attrs").stat().st_ino == inode  # attributes in place
    assert [r["content_changed"] for r in applied["one"].results] == [True, False, True]

    again = cases_run(work, tasks, {"one": {}}, "--check", "--diff")
    assert again["one"].stats["changed"] == 0, again["one"]


def test_the_new_content_has_its_owner_and_mode_before_it_lands_and_a_rejected_one_changes_nothing(
        work: Path) -> None:
    out = work / "out"
    out.mkdir()
    (out / "guarded.conf").write_text("good = 1\n")
    nobody = pwd.getpwnam("nobody")
    seen = work / "seen"
    # The validate command sees the candidate exactly as it will land: record its owner and mode then.
    record = f"sh -c 'stat -c \"%a %U\" \"$1\" > {seen}; grep -q good \"$1\"' candidate %s"
    tasks = [{"name": "secret", MODULE: {
        "content": "{{ body }}", "dest": f"{out}/guarded.conf", "owner": "nobody", "mode": "0600",
        "validate": record}}]
    accepted = cases_run(work, tasks, {"one": {"body": "good = 2\n"}})
    assert not accepted["one"].failed, accepted["one"]
    assert seen.read_text().split() == ["600", "nobody"]
    assert (out / "guarded.conf").read_text() == "good = 2\n"
    assert (out / "guarded.conf").stat().st_uid == nobody.pw_uid

    rejected = cases_run(work, tasks, {"one": {"body": "bad = 3\n"}})
    assert rejected["one"].failed
    said = rejected["one"].said
    assert "rejected the new content" in said and "guarded.conf is unchanged" in said and "exit 1" in said
    assert (out / "guarded.conf").read_text() == "good = 2\n"
    assert sorted(p.name for p in out.iterdir()) == ["guarded.conf"], "no candidate left behind"


def test_force_false_keeps_the_content_and_still_sets_the_mode(work: Path) -> None:
    out = work / "out"
    out.mkdir()
    (out / "kept").write_text("edited by hand\n")
    os.chmod(out / "kept", 0o666)
    tasks = [{"name": "kept", MODULE: {"content": "default\n", "dest": f"{out}/kept", "mode": "0644",
                                       "force": False}},
             {"name": "created", MODULE: {"content": "default\n", "dest": f"{out}/created", "mode": "0644",
                                          "force": False}}]
    result = cases_run(work, tasks, {"one": {}})
    assert not result["one"].failed, result["one"]
    assert (out / "kept").read_text() == "edited by hand\n" and mode_of(out / "kept") == "0o644"
    assert (out / "created").read_text() == "default\n"


BAD = {
    "no_directory": ({"content": "x", "dest": "{out}/missing/file"}, "does not exist: create it"),
    "a_directory": ({"content": "x", "dest": "{out}"}, "is a directory"),
    "a_link": ({"content": "x", "dest": "{out}/link"}, "is a symbolic link"),
    "both": ({"content": "x", "src": "config.j2", "dest": "{out}/f"}, "exactly one of src"),
    "neither": ({"dest": "{out}/f"}, "exactly one of src"),
    "no_template": ({"src": "missing.j2", "dest": "{out}/f"}, "template 'missing.j2'"),
    "render_option": ({"src": "config.j2", "dest": "{out}/f", "lstrip_blocks": True},
                      "does not support lstrip_blocks"),
    "no_such_owner": ({"content": "x", "dest": "{out}/f", "owner": "gm-no-such-user"},
                      "does not exist on this host"),
    "validate_without_path": ({"content": "x", "dest": "{out}/f", "validate": "true"}, "with %s"),
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Batch]:
    work = tmp_path_factory.mktemp("refusals")
    hosts: dict[str, dict[str, Any]] = {}
    for name, (args, _) in BAD.items():
        out = work / name
        out.mkdir()
        (out / "target").write_text("live\n")
        os.symlink(out / "target", out / "link")
        hosts[name] = {"case_args": {key: (value.format(out=out) if isinstance(value, str) else value)
                                     for key, value in args.items()}}
    tasks = [{"name": "refused", MODULE: {key: f"{{{{ case_args.{key} | default(omit) }}}}"
                                          for key in ("content", "src", "dest", "owner", "validate", "lstrip_blocks")}}]
    return work, cases_run(work, tasks, hosts)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_with_what_to_fix_and_touches_nothing(refusals: tuple[Path, Batch], case: str) -> None:
    work, batch = refusals
    outcome = batch[case]
    assert outcome.failed, outcome
    assert BAD[case][1] in outcome.said, outcome
    out = work / case
    assert sorted(p.name for p in out.iterdir()) == ["link", "target"]
    assert (out / "target").read_text() == "live\n"


PATHS = "quantnova.grandmodel.paths"


def test_paths_creates_sets_and_removes_in_one_run_and_then_changes_nothing(work: Path) -> None:
    out = work / "out"
    out.mkdir()
    (out / "loose").mkdir()
    os.chmod(out / "loose", 0o777)
    (out / "owned").mkdir()
    os.chmod(out / "owned", 0o770)
    (out / "stale.txt").write_text("old\n")
    (out / "stale_dir" / "inner").mkdir(parents=True)
    tasks = [{"name": "paths", PATHS: {
        "directories": [
            {"path": f"{out}/new/deep", "owner": "nobody", "mode": "0750"},
            {"path": f"{out}/loose", "mode": "0755"},
            {"path": f"{out}/owned", "mode": "0755", "keep_existing": True},
        ],
        "absent": [f"{out}/stale.txt", f"{out}/stale_dir", f"{out}/never_there"]}}]
    checked = cases_run(work, tasks, {"one": {}}, "--check", "--diff")
    result = checked["one"].results[0]
    assert not checked["one"].failed and result["changed"], checked["one"]
    assert result["created"] == [f"{out}/new/deep"] and result["updated"] == [f"{out}/loose"]
    assert result["removed"] == [f"{out}/stale.txt", f"{out}/stale_dir"]
    assert not (out / "new").exists() and (out / "stale.txt").exists() and mode_of(out / "loose") == "0o777"

    applied = cases_run(work, tasks, {"one": {}})
    assert not applied["one"].failed and applied["one"].stats["changed"] == 1, applied["one"]
    nobody = pwd.getpwnam("nobody").pw_uid
    for directory in (out / "new", out / "new" / "deep"):  # a missing parent gets the same attributes
        assert mode_of(directory) == "0o750" and directory.stat().st_uid == nobody
    assert mode_of(out / "loose") == "0o755" and mode_of(out / "owned") == "0o770"
    assert not (out / "stale.txt").exists() and not (out / "stale_dir").exists()

    again = cases_run(work, tasks, {"one": {}})
    assert again["one"].stats["changed"] == 0, again["one"]


def test_paths_never_replaces_a_file_that_is_in_the_way(work: Path) -> None:
    out = work / "out"
    out.mkdir()
    (out / "file").write_text("data\n")
    tasks = [{"name": "in the way", PATHS: {"directories": [{"path": f"{out}/file/sub"}]}, "ignore_errors": True},
             {"name": "itself", PATHS: {"directories": [{"path": f"{out}/file"}]}, "ignore_errors": True},
             {"name": "relative", PATHS: {"directories": [{"path": "relative/dir"}]}, "ignore_errors": True},
             {"name": "root", PATHS: {"absent": ["/"]}, "ignore_errors": True}]
    result = cases_run(work, tasks, {"one": {}})
    messages = [str(r.get("msg", "")) for r in result["one"].results]
    assert result["one"].stats["ignored"] == 4, result["one"]
    assert "a parent of" in messages[0] and "is not a directory: move it away first" in messages[1]
    assert "not an absolute path" in messages[2] and "absolute path below /" in messages[3]
    assert (out / "file").read_text() == "data\n"
