"""A release is refused while an emergency stop holds the front door (roles/rollout/tasks/halt_guard.yml).

playbooks/runbooks/emergency_stop.yml writes its halt file into a directory that nginx includes; the
release's plan step looks into the same directory on every load balancer and refuses while a `*.conf`
file is there. The guard runs here with ansible-playbook against a temporary directory; the directory and
the file name are read from the runbooks' own variables, so the two sides cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .ansible_batch import Batch, run_batch
from .conftest import COLLECTION

TASKS = COLLECTION / "roles" / "rollout" / "tasks" / "halt_guard.yml"
RUNBOOK_VARS = yaml.safe_load((COLLECTION / "playbooks" / "runbooks" / "vars" / "runbooks.yml").read_text())
ROLLOUT_DEFAULTS = yaml.safe_load((COLLECTION / "roles" / "rollout" / "defaults" / "main.yml").read_text())

PLAY = """
- name: Run the release's halt guard
  hosts: all
  gather_facts: false
  tasks:
    - name: Guard
      ansible.builtin.include_tasks: {tasks}
"""

CASES = [
    (None, False),  # no directory at all: never halted on this load balancer (and no warning about it)
    ([], False),
    (["README.txt"], False),  # nginx includes only *.conf
    (["00-emergency-stop.conf"], True),
    (["10-by-hand.conf", "README.txt"], True),  # any halt file nginx would include
]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Batch]:
    """Every case in one ansible-playbook run: a host per case, each with its own halt directory."""
    work = tmp_path_factory.mktemp("halt")
    hosts = {}
    for index, (files, _refused) in enumerate(CASES):
        halt_dir = work / f"case{index}" / "halt.d"
        halt_dir.parent.mkdir()
        # The front door's folder holds other *.conf files (the upstream, the shadow mirror): never a halt.
        (halt_dir.parent / "upstream.conf").write_text("upstream x { server 127.0.0.1:1; }\n")
        (halt_dir.parent / "shadow.d").mkdir()
        (halt_dir.parent / "shadow.d" / "mirror.conf").write_text("mirror /x;\n")
        if files is not None:
            halt_dir.mkdir()
            for name in files:
                (halt_dir / name).write_text("return 503;\n")
        hosts[f"case{index}"] = {"rollout_halt_dir": str(halt_dir)}
    return work, run_batch(work, PLAY.format(tasks=TASKS), hosts)


def test_the_guard_looks_where_the_emergency_stop_writes() -> None:
    halt_dir = ROLLOUT_DEFAULTS["rollout_halt_dir"]
    assert RUNBOOK_VARS["__runbook_halt_dir"] == halt_dir
    halt_file = Path(RUNBOOK_VARS["__runbook_halt_file"])
    assert str(halt_file.parent) == halt_dir and halt_file.suffix == ".conf"


@pytest.mark.parametrize(("index", "files", "refused"), [(i, *case) for i, case in enumerate(CASES)])
def test_a_release_is_refused_exactly_while_a_halt_file_is_there(
        guarded: tuple[Path, Batch], index: int, files: list[str] | None, refused: bool) -> None:
    work, batch = guarded
    host = f"case{index}"
    halt_dir = work / host / "halt.d"
    outcome = batch[host]
    output = outcome.said
    if not refused:
        assert not outcome.failed, outcome
        assert "All assertions passed" in output, outcome  # the guard ran and let the release go
        assert "not a directory" not in batch.proc.stdout + batch.proc.stderr
        return
    assert files
    assert outcome.failed, outcome
    assert f"trading is halted on {host}" in output, outcome
    assert str(halt_dir / files[0]) in output and "Run playbooks/runbooks/resume.yml first" in output, outcome
