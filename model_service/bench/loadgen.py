"""A lean asyncio HTTP/1.1 keep-alive load generator, and a sink server to measure it.

Python HTTP clients (httpx, aiohttp) cost more CPU per request than the server under test;
this one writes pre-built request bytes on raw keep-alive connections and parses only the
status line and Content-Length of each response, so one core drives far more requests.

Run as ``python model_service/bench/loadgen.py SPEC.json`` (prints one JSON result line) or
``python model_service/bench/loadgen.py --sink PORT`` (a canned-response HTTP server);
``run_spec`` does the former from Python, pinned to a CPU. Benchmark tooling: not part of the
service's wheel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import Any, cast

import numpy as np
import orjson


def build_request(
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    host: str = "127.0.0.1",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    first: float = 0.0
    last: float = 0.0


def _complete_message_length(buffer: bytearray) -> int | None:
    """Length of the complete HTTP/1.1 message at the head of buffer, framed by Content-Length."""
    header_end = buffer.find(b"\r\n\r\n")
    if header_end < 0:
        return None
    header = bytes(buffer[:header_end]).lower()
    at = header.find(b"content-length:")
    length = 0
    if at >= 0:
        stop = header.find(b"\r\n", at)
        length = int(header[at + 15 : stop if stop >= 0 else None])
    total = header_end + 4 + length
    return total if len(buffer) >= total else None


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, driver: _Driver) -> None:
        self.driver = driver
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0
        self.intended_at = 0.0
        self.busy = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        was_busy, self.busy = self.busy, False
        self.driver.connection_lost(self, was_busy)

    def send(self, request: bytes, intended_at: float) -> None:
        assert self.transport is not None
        self.busy = True
        self.intended_at = intended_at
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while (total := _complete_message_length(buffer)) is not None:
            status = int(buffer[9:12])
            del buffer[:total]
            self.busy = False
            self.driver.completed(self, status)


class _Driver:
    def __init__(self, request: bytes, measure_from: float, end_at: float) -> None:
        self.request = request
        self.measure_from = measure_from
        self.end_at = end_at
        self.stats = Stats()
        self.idle: deque[_Connection] = deque()
        self.backlog: deque[float] = deque()
        self.open_loop = False
        self.finished_sending = False
        self.outstanding = 0
        self.done = asyncio.get_running_loop().create_future()

    def completed(self, conn: _Connection, status: int) -> None:
        now = time.perf_counter()
        self.outstanding -= 1
        started = conn.intended_at if self.open_loop else conn.sent_at
        if started >= self.measure_from:
            self.stats.latencies.append(now - started)
            self.stats.statuses[status] += 1
            if not self.stats.first:
                self.stats.first = started
            self.stats.last = now
        if self.open_loop:
            if self.backlog:  # already counted as outstanding when it was due
                conn.send(self.request, self.backlog.popleft())
            else:
                self.idle.append(conn)
        elif now < self.end_at:
            self.outstanding += 1
            conn.send(self.request, now)
        else:
            self.finished_sending = True
        self.check_done()

    def check_done(self) -> None:
        if self.finished_sending and self.outstanding == 0 and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, conn: _Connection, was_busy: bool) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if was_busy:
            self.stats.errors += 1
            self.outstanding -= 1
            self.check_done()


def load_request(spec: dict[str, Any]) -> bytes:
    if "request_file" in spec:
        return Path(spec["request_file"]).read_bytes()
    return build_request(spec.get("method", "GET"), spec.get("path", "/health"))


async def run_load(spec: dict[str, Any], request: bytes) -> dict[str, Any]:
    """Closed loop (``concurrency`` connections, back to back) or open loop (``rate``/s)."""
    host, port = spec.get("host", "127.0.0.1"), int(spec["port"])
    warmup, duration = float(spec.get("warmup", 0.5)), float(spec.get("duration", 3.0))
    rate = float(spec.get("rate", 0))
    concurrency = int(spec.get("concurrency", 64 if rate else 1))
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    driver = _Driver(request, start + warmup, start + warmup + duration)
    connections: list[_Connection] = []
    for _ in range(concurrency):
        _, conn = await loop.create_connection(lambda: _Connection(driver), host, port)
        connections.append(conn)
    start = time.perf_counter()
    driver.measure_from = start + warmup
    driver.end_at = start + warmup + duration
    if rate:
        driver.open_loop = True
        driver.idle.extend(connections)
        interval = 1.0 / rate
        sent = 0
        total = int(rate * (warmup + duration))
        while sent < total:
            now = time.perf_counter()
            due = min(total, int((now - start) / interval) + 1)
            while sent < due:
                intended = start + sent * interval
                sent += 1
                driver.outstanding += 1
                if driver.idle:
                    driver.idle.popleft().send(request, intended)
                else:
                    driver.backlog.append(intended)
            # Timers have 1 ms resolution: sleep coarsely, then spin (this core is ours) so
            # that requests leave on schedule instead of in bursts.
            remaining = start + sent * interval - time.perf_counter()
            await asyncio.sleep(remaining - 0.0015 if remaining > 0.002 else 0)
        driver.finished_sending = True
        driver.check_done()
    else:
        for conn in connections:
            driver.outstanding += 1
            conn.send(request, start)
    try:
        await asyncio.wait_for(driver.done, warmup + duration + 30)
    except TimeoutError:
        driver.stats.errors += driver.outstanding
    for conn in connections:
        if conn.transport is not None:
            conn.transport.close()
    stats = driver.stats
    elapsed = max(stats.last - max(stats.first, driver.measure_from), 1e-9)
    count = len(stats.latencies)
    lat = np.asarray(stats.latencies) * 1000 if count else np.zeros(1)
    samples = int(spec.get("samples_per_request", 1))
    ok = stats.statuses.get(200, 0)
    return {
        "requests": count,
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "errors": stats.errors,
        "seconds": round(elapsed, 3),
        "rps": round(ok / elapsed, 1),
        "samples_per_s": round(ok * samples / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p90_ms": round(float(np.percentile(lat, 90)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "p99_9_ms": round(float(np.percentile(lat, 99.9)), 3),
        "max_ms": round(float(lat.max()), 3),
        "concurrency": concurrency,
        "rate": rate or None,
    }


class _SinkProtocol(asyncio.Protocol):
    RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}"

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while (total := _complete_message_length(buffer)) is not None:
            del buffer[:total]
            assert self.transport is not None
            self.transport.write(self.RESPONSE)


async def run_sink(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_SinkProtocol, "127.0.0.1", port, backlog=1024)
    print("sink ready", flush=True)
    async with server:
        await server.serve_forever()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_spec(spec: dict[str, Any], cpu: int | None = None, timeout: float = 180) -> dict[str, Any]:
    """Run one load in a child process (optionally pinned to ``cpu``); its result dict."""
    with NamedTemporaryFile("wb", suffix=".json", prefix="loadspec-") as handle:
        handle.write(orjson.dumps(spec))
        handle.flush()
        args = [sys.executable, __file__, handle.name]
        if cpu is not None:
            args += ["--cpu", str(cpu)]
        done = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    lines = done.stdout.decode().strip().splitlines()
    if done.returncode or not lines:
        raise RuntimeError(f"load generator failed: {done.stderr.decode()[-2000:]}")
    result: dict[str, Any] = orjson.loads(lines[-1])
    return result


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loadgen.py", description=__doc__)
    parser.add_argument("spec", nargs="?", type=Path, help="JSON spec of one load run")
    parser.add_argument("--sink", type=int, metavar="PORT", help="run the canned sink server")
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    _use_uvloop()
    if args.sink is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_sink(args.sink))
        return 0
    if args.spec is None:
        parser.error("a spec file or --sink is required")
    spec = orjson.loads(args.spec.read_bytes())
    result = asyncio.run(run_load(spec, load_request(spec)))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
