"""A real uvicorn process: JSON-lines logs, and SIGTERM loses no accepted request."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from loadgen import build_request

from .conftest import ADMIN_TOKEN, matrix

SLOW_BODY = orjson.dumps(  # a 64k-row MC-dropout forward: tens of ms, queued on one thread
    {"inputs": matrix((64, 48, 13)), "mc_passes": 1000}, option=orjson.OPT_SERIALIZE_NUMPY
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


@pytest.fixture
def server(artifacts: Path, tmp_path: Path):
    port = _free_port()
    log_path = tmp_path / "server.log"
    env = {
        **os.environ,
        "GRANDMODEL_MODEL_DIR": str(artifacts),
        "GRANDMODEL_PORT": str(port),
        "GRANDMODEL_ENV": "staging",
        "GRANDMODEL_ADMIN_TOKEN": ADMIN_TOKEN,
        "GRANDMODEL_COLOR": "blue",
        "GRANDMODEL_WARMUP_ITERATIONS": "1",
        "GRANDMODEL_GRACEFUL_TIMEOUT_S": "60",
        "GRANDMODEL_MAX_MC_PASSES": "1000",
        "GRANDMODEL_MC_QUEUE_LIMIT": "32",  # the SIGTERM test queues 12 slow MC requests
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "grandmodel_service.server"], env=env, stdout=log, stderr=log
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if _get(port, "/ready")[0] == 200:
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"server did not become ready:\n{log_path.read_text()}")
    yield proc, port, log_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _in_flight(port: int) -> float:
    text = _get(port, "/metrics")[1].decode()
    for line in text.splitlines():
        if line.startswith("grandmodel_http_requests_in_flight "):
            return float(line.split()[1])
    return 0.0


def test_sigterm_finishes_every_accepted_request(server) -> None:
    proc, port, log_path = server
    count = 12
    results: list[tuple[int, bytes] | Exception] = [RuntimeError("not run")] * count

    def call(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request(
                "POST",
                "/v1/models/strategic/predict",
                body=SLOW_BODY,
                headers={"content-type": "application/json"},
            )
            reply = conn.getresponse()
            results[index] = (reply.status, reply.read())
        except Exception as exc:
            results[index] = exc
        finally:
            conn.close()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while (in_flight := _in_flight(port)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert in_flight == count, "requests were not all accepted before SIGTERM"
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    for thread in threads:
        thread.join(120)
    assert time.monotonic() - signalled > 0.05  # the work really outlived the signal
    for result in results:
        assert not isinstance(result, Exception), result
        status, body = result
        assert status == 200
        assert len(json.loads(body)["predictions"]) == 64
    assert proc.wait(60) is not None
    with pytest.raises(ConnectionRefusedError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    messages = [line["msg"] for line in lines]  # every line is one JSON object
    assert "model loaded, verified and warmed up" in messages
    assert "service stopped" in messages
    assert messages.index("service stopped") > messages.index("Shutting down")


def test_raw_http_loadgen_against_the_real_server(server) -> None:
    """The benchmark's generator speaks HTTP/1.1 keep-alive correctly (short, bounded run)."""
    import asyncio

    from loadgen import run_load

    _, port, _ = server
    body = orjson.dumps({"inputs": matrix((48, 13))}, option=orjson.OPT_SERIALIZE_NUMPY)
    request = build_request(
        "POST", "/v1/models/strategic/predict", body, {"content-type": "application/json"}
    )
    closed = asyncio.run(
        run_load({"port": port, "concurrency": 4, "duration": 0.3, "warmup": 0.1}, request)
    )
    assert closed["requests"] > 10
    assert closed["statuses"] == {"200": closed["requests"]}
    assert closed["errors"] == 0
    opened = asyncio.run(
        run_load({"port": port, "rate": 200, "duration": 0.5, "warmup": 0.1}, request)
    )
    assert opened["statuses"] == {"200": opened["requests"]}
    assert 80 <= opened["requests"] <= 101
    assert np.isfinite(opened["p99_ms"])
    status, version = _get(port, "/version")
    assert status == 200
    assert json.loads(version)["color"] == "blue"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    """Whether the process still exists, as a running process or a zombie nobody reaped yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:100]
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        state = next(line for line in status if line.startswith("State"))
    except (OSError, StopIteration):
        return f"{pid} (gone)"
    return f"{pid} {state} {cmd}"


def test_the_server_exits_after_its_worker_and_resource_tracker(server) -> None:
    """systemd stops a colour when its cgroup is empty: a helper process that outlives the server
    (the multiprocessing resource tracker ignores SIGTERM and used to exit only after the server
    had) made every stop on the test hosts wait the unit's whole TimeoutStopSec, 30 s."""
    proc, _port, _log = server
    children = _children(proc.pid)
    assert len(children) >= 2, children  # the Monte-Carlo worker process and the resource tracker
    proc.send_signal(signal.SIGTERM)  # the server alone: it must stop and reap its children
    proc.wait(60)  # uvicorn ends by re-raising the signal once it has shut down
    left = [pid for pid in children if _alive(pid)]
    described = [_describe(pid) for pid in left]
    assert left == [], f"processes of the server still there after it exited: {described}"
