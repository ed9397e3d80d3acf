"""Fixtures of the data scenario's tests."""

from __future__ import annotations

import pytest
import testinfra


@pytest.fixture(scope="module")
def repo_host():
    """The pgBackRest repository host (group backup_repo); the tests' own `host` is the database host."""
    return testinfra.get_host("podman://gm-mol-data-client")
