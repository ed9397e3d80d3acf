"""playbooks/rollout_k8s.yml (the release flow with rollout_backend kubernetes) run for real against an API on loopback.

No Kubernetes API server can run here; tests/k8s_fake_cluster.py stands in for it (discovery, get/list,
server-side apply with dry run and field managers, merge patch with resourceVersion, settled controllers,
EndpointSlices, and the service proxy). The colours' pods are played by a small HTTP service in this test that
answers /health, /ready, /version and /v1/models/<name>/predict as the inference service does, from the
Deployment the release applied (its colour and release labels), and can be made to answer badly.

Three clusters, one scenario each, one ansible-playbook run per case. A: check mode writes nothing; a release
whose idle colour answers wrong golden predictions is refused with the selector untouched and the colour scaled
to zero; a good release (to that same colour: the replica count is handed back) switches the selector and
records success. B: a release without manifests, and a release onto the live colour, are refused before any
write; a release that fails on live traffic is switched back and its colour scaled to zero. C: a switch that
refuses (too few ready pods) patches nothing and the colour is scaled to zero; the live release again changes
nothing. The records on the controller are read back each time.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, VENV_BIN
from .k8s_fake_cluster import FakeCluster

pytest.importorskip("kubernetes")

NS = "grandmodel"
COLOR = "grandmodel.quantnova.io/color"
RELEASE = "grandmodel.quantnova.io/release"
REFUSED = "grandmodel.quantnova.io/refused-release"
ROLE_MANAGER = "quantnova.grandmodel.k8s_workloads"
MODELS = ("strategic", "tactical")
RELEASES = ("2026.11.1", "2026.11.2", "2026.11.3", "2026.11.9")
REPOSITORY = "registry.desk.example/grandmodel-service"
SELECTOR = {"app.kubernetes.io/name": "grandmodel", "app.kubernetes.io/component": "inference"}
GOLDEN = {"probabilities": [0.2, 0.3, 0.5], "value": 0.1, "action": "long"}
# Short gates: the flow is what is tested here, the gate itself has its own tests.
GATES = {"rollout_k8s_pre_gate": {"count": 3, "interval": 0.1, "consecutive_error_limit": 0},
         "rollout_k8s_post_gate": {"count": 3, "interval": 0.1, "initial_delay": 0, "consecutive_error_limit": 0},
         "rollout_k8s_final_check_answers": 2, "rollout_k8s_switch_verify_timeout": 10}


def sha(model: str, release: str) -> str:
    return hashlib.sha256(f"{model}-{release}".encode()).hexdigest()


class Pods(ThreadingHTTPServer):
    """The colours' containers: /<deployment>/<route>, answering from that Deployment's labels."""

    daemon_threads = True

    def __init__(self, cluster: FakeCluster) -> None:
        super().__init__(("127.0.0.1", 0), _PodHandler)
        self.cluster = cluster
        # release -> "golden" (wrong predictions) or "dies_live" (unhealthy once the live Service selects it)
        self.faults: dict[str, str] = {}
        self.hits: list[str] = []

    def url(self, deployment: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{deployment}"


class _PodHandler(BaseHTTPRequestHandler):
    server: Pods

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, code: int, body: Any) -> None:
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _route(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        deployment, _, route = self.path.lstrip("/").partition("/")
        cluster = self.server.cluster
        with cluster.lock:
            obj = cluster.get("apps/v1", "deployments", NS, deployment) or {}
            live = (cluster.get("v1", "services", NS, "grandmodel") or {}).get("spec", {}).get("selector", {})
        labels = obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
        color, release = labels.get(COLOR), labels.get(RELEASE, "")
        fault = self.server.faults.get(release)
        self.server.hits.append(f"{deployment}/{route}")
        if fault == "dies_live" and live.get(COLOR) == color and route in ("health", "ready"):
            return self._answer(500 if route == "health" else 503, {"status": "worker crashed"})
        if route in ("health", "ready"):
            return self._answer(200, {"status": "ok"})
        if route == "version":
            return self._answer(200, {"service_version": "1.0.0", "color": color, "models": {
                m: {"version": release, "sha256": sha(m, release), "ready": True} for m in MODELS}})
        if route.startswith("v1/models/") and route.endswith("/predict"):
            answer = dict(GOLDEN, action="short") if fault == "golden" else GOLDEN
            return self._answer(200, {"predictions": [answer]})
        return self._answer(404, {"detail": route})

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()


def seed(cluster: FakeCluster) -> None:
    """What playbooks/k8s.yml leaves: blue live with release 2026.11.1, its own Service; green never deployed."""
    blue = {**SELECTOR, COLOR: "blue"}
    labels = {**blue, RELEASE: "2026.11.1"}
    cluster.seed({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "grandmodel", "namespace": NS},
                  "spec": {"type": "ClusterIP", "selector": blue,
                           "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}, ROLE_MANAGER)
    cluster.seed({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "grandmodel-blue", "namespace": NS},
                  "spec": {"type": "ClusterIP", "selector": blue,
                           "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}, ROLE_MANAGER)
    cluster.seed({"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": "grandmodel-blue", "namespace": NS, "labels": labels},
                  "spec": {"replicas": 2, "selector": {"matchLabels": blue},
                           "template": {"metadata": {"labels": labels},
                                        "spec": {"containers": [{"name": "service",
                                                                 "image": f"{REPOSITORY}:2026.11.1"}]}}}},
                  ROLE_MANAGER)


def world(root: Path) -> dict[str, Any]:
    """A cluster (blue live), the pods standing in for its colours, the releases' manifests, a kubeconfig."""
    cluster = FakeCluster().start()
    token = secrets.token_urlsafe(24)  # the release account's token, generated per run
    cluster.proxy_token = token
    pods = Pods(cluster)
    threading.Thread(target=pods.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    cluster.upstreams.update({f"grandmodel-{c}": pods.url(f"grandmodel-{c}") for c in ("blue", "green")})
    seed(cluster)
    for release in RELEASES:
        (root / "releases" / release).mkdir(parents=True)
        for model in MODELS:
            manifest = {"name": model, "version": release, "sha256": sha(model, release),
                        "golden": {"atol": 1e-5, "samples": [{"input": [[0.5, -0.5]], **GOLDEN}]}}
            (root / "releases" / release / f"{model}.manifest.json").write_text(json.dumps(manifest))
    kubeconfig = root / "kubeconfig"
    kubeconfig.write_text(json.dumps(cluster.kubeconfig(token)))
    (root / "gates.json").write_text(json.dumps(GATES))
    return {"cluster": cluster, "pods": pods, "root": root, "kubeconfig": kubeconfig, "token": token,
            "records": root / "state" / "k8s-deployments.jsonl"}


@pytest.fixture
def worlds(tmp_path: Path) -> Iterator[tuple[dict[str, Any], ...]]:
    made = [world(tmp_path / name) for name in ("a", "b", "c")]
    yield tuple(made)
    for env in made:
        env["pods"].shutdown()
        env["pods"].server_close()
        env["cluster"].stop()


def release(env: dict[str, Any], version: str, *extra: str, check: bool = False,
            playbook: str = "playbooks/rollout_k8s.yml") -> tuple[int, str]:
    root = env["root"]
    args = [str(VENV_BIN / "ansible-playbook"), playbook, "-e", f"release_version={version}",
            "-e", f"rollout_k8s_kubeconfig={env['kubeconfig']}", "-e", f"rollout_k8s_image_repository={REPOSITORY}",
            "-e", f"rollout_k8s_artifacts_root={root / 'releases'}", "-e", f"rollout_k8s_record_file={env['records']}",
            "-e", f"@{root / 'gates.json'}", *extra]
    if check:
        args += ["--check", "--diff"]
    started = time.monotonic()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                          env=dict(os.environ, ANSIBLE_NOCOLOR="1"))
    print(f"{playbook} {version} {' '.join(extra)}{' --check' if check else ''}: rc {proc.returncode}, "
          f"{time.monotonic() - started:.1f}s")
    return proc.returncode, proc.stdout + proc.stderr


def stored(cluster: FakeCluster, since: int) -> list[str]:
    return [r["path"].split("?")[0] for r in cluster.requests[since:] if r.get("stored")]


def records(env: dict[str, Any]) -> list[dict[str, Any]]:
    path: Path = env["records"]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def live_color(cluster: FakeCluster) -> str:
    return cluster.get("v1", "services", NS, "grandmodel")["spec"]["selector"][COLOR]


def deployment(cluster: FakeCluster, color: str) -> dict[str, Any]:
    return cluster.get("apps/v1", "deployments", NS, f"grandmodel-{color}")


def check_refuse_and_release(env: dict[str, Any]) -> None:
    """Cluster A: check mode, a release refused by its gate, then a good release to that same colour."""
    cluster: FakeCluster = env["cluster"]
    pods: Pods = env["pods"]
    token: str = env["token"]

    # 1. Check mode, through the operators' entry point playbooks/rollout.yml with rollout_backend=kubernetes
    #    (its nginx plays skip): it plans blue -> green, the API server only dry-runs, nothing is stored, no
    #    record written.
    since = len(cluster.requests)
    rc, out = release(env, "2026.11.2", "-e", "rollout_backend=kubernetes", check=True,
                      playbook="playbooks/rollout.yml")
    assert rc == 0, out[-4000:]
    assert "Plan the release from the live Service" in out
    assert "release 2026.11.2: blue (2026.11.1) -> green (not deployed)" in out
    writes = [r for r in cluster.requests[since:] if r["method"] in ("PATCH", "POST", "PUT", "DELETE")]
    assert writes and all(r.get("dry_run") == "All" for r in writes), writes
    assert stored(cluster, since) == [] and deployment(cluster, "green") is None
    assert live_color(cluster) == "blue" and not env["records"].exists()
    assert token not in out

    # 2. The idle colour answers wrong golden predictions: refused by the pre-promotion gate, selector untouched,
    #    green scaled to zero by the rollout's field manager, the outcome recorded with the gate's evidence.
    pods.faults["2026.11.9"] = "golden"
    since = len(cluster.requests)
    rc, out = release(env, "2026.11.9")
    assert rc != 0 and "was refused by the pre-promotion gate on green" in out, out[-4000:]
    assert "stays on blue (2026.11.1); green: scaled to 0 replicas" in out
    assert live_color(cluster) == "blue"
    green = deployment(cluster, "green")
    assert green["spec"]["replicas"] == 0 and green["metadata"]["annotations"][REFUSED] == "2026.11.9"
    assert green["spec"]["template"]["spec"]["containers"][0]["image"] == f"{REPOSITORY}:2026.11.9"
    assert not [p for p in stored(cluster, since) if p.endswith("/services/grandmodel")]
    proxied = [r for r in cluster.requests[since:] if r.get("proxy")]
    assert proxied and all("/services/grandmodel-green:http/proxy/" in r["path"] for r in proxied)
    assert {r["authorization"] for r in proxied} == {f"Bearer {token}"}
    (record,) = records(env)
    assert record["outcome"] == "aborted_pre_promotion" and record["to_version"] == "2026.11.9"
    assert "golden check" in record["evidence"]["pre_promotion"]
    assert record["evidence"]["scale_down"] == "scaled to 0 replicas"
    assert deployment(cluster, "blue")["spec"]["replicas"] == 2

    # 3. A good release to that same colour: the replica count is handed back (no apply conflict), the gate
    #    passes, the selector goes to green, the live Service answers green, success is recorded.
    since = len(cluster.requests)
    rc, out = release(env, "2026.11.2")
    assert rc == 0, out[-4000:]
    assert live_color(cluster) == "green"
    green = deployment(cluster, "green")
    assert green["spec"]["replicas"] == 2 and REFUSED not in green["metadata"].get("annotations", {})
    assert green["spec"]["template"]["spec"]["containers"][0]["image"] == f"{REPOSITORY}:2026.11.2"
    live = cluster.get("v1", "services", NS, "grandmodel")["metadata"]["annotations"]
    assert live["grandmodel.quantnova.io/previous-color"] == "blue"
    assert "grandmodel.quantnova.io/switch-in-flight" not in live
    assert any("/services/grandmodel:http/proxy/version" in r["path"] for r in cluster.requests[since:])
    assert deployment(cluster, "blue")["spec"]["replicas"] == 2  # the old colour stays warm
    success = records(env)[-1]
    assert success["outcome"] == "success" and (success["from_color"], success["to_color"]) == ("blue", "green")
    assert success["from_version"] == "2026.11.1" and success["evidence"]["pre_promotion"]["verdict"] == "passed"
    assert [r["outcome"] for r in records(env)] == ["aborted_pre_promotion", "success"]
    assert token not in out and token not in env["records"].read_text()


def refuse_live_and_roll_back(env: dict[str, Any]) -> None:
    """Cluster B: releases onto the live colour refused, then a release that dies on live traffic."""
    cluster: FakeCluster = env["cluster"]
    pods: Pods = env["pods"]

    # 4. Bad input is refused before anything is read or written: a release whose manifests were never built;
    #    a release onto the live colour is refused before any write, dry run or probe.
    rc, out = release(env, "2026.12.0")
    assert rc != 0 and "missing on the controller" in out and "2026.12.0/strategic.manifest.json" in out
    rc, out = release(env, "2026.11.2", "-e", "rollout_k8s_to_color=blue")
    assert rc != 0 and "refusing release 2026.11.2: the live Service grandmodel/grandmodel selects blue" in out
    assert [r for r in cluster.requests if r["method"] not in ("GET", "SEED")] == []
    assert not env["records"].exists()

    # 5. A release that passes its gate but dies on live traffic: switched back to blue, green scaled to zero.
    pods.faults["2026.11.3"] = "dies_live"
    rc, out = release(env, "2026.11.3")
    assert rc != 0 and "failed the post-promotion gate on green" in out, out[-4000:]
    assert "was switched back to blue (2026.11.1)" in out
    patches = [r["path"] for r in cluster.requests if r["method"] == "PATCH" and "/services/grandmodel?" in r["path"]]
    # The switch and the switch back (each a guarded patch, then its in-flight marker cleared), nothing else.
    assert len(patches) == 4 and all("fieldManager=quantnova.grandmodel.traffic_switch" in p for p in patches)
    assert live_color(cluster) == "blue"
    assert deployment(cluster, "green")["spec"]["replicas"] == 0
    assert deployment(cluster, "blue")["spec"]["replicas"] == 2
    (back,) = records(env)
    assert back["outcome"] == "rolled_back_post_promotion" and back["to_color"] == "green"
    assert back["evidence"]["switch"] and back["evidence"]["switch_back"]
    assert "health" in back["evidence"]["post_promotion"] or "ready" in back["evidence"]["post_promotion"]


def switch_refused(env: dict[str, Any]) -> None:
    """Cluster C: the switch itself refuses (too few ready pods of the new colour): nothing patched, scaled down."""
    cluster: FakeCluster = env["cluster"]

    # 6. The switch refuses before patching: the live Service is never touched, green is scaled to zero.
    rc, out = release(env, "2026.11.2", "-e", "rollout_k8s_min_ready=3")
    assert rc != 0 and "stopped at the switch to green" in out, out[-4000:]
    assert "stays on blue (2026.11.1); green: scaled to 0 replicas" in out
    assert not [r for r in cluster.requests if r["method"] == "PATCH" and "/services/grandmodel?" in r["path"]]
    assert live_color(cluster) == "blue" and deployment(cluster, "green")["spec"]["replicas"] == 0
    (record,) = records(env)
    assert record["outcome"] == "aborted_switch" and "3 needed" in record["evidence"]["switch"]
    assert record["evidence"]["pre_promotion"]["verdict"] == "passed"

    # 7. The live release again: nothing to do, nothing written, no record (a second run changes nothing).
    since = len(cluster.requests)
    rc, out = release(env, "2026.11.1")
    assert rc == 0 and "release 2026.11.1 is already live on blue: nothing to do" in out, out[-4000:]
    assert [r for r in cluster.requests[since:] if r["method"] != "GET"] == [] and len(records(env)) == 1


def test_the_kubernetes_release_flow(worlds: tuple[dict[str, Any], ...]) -> None:
    """The three clusters at once (each scenario is sequential): the runs mostly wait on ansible-playbook."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(check_refuse_and_release, worlds[0]), pool.submit(refuse_live_and_roll_back, worlds[1]),
                   pool.submit(switch_refused, worlds[2])]
        for future in futures:
            future.result()
