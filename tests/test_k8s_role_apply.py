"""playbooks/k8s.yml run for real (kubernetes.core.k8s, k8s_info, the kubernetes client) against an API on loopback.

No Kubernetes API server can run here; tests/k8s_fake_cluster.py stands in for the parts the role uses
(discovery, get/list, server-side apply with dry-run and field managers). One cluster, one scenario,
five ansible-playbook runs and the traffic switch's kubernetes backend on the same objects: check mode
writes nothing, a first apply creates every object, the backend refuses a colour without pods, a
release refuses the live colour, a release to the idle colour touches only that colour's objects, the
backend switches to it, and a re-run keeps the switched colour and changes nothing at all.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import COLLECTION, REPO, VENV_BIN
from .k8s_fake_cluster import FakeCluster

pytest.importorskip("kubernetes")
sys.path.insert(0, str(REPO))

TOKEN = "unit-test-admin-token-7f3k2"
IMAGE = "registry.desk.example/grandmodel-service:2026.11.1"
NS = "grandmodel"
COLOR = "grandmodel.quantnova.io/color"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeCluster, Path]]:
    server = FakeCluster().start()
    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    kubeconfig.write_text(json.dumps(server.kubeconfig("cluster-admin-token")))
    yield server, kubeconfig
    server.stop()


def play(kubeconfig: Path, *extra: str, check: bool = False) -> tuple[int, str, float]:
    args = [str(VENV_BIN / "ansible-playbook"), "playbooks/k8s.yml", "-e", f"k8s_workloads_kubeconfig={kubeconfig}",
            "-e", f"k8s_workloads_image={IMAGE}", "-e", "k8s_workloads_release=2026.11.1",
            "-e", f"k8s_workloads_admin_token={TOKEN}", *extra]
    if check:
        args += ["--check", "--diff"]
    started = time.monotonic()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
                          env=dict(os.environ, ANSIBLE_NOCOLOR="1"))
    took = time.monotonic() - started
    print(f"ansible-playbook {' '.join(extra) or 'bootstrap'}{' --check' if check else ''}: {took:.1f}s")
    return proc.returncode, proc.stdout + proc.stderr, took


def recap_changed(output: str) -> int:
    match = re.search(r"localhost\s+: ok=\d+\s+changed=(\d+)", output)
    assert match, output[-2000:]
    return int(match.group(1))


def stored_writes(server: FakeCluster, since: int) -> list[str]:
    return [r["path"].split("?")[0] for r in server.requests[since:] if r.get("stored")]


def test_the_role_applies_switch_safely_and_idempotently(cluster: tuple[FakeCluster, Path]) -> None:
    server, kubeconfig = cluster

    # 1. Check mode: the server is asked for dry runs only; nothing is stored; the token is never shown.
    rc, out, _ = play(kubeconfig, check=True)
    assert rc == 0, out[-3000:]
    assert server.objects == {}
    writes = server.writes()
    assert writes and all(w["dry_run"] == "All" for w in writes)
    assert TOKEN not in out

    # 2. First apply: every object, server-side applied by the role's field manager, the namespace first.
    since = len(server.requests)
    rc, out, _ = play(kubeconfig)
    assert rc == 0, out[-3000:]
    assert TOKEN not in out
    paths = stored_writes(server, since)
    assert paths[0] == f"/api/v1/namespaces/{NS}" and len(paths) == 15
    assert all("fieldManager=quantnova.grandmodel.k8s_workloads" in r["path"]
               for r in server.requests[since:] if r["method"] == "PATCH")
    assert server.get("v1", "secrets", NS, "grandmodel-admin")["stringData"] == {"admin-token": TOKEN}
    live = server.get("v1", "services", NS, "grandmodel")
    assert live["spec"]["selector"]["grandmodel.quantnova.io/color"] == "blue"
    assert server.get("apps/v1", "deployments", NS, "grandmodel-green") is None

    # 3. The traffic switch's backend, on the objects the role created: green has no pods yet, so it refuses.
    from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic import (
        TrafficSwitchError,
        switch_traffic,
    )
    from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic_k8s import (
        KubernetesApi,
        KubernetesBackend,
        build_api_client,
    )

    def backend() -> KubernetesBackend:
        client, _source = build_api_client(kubeconfig=str(kubeconfig))
        return KubernetesBackend(KubernetesApi(client, request_timeout=5), NS, "grandmodel", min_ready=2,
                                 verify_timeout=10, verify_interval=0.05)

    with pytest.raises(TrafficSwitchError, match=r"0 of the 0 pods selected by \S+ are ready.*no pod of that colour"):
        switch_traffic(backend(), "green")

    # 4. A release onto the live colour is refused before anything is written.
    since = len(server.requests)
    rc, out, _ = play(kubeconfig, "-e", "k8s_workloads_deploy_color=blue")
    assert rc != 0 and "blue is the live colour" in out
    assert stored_writes(server, since) == []

    # 5. A release to the idle colour writes only that colour's objects; the live Service is not touched.
    since = len(server.requests)
    rc, out, _ = play(kubeconfig, "-e", "k8s_workloads_deploy_color=green", "-e", "k8s_workloads_release=2026.11.2",
                      "-e", "k8s_workloads_image=registry.desk.example/grandmodel-service:2026.11.2")
    assert rc == 0, out[-3000:]
    assert sorted(stored_writes(server, since)) == [
        f"/api/v1/namespaces/{NS}/services/grandmodel-green",
        f"/apis/apps/v1/namespaces/{NS}/deployments/grandmodel-green",
        f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/grandmodel-green"]
    green = server.get("apps/v1", "deployments", NS, "grandmodel-green")
    assert green["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":2026.11.2")
    assert server.get("v1", "services", NS, "grandmodel")["spec"]["selector"][COLOR] == "blue"

    # 6. The switch to green: ready pods behind grandmodel-green, one guarded patch, endpoints cut over.
    result = switch_traffic(backend(), "green")
    assert result["verified"] is True and result["verification"]["answers"][-1]["answer"] == "green: 2 ready"
    assert server.get("v1", "services", NS, "grandmodel")["spec"]["selector"][COLOR] == "green"

    # 7. A full re-run keeps the colour the switch set and changes nothing at all (idempotent, no conflict).
    since = len(server.requests)
    rc, out, _ = play(kubeconfig, "-e", "k8s_workloads_release=2026.11.2",
                      "-e", "k8s_workloads_image=registry.desk.example/grandmodel-service:2026.11.2")
    assert rc == 0, out[-3000:]
    assert "live colour green" in out and "deploying no colour" in out
    assert stored_writes(server, since) == [] and recap_changed(out) == 0
    blue = server.get("apps/v1", "deployments", NS, "grandmodel-blue")
    assert blue["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE  # the warm colour was left alone
    assert (COLLECTION / "roles" / "k8s_workloads").is_dir()
