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

import pytest

from .ansible_batch import Batch, run_batch
from .conftest import COLLECTION

GATED = "MainPID=4242\nInvocationID=6f1c0d2a9b7e4c1d8e3f5a6b7c8d9e0f\nActiveState=active"
TASKS = COLLECTION / "roles" / "rollout" / "tasks" / "identity.yml"

PLAY = """
- name: Compare the colour's process with the one its gate measured
  hosts: all
  gather_facts: false
  vars:
    __rollout_plan: {{to_color: green, from_color: blue}}
    grandmodel_model_unit: grandmodel-model  # role _common's default (the role reads it from there)
  environment:
    FAKE_SYSTEMCTL_NOW: "{{{{ fake_systemctl_now }}}}"  # what this case's systemd says now
  tasks:
    - name: Keep the identity the gate measured (a fact, as pre_gate.yml keeps it)
      ansible.builtin.set_fact:
        rollout_gated_identity: "{gated}"

    - name: Compare
      ansible.builtin.include_tasks: {tasks}
      vars:
        __rollout_identity_hosts: ["{{{{ inventory_hostname }}}}"]
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
HOSTS = {case: f"case{i}" for i, case in enumerate(CASES)}


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Batch:
    """Every case in one ansible-playbook run: a host per case, each with its own `systemctl show` answer."""
    work = tmp_path_factory.mktemp("identity")
    bindir = work / "bin"
    bindir.mkdir()
    fake = bindir / "systemctl"
    fake.write_text('#!/bin/sh\n[ "$1" = show ] || exit 3\ncat "$FAKE_SYSTEMCTL_NOW"\n')
    fake.chmod(0o755)
    hosts = {}
    for case, (now, _passes) in CASES.items():
        now_file = work / f"{HOSTS[case]}-now"
        now_file.write_text(now + "\n")
        hosts[HOSTS[case]] = {"fake_systemctl_now": str(now_file)}
    return run_batch(work, PLAY.format(gated=GATED.replace("\n", "\\n"), tasks=TASKS), hosts,
                     env={"PATH": f"{bindir}:{os.environ['PATH']}"})


@pytest.mark.parametrize("case", list(CASES))
def test_identity_check(checked: Batch, case: str) -> None:
    now, passes = CASES[case]
    host = HOSTS[case]
    outcome = checked[host]
    if passes:
        assert not outcome.failed, outcome
        assert "All assertions passed" in outcome.said, outcome  # the comparison ran and held
        return
    assert outcome.failed, outcome
    output = outcome.said
    assert "is no longer the process its pre-promotion gate" in output, outcome
    # The message names the host and both identities, so the operator sees what changed.
    assert f"{host} (gated: MainPID=4242" in output, outcome
    assert "now: " + now.replace("\n", " ") in output, outcome
