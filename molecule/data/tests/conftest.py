"""Fixtures of the data scenario's tests."""

from __future__ import annotations

import os

import pytest
import testinfra

# Hosts are reached as Ansible reaches them (SSH over the scenario's persistent connection): testinfra maps the
# inventory's `ssh` connection to its own SSH backend, about 0.05 s a command against 0.4 s for podman exec.


def inventory_host(name: str):
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"])


@pytest.fixture(scope="module")
def repo_host():
    """The pgBackRest repository host (group backup_repo); the tests' own `host` is the database host."""
    return inventory_host("gm-mol-data-client")
