"""A release is refused while an emergency stop holds the front door (roles/rollout/tasks/halt_guard.yml).

playbooks/runbooks/emergency_stop.yml writes its halt file into a directory that nginx includes; the
release's plan step looks into the same directory on every load balancer and refuses while a `*.conf`
file is there. The guard runs here with ansible-playbook against a temporary directory; the directory and
the file name are read from the runbooks' own variables, so the two sides cannot drift apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import COLLECTION, REPO, VENV_BIN

TASKS = COLLECTION / "roles" / "rollout" / "tasks" / "halt_guard.yml"
RUNBOOK_VARS = yaml.safe_load((COLLECTION / "playbooks" / "runbooks" / "vars" / "runbooks.yml").read_text())
ROLLOUT_DEFAULTS = yaml.safe_load((COLLECTION / "roles" / "rollout" / "defaults" / "main.yml").read_text())

PLAY = """
- name: Run the release's halt guard
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Guard
      ansible.builtin.include_tasks: {tasks}
"""


def guard(tmp_path: Path, halt_dir: Path) -> subprocess.CompletedProcess[str]:
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAY.format(tasks=TASKS))
    return subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                           "-e", f"ansible_python_interpreter={sys.executable}", "-e", f"rollout_halt_dir={halt_dir}",
                           str(playbook)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, ANSIBLE_NOCOLOR="1"))


def test_the_guard_looks_where_the_emergency_stop_writes() -> None:
    halt_dir = ROLLOUT_DEFAULTS["rollout_halt_dir"]
    assert RUNBOOK_VARS["__runbook_halt_dir"] == halt_dir
    halt_file = Path(RUNBOOK_VARS["__runbook_halt_file"])
    assert str(halt_file.parent) == halt_dir and halt_file.suffix == ".conf"


@pytest.mark.parametrize(("files", "refused"), [
    (None, False),  # no directory at all: never halted on this load balancer
    ([], False),
    (["README.txt"], False),  # nginx includes only *.conf
    (["00-emergency-stop.conf"], True),
    (["10-by-hand.conf", "README.txt"], True),  # any halt file nginx would include
])
def test_a_release_is_refused_exactly_while_a_halt_file_is_there(
        tmp_path: Path, files: list[str] | None, refused: bool) -> None:
    halt_dir = tmp_path / "halt.d"
    if files is not None:
        halt_dir.mkdir()
        for name in files:
            (halt_dir / name).write_text("return 503;\n")
    proc = guard(tmp_path, halt_dir)
    output = proc.stdout + proc.stderr
    if not refused:
        assert proc.returncode == 0, output[-2000:]
        return
    assert proc.returncode != 0, output[-2000:]
    assert "trading is halted on localhost" in output, output[-2000:]
    assert str(halt_dir / files[0]) in output and "Run playbooks/runbooks/resume.yml first" in output, output[-2000:]
