"""Shadow comparison end to end: the loadbalancer role's real nginx.conf template and mirror file, a real nginx and
real model service processes on loopback ephemeral ports.

The front door mirrors live predict requests to an idle colour (`mirror`, the role's `shadow` entry point file);
both colours remember their answers to X-Request-ID requests (GET /admin/shadow) and shadow_compare joins them.
Proved here: the client only ever gets the live colour; the same model agrees (1.0) and passes; a model with other
weights is refused; a hung (SIGSTOPped) shadow colour costs the live path at most the mirror's timeout per request
and the comparison is inconclusive; the mirror location cannot be reached from outside; a client cannot choose
the request id. The live path's latency with the mirror on and off (same load, same repetitions) is printed.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pytest
import yaml

from tests.conftest import COLLECTION, REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ansible_collections.quantnova.grandmodel.plugins.module_utils.http_client import HttpClient
from ansible_collections.quantnova.grandmodel.plugins.module_utils.shadow_compare import Tolerances, run_comparison
from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic import render_upstream

ROLE = COLLECTION / "roles" / "loadbalancer"
TOKEN = "shadow-test-" + os.urandom(12).hex()
PREDICT = "/v1/models/strategic/predict"
TOLERANCES = Tolerances(agreement_min=0.99, probability_diff_max=0.05, latency_ratio_p50_max=3.0,
                        latency_ratio_p99_max=5.0, error_ratio_delta_max=0.0)
SHADOW_TIMEOUT_S = 0.3  # loadbalancer_shadow_timeout below
CONNECT_TIMEOUT_S = 0.1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def body(seed: int, samples: int = 1) -> bytes:
    inputs = np.random.default_rng(seed).uniform(-3, 3, (samples, 48, 13)).astype(np.float32)
    return json.dumps({"inputs": inputs.tolist()}).encode()


class Service:
    """One colour of the inference service as its own process."""

    def __init__(self, color: str, model_dir: Path, log: Path) -> None:
        self.color = color
        self.port = free_port()
        env = {**os.environ, "GRANDMODEL_MODEL_DIR": str(model_dir), "GRANDMODEL_PORT": str(self.port),
               "GRANDMODEL_HOST": "127.0.0.1", "GRANDMODEL_ENV": "staging", "GRANDMODEL_ADMIN_TOKEN": TOKEN,
               "GRANDMODEL_COLOR": color, "GRANDMODEL_WARMUP_ITERATIONS": "1", "GRANDMODEL_MC_PROCESS": "false"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "grandmodel_service.server"], env=env, stdout=out,
                                         stderr=out)
        self.log = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/ready")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.color} did not become ready:\n{self.log.read_text()[-3000:]}")

    def ring(self) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.request("GET", "/admin/shadow", headers={"Authorization": f"Bearer {TOKEN}"})
        reply = conn.getresponse()
        assert reply.status == 200
        result: dict[str, Any] = json.loads(reply.read())
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=30)


def render_role_template(prefix: Path, port: int, backends: dict[str, list[str]]) -> tuple[str, dict[str, Any]]:
    """nginx.conf from the role's own template with its own defaults and vars, host paths moved into `prefix`."""
    values: dict[str, Any] = {}
    for source in (ROLE / "defaults" / "main.yml", ROLE / "vars" / "main.yml"):
        values.update(yaml.safe_load(source.read_text()))
    values.update(
        ansible_managed="Ansible managed (test)", loadbalancer_http_port=port, loadbalancer_https_port=free_port(),
        loadbalancer_http_redirect=False, loadbalancer_server_name="localhost", loadbalancer_rate_limit="10000r/s",
        loadbalancer_rate_burst=10000, __loadbalancer_backends=backends,
        __loadbalancer_upstream_file=str(prefix / "upstream.conf"), __loadbalancer_dir=str(prefix),
        __loadbalancer_tls_dir=str(prefix / "tls"), __loadbalancer_shadow_dir=str(prefix / "shadow.d"),
        __loadbalancer_shadow_file=str(prefix / "shadow.d" / "mirror.conf"))
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["comment"] = lambda text: "# " + text
    text = env.from_string((ROLE / "templates" / "nginx.conf.j2").read_text()).render(values)
    for old, new in (("/run/nginx.pid", str(prefix / "nginx.pid")),
                     ("/var/log/nginx/", str(prefix) + "/"),
                     ("include /etc/nginx/modules-enabled/*.conf;", "")):
        assert old in text, old
        text = text.replace(old, new)
    return text, values


def mirror_file_content(values: dict[str, Any], color: str) -> str:
    """What the role's `shadow` entry point writes (its file task's content, rendered)."""
    tasks = yaml.safe_load((ROLE / "tasks" / "shadow.yml").read_text())
    module = "quantnova.grandmodel.managed_file"
    copy = next(task for task in tasks if module in task and "content" in task[module])[module]
    return jinja2.Template(copy["content"]).render(values, loadbalancer_shadow_color=color)


class FrontDoor:
    def __init__(self, binary: str, prefix: Path, services: dict[str, Service]) -> None:
        self.binary, self.prefix = binary, prefix
        self.port = free_port()
        (prefix / "tls").mkdir(parents=True)
        (prefix / "shadow.d").mkdir()
        (prefix / "halt.d").mkdir()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=t",
                        "-keyout", str(prefix / "tls" / "server.key"), "-out", str(prefix / "tls" / "server.crt")],
                       check=True, capture_output=True, timeout=60)
        backends = {color: [f"127.0.0.1:{svc.port}"] for color, svc in services.items()}
        text, self.values = render_role_template(prefix, self.port, backends)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(text)
        (prefix / "upstream.conf").write_text(render_upstream("grandmodel_backend", "blue", backends["blue"], 8))
        self.nginx("-t", "-q")
        self.nginx()

    def nginx(self, *args: str) -> None:
        proc = subprocess.run([self.binary, "-p", str(self.prefix), "-c", str(self.conf), *args], capture_output=True,
                              text=True, timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr

    def mirror(self, color: str | None) -> None:
        """The entry point's change: one file, nginx -t, graceful reload."""
        target = self.prefix / "shadow.d" / "mirror.conf"
        if color is None:
            target.unlink(missing_ok=True)
        else:
            tmp = target.with_suffix(".tmp")
            tmp.write_text(mirror_file_content(self.values, color))
            tmp.replace(target)
        self.nginx("-t", "-q")
        pid = int((self.prefix / "nginx.pid").read_text())
        old = set(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while set(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()) & old:
            if time.monotonic() > deadline:
                break  # old workers still finishing requests: new ones already serve
            time.sleep(0.02)
        time.sleep(0.1)

    def stop(self) -> None:
        pid_file = self.prefix / "nginx.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
            time.sleep(0.3)


Answer = tuple[int, float, dict[str, str], bytes]  # status, seconds, headers, body


class Client:
    """One keep-alive connection to the front door, as a trading client holds."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def predict(self, payload: bytes, headers: dict[str, str] | None = None) -> Answer:
        started = time.perf_counter()
        sent = {"Content-Type": "application/json", **(headers or {})}
        self.conn.request("POST", PREDICT, body=payload, headers=sent)
        reply = self.conn.getresponse()
        data = reply.read()
        return reply.status, time.perf_counter() - started, dict(reply.getheaders()), data

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FrontDoor, dict[str, Service]]]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    from grandmodel_service.export import export_model

    base = tmp_path_factory.mktemp("shadow")
    same, other = base / "models-same", base / "models-other"
    for name in ("strategic", "tactical"):
        export_model(name, same, version="1.0.0", seed=0)
        export_model(name, other, version="2.0.0", seed=7)  # other weights: a model that disagrees
    services = {"blue": Service("blue", same, base / "blue.log"), "green": Service("green", same, base / "green.log"),
                "red": Service("red", other, base / "red.log")}
    door: FrontDoor | None = None
    try:
        for service in services.values():
            service.wait_ready()
        door = FrontDoor(binary, base / "nginx", services)
        yield door, services
    finally:
        if door is not None:
            door.stop()
        for service in services.values():
            service.stop()


def compare(services: dict[str, Service], candidate: str, since: float, timeout: float = 5.0) -> dict[str, Any]:
    blue, cand = services["blue"], services[candidate]
    return run_comparison(HttpClient(timeout=timeout), TOKEN, {"color": "blue", "urls": [blue.url]},
                          {"color": candidate, "urls": [cand.url]}, TOLERANCES, min_joined=100, since=since,
                          model="strategic")


def drive(port: int, requests: int, clients: int = 2, seed: int = 0) -> list[tuple[int, float, str]]:
    """`clients` keep-alive connections sending `requests` predictions in all; (status, seconds, served by)."""
    results: list[tuple[int, float, str]] = []
    lock = threading.Lock()

    def one(number: int) -> None:
        client = Client(port)
        try:
            for index in range(requests // clients):
                status, seconds, headers, _ = client.predict(body(seed + number * 100_000 + index))
                with lock:
                    results.append((status, seconds, headers.get("X-Served-By", "")))
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


def quantiles(seconds: list[float]) -> tuple[float, float]:
    ordered = np.asarray(seconds) * 1000
    return float(np.percentile(ordered, 50)), float(np.percentile(ordered, 99))


def test_without_the_mirror_only_the_live_colour_answers_and_records(stack: Any) -> None:
    door, services = stack
    door.mirror(None)
    green_before = services["green"].ring()["recorded"]
    results = drive(door.port, 40)
    assert {status for status, _, _ in results} == {200}
    assert {served for _, _, served in results} == {f"127.0.0.1:{services['blue'].port}"}
    assert services["green"].ring()["recorded"] == green_before
    ids = [r["id"] for r in services["blue"].ring()["records"][-40:]]
    assert len(set(ids)) == 40 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)  # nginx's $request_id


def test_the_same_model_agrees_and_passes_while_clients_only_see_the_live_colour(stack: Any) -> None:
    door, services = stack
    since = time.time() - 0.001
    door.mirror("green")
    try:
        results = drive(door.port, 300)
    finally:
        door.mirror(None)
    assert len(results) == 300
    assert {status for status, _, _ in results} == {200}
    assert {served for _, _, served in results} == {f"127.0.0.1:{services['blue'].port}"}
    verdict = compare(services, "green", since)
    stats = verdict["statistics"]
    print("same model:", json.dumps({k: stats[k] for k in ("joined", "agreement", "probability_diff_max",
                                                         "latency_ratio_p50", "latency_ratio_p99")}))
    assert verdict["outcome"] == "successful", verdict["message"]
    assert stats["agreement"] == 1.0
    assert stats["probability_diff_max"] <= 1e-6
    assert stats["joined"] >= 295  # the mirror is best effort; on loopback every copy arrives
    assert stats["candidate_errors"] == 0


def test_a_model_with_other_weights_is_refused(stack: Any) -> None:
    door, services = stack
    since = time.time() - 0.001
    door.mirror("red")
    try:
        results = drive(door.port, 200)
    finally:
        door.mirror(None)
    assert {status for status, _, _ in results} == {200}
    assert {served for _, _, served in results} == {f"127.0.0.1:{services['blue'].port}"}  # red served no client
    verdict = compare(services, "red", since)
    stats = verdict["statistics"]
    print("other model:", json.dumps({k: stats[k] for k in ("joined", "agreement", "probability_diff_max")}))
    assert (verdict["outcome"], verdict["reason"]) == ("failed", "tolerance"), verdict["message"]
    assert "agreement_min" in verdict["failed_checks"]
    assert stats["joined"] >= 195
    assert stats["agreement"] < 0.99


def test_a_client_cannot_choose_the_request_id_nor_reach_the_mirror_location(stack: Any) -> None:
    door, services = stack
    door.mirror("green")
    try:
        client = Client(door.port)
        status, _, _, _ = client.predict(body(1), {"X-Request-ID": "chosen-by-client"})
        assert status == 200
        for path in ("/__grandmodel_shadow/green", "/__grandmodel_shadow/green" + PREDICT, "/__grandmodel_shadow/"):
            client.conn.request("POST", path, body=body(2), headers={"Content-Type": "application/json"})
            reply = client.conn.getresponse()
            reply.read()
            assert reply.status == 404, path
        client.close()
    finally:
        door.mirror(None)
    time.sleep(0.2)
    for color in ("blue", "green"):
        assert "chosen-by-client" not in {r["id"] for r in services[color].ring()["records"]}


def test_a_hung_shadow_colour_costs_the_live_path_at_most_the_mirror_timeout(stack: Any) -> None:
    door, services = stack
    green = services["green"]
    since = time.time()
    door.mirror("green")
    os.kill(green.proc.pid, signal.SIGSTOP)
    try:
        keep_alive = Client(door.port)
        answers = [keep_alive.predict(body(5000 + n)) for n in range(15)]
        keep_alive.close()
        fresh = []
        for n in range(10):
            client = Client(door.port)
            fresh.append(client.predict(body(6000 + n)))
            client.close()
        verdict = compare(services, "green", since, timeout=1.0)
    finally:
        os.kill(green.proc.pid, signal.SIGCONT)
        door.mirror(None)
    bound = SHADOW_TIMEOUT_S + CONNECT_TIMEOUT_S + 0.5  # the mirror's timeouts plus the live answer on a busy box
    slowest = max(seconds for _, seconds, _, _ in answers + fresh)
    print(f"hung shadow: keep-alive {[round(s * 1000) for _, s, _, _ in answers]} ms, "
          f"fresh {[round(s * 1000) for _, s, _, _ in fresh]} ms, bound {bound * 1000:.0f} ms")
    assert {status for status, _, _, _ in answers + fresh} == {200}
    assert {h.get("X-Served-By") for _, _, h, _ in answers + fresh} == {f"127.0.0.1:{services['blue'].port}"}
    assert slowest < bound, f"a live request took {slowest:.3f}s with the shadow hung (bound {bound}s)"
    assert (verdict["outcome"], verdict["reason"]) == ("inconclusive", "ring_unreachable"), verdict["message"]
    green.wait_ready()  # SIGCONT: it serves again


def test_live_path_latency_with_the_mirror_on_and_off(stack: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Same load (2 keep-alive clients, 300 requests), alternated 3 times off/on; median and p99 of each."""
    door, _services = stack
    runs: dict[str, list[float]] = {"off": [], "on": []}
    per_run: list[str] = []
    for repetition in range(3):
        for state in ("off", "on"):
            door.mirror("green" if state == "on" else None)
            results = drive(door.port, 300, seed=repetition * 1_000_000)
            assert {status for status, _, _ in results} == {200}
            seconds = [s for _, s, _ in results]
            runs[state] += seconds
            p50, p99 = quantiles(seconds)
            per_run.append(f"{state} #{repetition + 1}: p50 {p50:.2f} ms p99 {p99:.2f} ms")
    door.mirror(None)
    off50, off99 = quantiles(runs["off"])
    on50, on99 = quantiles(runs["on"])
    summary = {"off_ms": {"p50": round(off50, 3), "p99": round(off99, 3)},
               "on_ms": {"p50": round(on50, 3), "p99": round(on99, 3)},
               "ratio": {"p50": round(on50 / off50, 3), "p99": round(on99 / off99, 3)},
               "requests_per_state": len(runs["on"]), "runs": per_run, "cpus": os.cpu_count(),
               "load1": os.getloadavg()[0]}
    with capsys.disabled():
        print("\nmirror on/off:", json.dumps(summary))
    # Every mirrored request is computed twice on the same machine (2 cores here): the live path may slow by the
    # shared CPU, never by waiting for the shadow's answer. A loose bound catches a mirror that blocks the answer.
    assert on50 / off50 < 3.0
    assert statistics.median(runs["on"]) < 0.25
