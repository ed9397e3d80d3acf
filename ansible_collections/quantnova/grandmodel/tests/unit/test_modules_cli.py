"""End to end: both modules load and run as real modules through `ansible localhost -m quantnova.grandmodel.*`.

They run with the repository's ansible.cfg (collections_path holds the repository root) and with the
system Python 3 as the target interpreter, which proves the modules need nothing beyond the stdlib.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, LoopbackServer, NginxUnderTest

ANSIBLE = REPO / ".venv" / "bin" / "ansible"
TARGET_PYTHON = shutil.which("python3", path="/usr/bin") or sys.executable

pytestmark = pytest.mark.skipif(not ANSIBLE.exists(), reason="the project virtualenv .venv has no ansible")


def ansible_module(module: str, args: dict[str, Any], *extra: str) -> tuple[int, dict[str, Any]]:
    callback = "ansible.posix.json"
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
               ANSIBLE_STDOUT_CALLBACK=callback, ANSIBLE_CALLBACKS_ENABLED=callback, NO_COLOR="1")
    proc = subprocess.run(
        [str(ANSIBLE), "localhost", "-i", "localhost,", "-c", "local", "-m", f"quantnova.grandmodel.{module}",
         "-a", json.dumps(args), "-e", f"ansible_python_interpreter={TARGET_PYTHON}", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    try:
        output = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"ansible printed no JSON (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = output["plays"][0]["tasks"][0]["hosts"]["localhost"]
    return proc.returncode, result


def test_health_gate_runs_as_a_module(loopback_server: LoopbackServer) -> None:
    loopback_server.routes[("GET", "/health")] = lambda _h, _b: (200, {"status": "alive"})
    loopback_server.routes[("GET", "/ready")] = lambda _h, _b: (503, {"status": "not_ready", "reasons": ["warming"]})
    rc, result = ansible_module("health_gate", {"url": loopback_server.url, "count": 3, "interval": 0.05})
    assert rc != 0
    assert result["failed"] is True
    assert result["msg"].startswith("health gate failed: ready check: GET /ready answered 503")
    assert result["passed"] is False
    loopback_server.routes[("GET", "/ready")] = lambda _h, _b: (200, {"status": "ready"})
    rc, result = ansible_module("health_gate", {"url": loopback_server.url, "count": 2, "interval": 0.05},
                                "--check")
    assert rc == 0, result
    assert (result["passed"], result["changed"], result["summary"]["successful"]) == (True, False, 2)


def test_traffic_switch_runs_as_a_module(nginx: NginxUnderTest, tmp_path: Path) -> None:
    args = dict(color="green", upstream_file=str(nginx.upstream_file), backends=nginx.backends(),
                nginx_binary=nginx.binary, nginx_config=str(nginx.conf), nginx_prefix=str(nginx.prefix),
                verify_url=nginx.url, verify_timeout=5)
    rc, result = ansible_module("traffic_switch", args, "--check", "--diff")
    assert rc == 0, result
    assert result["changed"] is True and nginx.serving() == "blue"
    rc, result = ansible_module("traffic_switch", args)
    assert rc == 0, result
    assert (result["changed"], result["verified"], result["active_color"]) == (True, True, "green")
    assert nginx.serving() == "green"
    rc, result = ansible_module("traffic_switch", dict(state="query", upstream_file=str(nginx.upstream_file)))
    assert (rc, result["active_color"], result["previous_color"]) == (0, "green", "blue")
