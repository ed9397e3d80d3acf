"""The release's process-identity check (roles/rollout/tasks/identity.yml) run by ansible-playbook.

A gate's evidence holds only for the process it measured. The release reads systemd's MainPID,
InvocationID and ActiveState of the new colour before the pre-promotion gate and compares them after
the gate, right before the switch and at the start of the post-promotion gate. The Molecule rollout
scenario kills and restarts a real colour at the gate's last moment; here every kind of change is put
at the comparison itself, deterministically: `systemctl` is a script on PATH that prints what the case
says systemd would print now (this machine has no systemd of its own).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import COLLECTION, REPO, VENV_BIN

GATED = "MainPID=4242\nInvocationID=6f1c0d2a9b7e4c1d8e3f5a6b7c8d9e0f\nActiveState=active"
TASKS = COLLECTION / "roles" / "rollout" / "tasks" / "identity.yml"

PLAY = """
- name: Compare the colour's process with the one its gate measured
  hosts: localhost
  gather_facts: false
  vars:
    __rollout_plan: {{to_color: green, from_color: blue}}
    grandmodel_model_unit: grandmodel-model  # role _common's default (the role reads it from there)
  tasks:
    - name: Keep the identity the gate measured (a fact, as pre_gate.yml keeps it)
      ansible.builtin.set_fact:
        rollout_gated_identity: "{gated}"

    - name: Compare
      ansible.builtin.include_tasks: {tasks}
      vars:
        __rollout_identity_hosts: [localhost]
"""

CASES = {
    "same process": (GATED, True),
    "restarted: new PID and invocation": (
        "MainPID=5151\nInvocationID=0a1b2c3d4e5f60718293a4b5c6d7e8f9\nActiveState=active", False),
    "killed, waiting for systemd's restart": (
        "MainPID=0\nInvocationID=6f1c0d2a9b7e4c1d8e3f5a6b7c8d9e0f\nActiveState=activating", False),
    "same PID, being stopped": (GATED.replace("ActiveState=active", "ActiveState=deactivating"), False),
    "unit gone": ("MainPID=0\nInvocationID=\nActiveState=inactive", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_identity_check(tmp_path: Path, case: str) -> None:
    now, passes = CASES[case]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (tmp_path / "now").write_text(now + "\n")
    fake = bindir / "systemctl"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = show ] || exit 3\ncat {tmp_path / 'now'}\n")
    fake.chmod(0o755)
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAY.format(gated=GATED.replace("\n", "\\n"), tasks=TASKS))
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                           "-e", f"ansible_python_interpreter={sys.executable}", str(playbook)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, ANSIBLE_NOCOLOR="1", PATH=f"{bindir}:{os.environ['PATH']}"))
    output = proc.stdout + proc.stderr
    if passes:
        assert proc.returncode == 0, output[-2000:]
        return
    assert proc.returncode != 0, output[-2000:]
    assert "is no longer the process its pre-promotion gate" in output, output[-2000:]
    # The message names the host and both identities, so the operator sees what changed.
    assert "localhost (gated: MainPID=4242" in output, output[-2000:]
    assert "now: " + now.replace("\n", " ") in output, output[-2000:]
