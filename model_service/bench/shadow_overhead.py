"""``python model_service/bench/shadow_overhead.py``: what the shadow ring costs the predict path.

One real service process (uvicorn, the production code path) and one keep-alive client sending
single-sample strategic predictions one at a time (closed loop). Rounds alternate requests
without ``X-Request-ID`` (nothing recorded: the path before the ring existed, plus one header
comparison) and with a fresh nginx-like id per request (one ring append: the front door sends
the id on every request); the same bodies in the same order. Prints each round, then the median
and p99 of each kind over all rounds and their ratio, and the in-process cost of one append
measured alone. Benchmark tooling: not part of the service's wheel.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import build_request, free_port  # noqa: E402

from grandmodel_service.export import export_model  # noqa: E402
from grandmodel_service.shadow import ShadowRing  # noqa: E402

PATH = "/v1/models/strategic/predict"


def read_response(sock: socket.socket, buffer: bytearray) -> int:
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end]).lower()
            at = head.find(b"content-length:")
            stop = head.find(b"\r\n", at)
            length = int(head[at + 15 : stop if stop > 0 else None])
            total = end + 4 + length
            if len(buffer) >= total:
                status = int(buffer[9:12])
                del buffer[:total]
                return status
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buffer += chunk


def run_round(port: int, bodies: list[bytes], with_id: bool) -> list[float]:
    latencies: list[float] = []
    buffer = bytearray()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for body in bodies:
            headers = {"content-type": "application/json"}
            if with_id:
                headers["x-request-id"] = secrets.token_hex(16)
            request = build_request("POST", PATH, body, headers)
            started = time.perf_counter()
            sock.sendall(request)
            status = read_response(sock, buffer)
            latencies.append(time.perf_counter() - started)
            assert status == 200, status
    return latencies


def quantiles(values: list[float]) -> dict[str, float]:
    ms = np.asarray(values) * 1000
    return {q: round(float(np.percentile(ms, int(q[1:]))), 4) for q in ("p50", "p99")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each kind, alternating")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export_model("strategic", Path(tmp), version="1.0.0")
        export_model("tactical", Path(tmp), version="1.0.0")
        port = free_port()
        env = {
            **os.environ,
            "GRANDMODEL_MODEL_DIR": tmp,
            "GRANDMODEL_PORT": str(port),
            "GRANDMODEL_HOST": "127.0.0.1",
            "GRANDMODEL_WARMUP_ITERATIONS": "1",
            "GRANDMODEL_MC_PROCESS": "false",
            "GRANDMODEL_CPU_AFFINITY": "0",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "grandmodel_service.server"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            os.sched_setaffinity(0, {1} if (os.cpu_count() or 1) > 1 else {0})
            deadline = time.monotonic() + 90
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                        sock.sendall(build_request("GET", "/ready"))
                        if read_response(sock, bytearray()) == 200:
                            break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            rng = np.random.default_rng(0)
            bodies = [
                json.dumps({"inputs": rng.uniform(-3, 3, (48, 13)).tolist()}).encode()
                for _ in range(args.requests)
            ]
            run_round(port, bodies[:300], with_id=False)  # warm-up, unmeasured
            kinds: dict[str, list[float]] = {"without_id": [], "with_id": []}
            for number in range(args.rounds):
                order = ("without_id", "with_id") if number % 2 == 0 else ("with_id", "without_id")
                for kind in order:
                    latencies = run_round(port, bodies, with_id=kind == "with_id")
                    kinds[kind] += latencies
                    print(f"round {number + 1} {kind}: {quantiles(latencies)}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    ring = ShadowRing(10_000)
    probabilities = np.full((1, 3), 1 / 3, dtype=np.float32)
    ids = [secrets.token_hex(16).encode() for _ in range(100_000)]
    started = time.perf_counter()
    for raw in ids:
        if ring.accepts(raw):
            ring.add(raw, "strategic", 200, started, probabilities.copy())
    append_us = (time.perf_counter() - started) / len(ids) * 1e6
    without, with_id = quantiles(kinds["without_id"]), quantiles(kinds["with_id"])
    result = {
        "requests_per_kind": len(kinds["with_id"]),
        "without_id_ms": without,
        "with_id_ms": with_id,
        "ratio": {q: round(with_id[q] / without[q], 4) for q in ("p50", "p99")},
        "median_difference_us": round(
            (statistics.median(kinds["with_id"]) - statistics.median(kinds["without_id"])) * 1e6, 2
        ),
        "append_alone_us": round(append_us, 3),
        "cpus": os.cpu_count(),
        "load1": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
