"""Shared fixtures for the repository-level tests."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COLLECTION = REPO / "ansible_collections" / "quantnova" / "grandmodel"
VENV_BIN = REPO / ".venv" / "bin"
INVENTORIES = ("sandbox", "development", "staging", "production")
GROUPS = {"db", "cache", "timeseries", "monitoring", "app", "lb", "k8s_control_plane", "k8s_workers"}


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
