"""The change freeze: playbooks/runbooks/change_freeze.yml sets and lifts it; the release's plan step
(roles/rollout/tasks/freeze_guard.yml) refuses a release while it is set unless forced with a reason.

Both run here with ansible-playbook on this machine (connection local, the freeze file in a temporary
directory): the runbook writes the file exactly as on a load balancer and the guard reads that same file,
so the two sides are proven together. The release flow itself (the guard inside playbooks/rollout.yml on
real hosts) runs in the rollout scenario only without a freeze.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .ansible_batch import Batch, run_batch
from .conftest import COLLECTION, REPO, VENV_BIN

RUNBOOK = REPO / "playbooks" / "runbooks" / "change_freeze.yml"
GUARD = COLLECTION / "roles" / "rollout" / "tasks" / "freeze_guard.yml"
GUARD_PLAY = """
- name: Run the release's change-freeze guard
  hosts: localhost
  gather_facts: false
  vars:
    rollout_freeze_override_reason: ""  # the role's default (extra vars beat it)
  tasks:
    - name: Guard
      ansible.builtin.include_tasks: {tasks}
"""


# USER names who set the freeze. Ansible's temporary folder must not follow it: "~deskops"
# (no such account) became a literal folder next to the playbook, inside the collection.
PLAY_ENV = {"USER": "deskops", "ANSIBLE_REMOTE_TMP": str(Path(tempfile.gettempdir()) / "gm-test-change-freeze")}


def play(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                           "-e", f"ansible_python_interpreter={sys.executable}", "-e", "ansible_become=false",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, ANSIBLE_NOCOLOR="1", **PLAY_ENV))


def runbook(freeze_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return play([str(RUNBOOK), "-e", "runbook_lb_group=localhost", "-e", f"rollout_freeze_file={freeze_file}",
                 *extra])


def guard(tmp_path: Path, freeze_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    book = tmp_path / "guard.yml"
    book.write_text(GUARD_PLAY.format(tasks=GUARD))
    return play([str(book), "-e", f"rollout_freeze_file={freeze_file}", *extra])


def changed(proc: subprocess.CompletedProcess[str]) -> int:
    found = re.search(r"localhost\s+: ok=\d+\s+changed=(\d+)", proc.stdout)
    assert found, proc.stdout[-2000:]
    return int(found.group(1))


def test_set_refuse_force_lift(tmp_path: Path) -> None:
    freeze = tmp_path / "etc" / "change-freeze.json"
    assert guard(tmp_path, freeze).returncode == 0  # no freeze: a release goes ahead

    on = runbook(freeze, "-e", "change_freeze=on",
                 "-e", json.dumps({"change_freeze_reason": "session <b>open</b>; $(rm -rf /)"}))
    assert on.returncode == 0, on.stdout[-2000:]
    assert changed(on) == 2  # the directory and the file
    body = json.loads(freeze.read_text())
    assert body["reason"] == "session _b_open_/b_; _(rm -rf /)" and body["set_by"] == "deskops"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["since"])

    again = runbook(freeze, "-e", "change_freeze=on", "-e", "change_freeze_reason=another")
    assert again.returncode == 0 and changed(again) == 0
    assert json.loads(freeze.read_text()) == body  # the first reason and time are kept

    # The three answers to the set freeze in one ansible-playbook run: a host per override reason (none, blank,
    # given), each reading the same freeze file.
    reasons = {"refused": "", "blank": "   ", "forced": "hotfix for a mispriced feed"}
    answers = run_batch(tmp_path / "answers", GUARD_PLAY.replace("hosts: localhost", "hosts: all").replace(
        'rollout_freeze_override_reason: ""  # the role\'s default (extra vars beat it)',
        'rollout_freeze_override_reason: "{{{{ case_override_reason }}}}"  # this case\'s answer').format(tasks=GUARD),
        {host: {"case_override_reason": reason, "rollout_freeze_file": str(freeze)}
         for host, reason in reasons.items()},
        "-e", "ansible_become=false", env=PLAY_ENV)
    refused = answers["refused"]
    assert refused.failed, refused
    assert f"a change freeze is set on refused since {body['since']} by deskops" in refused.said, refused
    assert "Lift it with playbooks/runbooks/change_freeze.yml -e change_freeze=off" in refused.said
    blank = answers["blank"]
    assert blank.failed and "a change freeze is set on blank" in blank.said, blank  # a blank reason is no reason

    forced = answers["forced"]
    assert not forced.failed, forced
    assert "overridden: hotfix for a mispriced feed" in forced.said, forced

    off = runbook(freeze, "-e", "change_freeze=off")
    assert off.returncode == 0 and changed(off) == 1 and not freeze.exists()
    assert changed(runbook(freeze, "-e", "change_freeze=off")) == 0
    assert guard(tmp_path, freeze).returncode == 0


UNREADABLE = ["", "not json", "[1, 2]"]


@pytest.fixture(scope="module")
def unreadable(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Batch]:
    """The guard over every unreadable freeze file in one ansible-playbook run: a host per file."""
    work = tmp_path_factory.mktemp("unreadable")
    hosts = {}
    for index, content in enumerate(UNREADABLE):
        freeze = work / f"case{index}" / "change-freeze.json"
        freeze.parent.mkdir()
        freeze.write_text(content)
        hosts[f"case{index}"] = {"rollout_freeze_file": str(freeze)}
    return work, run_batch(work, GUARD_PLAY.replace("hosts: localhost", "hosts: all").format(tasks=GUARD), hosts,
                           "-e", "ansible_become=false", env=PLAY_ENV)


@pytest.mark.parametrize(("index", "content"), list(enumerate(UNREADABLE)))
def test_an_unreadable_freeze_file_still_freezes(unreadable: tuple[Path, Batch], index: int, content: str) -> None:
    work, batch = unreadable
    freeze = work / f"case{index}" / "change-freeze.json"
    assert freeze.read_text() == content
    outcome = batch[f"case{index}"]
    assert outcome.failed, outcome
    assert f"a change freeze is set on case{index}" in outcome.said, outcome
    assert f"unreadable freeze file {freeze}" in outcome.said, outcome


def test_check_mode_and_bad_requests_touch_nothing(tmp_path: Path) -> None:
    freeze = tmp_path / "etc" / "change-freeze.json"
    checked = runbook(freeze, "-e", "change_freeze=on", "--check")
    assert checked.returncode == 0, checked.stdout[-2000:]
    assert not freeze.parent.exists()
    for value in ("", "maybe", "1"):
        bad = runbook(freeze, "-e", f"change_freeze={value}")
        out = " ".join((bad.stdout + bad.stderr).split())
        assert bad.returncode != 0 and f"change_freeze must be on or off (got '{value}')" in out, out[-2000:]
    assert not freeze.parent.exists()
