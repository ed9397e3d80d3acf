"""The service image from the role's Containerfile, run the way the rendered Deployment runs it.

podman stands in for the kubelet: the container gets the Deployment's user and group, a read-only root
file system, no capabilities, no new privileges, a tmpfs /tmp, its memory and CPU limits and its env
(the admin token as the Secret would give it). It must become ready on the readiness probe's path, answer
the liveness path, serve the release's golden answers, have the preStop command, and stop cleanly on
SIGTERM within the grace period. `make test` runs it as its own step (scripts/k8s_image_check.py builds the
image and the release first); pytest-repo leaves it out. By hand:

    podman build -f ansible_collections/quantnova/grandmodel/roles/k8s_workloads/files/Containerfile \
      --build-arg BASE=localhost/grandmodel-debian12:latest --build-arg RELEASE=2026.11.1 \
      -t localhost/grandmodel-service:2026.11.1 build/
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO, VENV_BIN

RELEASE = "2026.11.1"
IMAGE = f"localhost/grandmodel-service:{RELEASE}"
NAME = "gm-k8s-image-check"


def image_present() -> bool:
    if not shutil.which("podman"):
        return False
    return subprocess.run(["podman", "image", "exists", IMAGE], capture_output=True, check=False).returncode == 0


MISSING = f"{IMAGE} or build/releases/{RELEASE} is missing (scripts/k8s_image_check.py builds both)"
READY = image_present() and (REPO / "build" / "releases" / RELEASE).is_dir()
if not READY and os.environ.get("GM_REQUIRE_K8S_IMAGE") == "1":  # the make test step: never pass by skipping
    raise RuntimeError(MISSING)
pytestmark = pytest.mark.skipif(not READY, reason=MISSING)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> tuple[int | None, Any]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (OSError, ValueError) as exc:
        return None, str(exc)


@pytest.fixture
def deployment(tmp_path: Path) -> dict[str, Any]:
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "playbooks/k8s.yml", "-e", "k8s_workloads_apply=false",
                           "-e", f"k8s_workloads_render_dir={tmp_path}", "-e", f"k8s_workloads_image={IMAGE}",
                           "-e", f"k8s_workloads_release={RELEASE}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    docs = [d for d in yaml.safe_load_all((tmp_path / "manifests.yaml").read_text()) if d]
    (found,) = [d for d in docs if d["kind"] == "Deployment"]
    return found


def test_the_image_runs_as_the_deployment_says(deployment: dict[str, Any]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    env["GRANDMODEL_ADMIN_TOKEN"] = "image-test-admin-token-9q8w7e"
    user = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    port = free_port()
    subprocess.run(["podman", "rm", "-f", NAME], capture_output=True, check=False)  # a stale one from a dead run
    args = ["podman", "run", "-d", "--name", NAME, "--read-only", f"--user={user}", "--cap-drop=ALL",
            "--security-opt=no-new-privileges", "--tmpfs", "/tmp:size=64m",
            f"--memory={container['resources']['limits']['memory'].replace('Gi', 'g')}",
            f"--cpus={container['resources']['limits']['cpu']}", "-p", f"127.0.0.1:{port}:{env['GRANDMODEL_PORT']}"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    subprocess.run([*args, container["image"]], check=True, capture_output=True, timeout=120)
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        status: int | None = None
        body: Any = None
        while time.monotonic() - started < 180:  # the startup probe allows 2 s x 90
            status, body = get(base + container["readinessProbe"]["httpGet"]["path"])
            if status == 200:
                break
            time.sleep(1)
        print(f"ready after {time.monotonic() - started:.1f}s")
        assert status == 200, body
        assert get(base + container["livenessProbe"]["httpGet"]["path"])[0] == 200
        status, version = get(base + "/version")
        assert version["color"] == env["GRANDMODEL_COLOR"] and version["service_version"] == RELEASE
        manifest = json.loads((REPO / "build" / "releases" / RELEASE / "strategic.manifest.json").read_text())
        request = urllib.request.Request(
            base + "/v1/models/strategic/predict", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"inputs": [s["input"] for s in manifest["golden"]["samples"]]}).encode())
        with urllib.request.urlopen(request, timeout=10) as response:
            predictions = json.loads(response.read())["predictions"]
        for got, want in zip(predictions, manifest["golden"]["samples"], strict=True):
            assert got["action"] == want["action"]
            assert max(abs(a - b) for a, b in zip(got["probabilities"], want["probabilities"], strict=True)) <= \
                manifest["golden"]["atol"]
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert subprocess.run(["podman", "exec", NAME, pre_stop[0], "0"], capture_output=True,
                              check=False).returncode == 0
        grace = pod["terminationGracePeriodSeconds"]
        stopping = time.monotonic()
        subprocess.run(["podman", "stop", "-t", str(grace), NAME], capture_output=True, check=True, timeout=grace + 30)
        assert time.monotonic() - stopping < grace
        exit_code = subprocess.run(["podman", "inspect", NAME, "--format", "{{.State.ExitCode}}"],
                                   capture_output=True, text=True, check=True).stdout.strip()
        assert exit_code == "0"
    finally:
        subprocess.run(["podman", "rm", "-f", NAME], capture_output=True, check=False)
