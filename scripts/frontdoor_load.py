#!/usr/bin/env python3
"""Bounded load through the GrandModel front door, logging every request's status and colour.

Used by the rollout scenario (molecule/rollout) and the release benchmark (scripts/bench_rollout.py).
Half the workers keep one HTTP/1.1 connection open (keep-alive clients), half open a new
connection per request. Every request is a real single-sample prediction; the colour that served
it comes from the `X-Served-By` header nginx adds (the upstream port names the colour).

Traffic goes only to the address given, which must be loopback or a test host of this run, and
stops after --seconds or --max-requests, whichever comes first.

  scripts/frontdoor_load.py --port 28080 --seconds 10 --rate 100
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import select
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PREDICT_PATH = "/v1/models/strategic/predict"
DEFAULT_COLOR_PORTS = {8001: "blue", 8002: "green"}
RELOAD_SETTLE_S = 1.0


def sample_body(bars: int = 48, features: int = 13) -> bytes:
    rows = [[round(((r * features + c) % 17) / 17.0 - 0.5, 4) for c in range(features)] for r in range(bars)]
    return json.dumps({"inputs": rows}).encode()


@dataclass
class Request:
    started: float
    seconds: float
    status: int
    color: str
    keepalive: bool
    error: str = ""
    retried: bool = False  # resent once after a reused connection closed before any answer
    version: str = ""  # the model release the answer names (LoadGenerator(read_version=True) only)

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class Report:
    requests: list[Request] = field(default_factory=list)

    def add(self, req: Request) -> None:
        self.requests.append(req)

    @property
    def total(self) -> int:
        return len(self.requests)

    @property
    def failed(self) -> list[Request]:
        return [r for r in self.requests if not r.ok]

    def colors(self, settle: float = 0.0) -> list[str]:
        """Colours in the order they served (by request start), collapsed: e.g. ['blue', 'green'].

        With settle > 0, an answer from the previous colour to a request that started at most `settle`
        seconds after the first answer of the new colour is the overlap of an nginx graceful reload
        (old workers finish requests already on their connections), not a switch back; it is counted
        by overlap() instead. An old-colour answer later than that is a switch back and shows here.
        """
        return self._walk(settle)[0]

    def overlap(self, settle: float) -> dict[str, float | int]:
        """Old-colour answers within `settle` s after each switch: how many, and the latest (s after it)."""
        late = self._walk(settle)[1]
        return {"requests": len(late), "max_s": round(max(late), 3) if late else 0.0, "settle_s": settle}

    def _walk(self, settle: float) -> tuple[list[str], list[float]]:
        seq: list[str] = []
        switched_at = 0.0
        late: list[float] = []
        for r in sorted(self.requests, key=lambda x: x.started):
            if not r.ok or (seq and seq[-1] == r.color):
                continue
            if len(seq) >= 2 and r.color == seq[-2] and r.started - switched_at <= settle:
                late.append(r.started - switched_at)
                continue
            seq.append(r.color)
            switched_at = r.started
        return seq, late

    def summary(self) -> dict[str, object]:
        lat = sorted(r.seconds for r in self.requests if r.ok)
        by_status: dict[str, int] = {}
        by_color: dict[str, int] = {}
        for r in self.requests:
            key = str(r.status) if r.status else f"error:{r.error.split(':')[0]}"
            by_status[key] = by_status.get(key, 0) + 1
            if r.ok:
                by_color[r.color] = by_color.get(r.color, 0) + 1
        return {
            "requests": self.total,
            "failed": len(self.failed),
            "failed_keepalive": sum(1 for r in self.failed if r.keepalive),
            "failed_new_connection": sum(1 for r in self.failed if not r.keepalive),
            "retried_reused_connection": sum(1 for r in self.requests if r.retried),
            "by_status": by_status,
            "by_color": by_color,
            "color_sequence": self.colors(),
            # The sequence with an nginx reload's overlap (old colour answering for up to 1 s after the
            # first answer of the new one) not counted as a switch back; the overlap itself beside it.
            "color_sequence_settled": self.colors(settle=RELOAD_SETTLE_S),
            "reload_overlap": self.overlap(RELOAD_SETTLE_S),
            "latency_ms_p50": round(statistics.median(lat) * 1000, 2) if lat else None,
            "latency_ms_p99": round(lat[int(0.99 * (len(lat) - 1))] * 1000, 2) if lat else None,
            "latency_ms_max": round(lat[-1] * 1000, 2) if lat else None,
            "first_failures": [
                {"t": round(r.started, 3), "status": r.status, "error": r.error} for r in self.failed[:5]
            ],
        }

    def first_seen(self, color: str) -> float | None:
        times = [r.started + r.seconds for r in self.requests if r.ok and r.color == color]
        return min(times) if times else None


def check_target(host: str) -> None:
    try:
        addr = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot resolve load target {host!r}: {exc}") from exc
    if not (addr.is_loopback or addr.is_private):
        raise SystemExit(f"refusing to send load to {addr}: only loopback or this run's test hosts")


class LoadGenerator:
    """Paced workers sending predictions until stopped or bounded out."""

    def __init__(self, host: str = "127.0.0.1", port: int = 28080, rate: float = 100.0,
                 workers: int = 8, seconds: float = 120.0, max_requests: int = 100_000,
                 color_ports: dict[int, str] | None = None, timeout: float = 10.0,
                 read_version: bool = False) -> None:
        check_target(host)
        self.host, self.port, self.timeout = host, port, timeout
        self.read_version = read_version
        self.interval = workers / rate
        self.workers = workers
        self.deadline = time.monotonic() + seconds
        self.max_requests = max_requests
        self.color_ports = color_ports or DEFAULT_COLOR_PORTS
        self.body = sample_body()
        self.report = Report()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sent = 0

    def _color(self, served_by: str | None) -> str:
        if not served_by:
            return "unknown"
        # nginx may list several upstreams tried ("a:8001, b:8002"): the last one answered.
        last = served_by.split(",")[-1].strip()
        try:
            return self.color_ports.get(int(last.rsplit(":", 1)[1]), last)
        except (IndexError, ValueError):
            return last

    @staticmethod
    def _version(data: bytes) -> str:
        """The release a prediction's answer names (its "version"), read from the answer itself."""
        try:
            return str(json.loads(data).get("version", ""))
        except (ValueError, AttributeError):
            return ""

    @staticmethod
    def _drop_if_closed(conn: http.client.HTTPConnection) -> None:
        """Reconnect when the server already closed this idle keep-alive connection.

        A connection pool checks this before reusing a connection (urllib3's
        is_connection_dropped does the same): nginx closes idle keep-alive connections when it
        reloads, and a request written to such a socket is lost before the server ever reads it.
        """
        sock = conn.sock
        if sock is None:
            return
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable and not sock.recv(1, socket.MSG_PEEK):
                conn.close()
        except OSError:
            conn.close()

    def _one(self, conn: http.client.HTTPConnection, keepalive: bool) -> Request:
        if keepalive:
            self._drop_if_closed(conn)
        started = time.monotonic()
        headers = {"Content-Type": "application/json"}
        if not keepalive:
            headers["Connection"] = "close"
        retried = False
        try:
            reused = conn.sock is not None
            try:
                conn.request("POST", PREDICT_PATH, body=self.body, headers=headers)
                resp = conn.getresponse()
            except (BrokenPipeError, ConnectionResetError):
                # A reused keep-alive connection closed by the server (an nginx reload closes idle ones)
                # before any byte of an answer: resent once on a new connection, as RFC 9112 9.3.1 lets a
                # client do for a request it knows to be idempotent (a prediction is a pure function of
                # its input; docs/release.md asks clients to do this). Counted as `retried`, never hidden.
                if not reused:
                    raise
                conn.close()
                retried = True
                conn.request("POST", PREDICT_PATH, body=self.body, headers=headers)
                resp = conn.getresponse()
            data = resp.read()
            color = self._color(resp.getheader("X-Served-By"))
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
            return Request(started, time.monotonic() - started, resp.status, color, keepalive, retried=retried,
                           version=self._version(data) if self.read_version and resp.status == 200 else "")
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            return Request(started, time.monotonic() - started, 0, "", keepalive,
                           f"{type(exc).__name__}: {exc}", retried=retried)

    def _worker(self, index: int) -> None:
        keepalive = index % 2 == 0
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        next_at = time.monotonic() + (index / self.workers) * self.interval
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            with self._lock:
                if self._sent >= self.max_requests:
                    break
                self._sent += 1
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at += self.interval
            if not keepalive:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            req = self._one(conn, keepalive)
            with self._lock:
                self.report.add(req)
            if not keepalive:
                conn.close()
        conn.close()

    def start(self) -> LoadGenerator:
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> Report:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 5)
        return self.report

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=28080)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second, all workers")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    gen = LoadGenerator(args.host, args.port, args.rate, args.workers, args.seconds, args.max_requests)
    gen.start()
    while any(t.is_alive() for t in gen._threads):
        time.sleep(0.2)
    summary = gen.stop().summary()
    print(json.dumps(summary, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary) + "\n")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
