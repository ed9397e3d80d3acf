"""scripts/sandbox.py against real podman: clear refusals, stale hosts recreated, systemd up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

SANDBOX = str(REPO / "scripts" / "sandbox.py")
HOST = "gm-test-sandbox-lifecycle"


def sandbox(*args: str, env: dict[str, str] | None = None,
            prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), sys.executable, SANDBOX, *args], capture_output=True,
                          text=True, check=False, env=env, timeout=180)


def test_refuses_to_run_without_root() -> None:
    proc = sandbox("create", HOST, prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    assert proc.returncode == 1
    assert "need root" in proc.stderr


def test_names_the_missing_tool(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    env = {**os.environ, "PATH": str(bindir)}
    proc = sandbox("create", HOST, env=env)
    assert proc.returncode == 1
    assert "missing tool(s): podman" in proc.stderr
    assert "sandbox.py prepare" in proc.stderr


@pytest.fixture
def lifecycle_host():
    subprocess.run(["podman", "rm", "-f", HOST], capture_output=True, check=False)
    yield HOST
    subprocess.run(["podman", "rm", "-f", HOST], capture_output=True, check=False)


def state(name: str) -> str:
    proc = subprocess.run(["podman", "inspect", name, "--format", "{{.State.Status}}"],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "absent"


def test_create_recreates_a_stale_host_and_destroy_removes_it(lifecycle_host: str) -> None:
    first = sandbox("create", lifecycle_host)
    assert first.returncode == 0, first.stderr
    assert state(lifecycle_host) == "running"
    out = subprocess.run(["podman", "exec", lifecycle_host, "systemctl", "is-system-running"],
                         capture_output=True, text=True, check=False).stdout.strip()
    assert out in ("running", "degraded")

    again = sandbox("create", lifecycle_host)
    assert "already running" in again.stdout

    # A host left behind by an earlier session is dead but keeps its name: it is recreated, and the
    # facts Ansible cached for that name (the old address among them) are forgotten, only those.
    cache = REPO / ".ansible" / "facts"
    cache.mkdir(parents=True, exist_ok=True)
    mine = [cache / f"s1_{lifecycle_host}", cache / lifecycle_host]
    neighbour = cache / f"s1_{lifecycle_host}-other"
    try:
        for path in [*mine, neighbour]:
            path.write_text('{"ansible_default_ipv4": {"address": "10.89.0.250"}}')
        subprocess.run(["podman", "stop", "-t", "2", lifecycle_host], capture_output=True, check=True)
        assert state(lifecycle_host) == "exited"
        stale = sandbox("create", lifecycle_host)
        assert stale.returncode == 0, stale.stderr
        assert "it is stale (exited); recreating it" in stale.stdout
        assert state(lifecycle_host) == "running"
        assert [p.name for p in mine if p.exists()] == []
        assert neighbour.exists()

        mine[0].write_text("{}")
        gone = sandbox("destroy", lifecycle_host)
        assert gone.returncode == 0
        assert state(lifecycle_host) == "absent"
        assert not mine[0].exists()
    finally:
        for path in [*mine, neighbour]:
            path.unlink(missing_ok=True)


def test_base_image_is_not_rebuilt_when_current() -> None:
    proc = sandbox("image")
    assert proc.returncode == 0, proc.stderr
    assert "is current" in proc.stdout
