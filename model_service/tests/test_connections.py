"""Real uvicorn processes: slow and idle connections are cut and counted, normal ones answer;
the service listens only where it is told; /docs needs nothing from outside."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from grandmodel_service import server

from .conftest import matrix

BODY = orjson.dumps({"inputs": matrix((48, 13))}, option=orjson.OPT_SERIALIZE_NUMPY)
PREDICT = "/v1/models/strategic/predict"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _request(
    port: int, method: str, path: str, body: bytes | None = None, host: str = "127.0.0.1"
) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        headers = {"content-type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read(), {k.lower(): v for k, v in reply.getheaders()}
    finally:
        conn.close()


def _start(
    artifacts: Path, tmp_path: Path, **settings: str
) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = _free_port()
    log_path = tmp_path / f"server-{port}.log"
    env = {
        **os.environ,
        "GRANDMODEL_MODEL_DIR": str(artifacts),
        "GRANDMODEL_PORT": str(port),
        "GRANDMODEL_ENV": "development",
        "GRANDMODEL_MODELS": '["strategic"]',
        "GRANDMODEL_WARMUP_ITERATIONS": "1",
        **{f"GRANDMODEL_{k.upper()}": v for k, v in settings.items()},
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "grandmodel_service.server"], env=env, stdout=log, stderr=log
        )
    return proc, port, log_path


def _wait_ready(
    proc: subprocess.Popen[bytes], port: int, log_path: Path, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited {proc.returncode}:\n{log_path.read_text()}")
        try:
            if _request(port, "GET", "/ready", host=host)[0] == 200:
                return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail(f"server did not become ready:\n{log_path.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def guarded(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """One server for the connection tests (each measures counter deltas)."""
    proc, port, log_path = _start(
        artifacts,
        tmp_path_factory.mktemp("guarded"),
        header_timeout_s="1.0",
        body_timeout_s="1.0",
        keepalive_timeout_s="2",
        limit_concurrency="24",
    )
    _wait_ready(proc, port, log_path)
    yield port
    _stop(proc)


def _closed_counts(port: int) -> dict[str, float]:
    text = _request(port, "GET", "/metrics")[1].decode()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(
            r'^grandmodel_connections_closed_total\{reason="(\w+)"\} (\S+)$', text, re.M
        )
    }


def _read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (seconds from now)."""
    started = time.monotonic()
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        return data, float("inf")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - started


def test_slow_and_idle_connections_are_cut_counted_and_others_still_answer(guarded: int) -> None:
    port = guarded
    before = _closed_counts(port)
    partial_body = (
        f"POST {PREDICT} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        f"content-length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY[:100]

    def trickle(sock: socket.socket) -> None:  # slowloris: one header byte every 150 ms
        for byte in b"GET /health HTTP/1.1\r\nhost: t\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaa\r\n":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.15)

    # The kinds of slow client, several of each, all at once.
    kinds: dict[str, list[socket.socket]] = {
        "idle": [],
        "partial_header": [],
        "partial_body": [],
        "trickle": [],
    }
    for _ in range(3):
        for kind, socks in kinds.items():
            sock = socket.create_connection(("127.0.0.1", port))
            socks.append(sock)
            if kind == "partial_header":
                sock.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\nx-half: ab")
            elif kind == "partial_body":
                sock.sendall(partial_body)
            elif kind == "trickle":
                threading.Thread(target=trickle, args=(sock,), daemon=True).start()
    opened = time.monotonic()
    # Meanwhile normal requests answer at once.
    for _ in range(20):
        status, _body, _headers = _request(port, "POST", PREDICT, BODY)
        assert status == 200
    assert time.monotonic() - opened < 1.0, "normal requests were slowed by the slow ones"
    outcomes: dict[str, list[tuple[bytes, float]]] = {}
    for kind, socks in kinds.items():
        outcomes[kind] = [_read_until_closed(sock, 6.0) for sock in socks]
        for sock in socks:
            sock.close()
    for kind, results in outcomes.items():
        for data, _closed_after in results:
            if kind == "idle":
                assert data == b""  # nothing to answer: closed silently
            else:
                assert data.startswith(b"HTTP/1.1 408 "), (kind, data[:80])
    # Every connection closed by the server about when its deadline (1 s from open) expired.
    elapsed = time.monotonic() - opened
    assert elapsed < 6.0
    after = _closed_counts(port)
    assert after["idle_timeout"] - before["idle_timeout"] == 3
    assert after["header_timeout"] - before["header_timeout"] == 6  # partial + trickle
    assert after["body_timeout"] - before["body_timeout"] == 3
    # And the service is still fine.
    assert _request(port, "POST", PREDICT, BODY)[0] == 200


def test_deadline_is_per_request_on_kept_alive_connections(guarded: int) -> None:
    port = guarded
    before = _closed_counts(port)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    # Requests spaced below the keep-alive timeout on one connection keep working, for longer
    # than the header deadline in all.
    for _ in range(4):
        conn.request("POST", PREDICT, body=BODY, headers={"content-type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 200
        reply.read()
        time.sleep(0.6)
    # Idle past the keep-alive timeout: the server closes it and counts it.
    sock = conn.sock
    assert sock is not None
    data, closed_after = _read_until_closed(sock, 5.0)
    assert data == b""
    assert closed_after < 3.0
    conn.close()
    after = _closed_counts(port)
    assert after["keepalive_timeout"] - before["keepalive_timeout"] == 1
    assert after["header_timeout"] == before["header_timeout"]


def test_concurrency_limit_refuses_at_once_and_recovers(guarded: int) -> None:
    port = guarded
    before = _closed_counts(port)
    hogs = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
    try:
        time.sleep(0.2)
        status, _body, _ = _request(port, "POST", PREDICT, BODY)
        assert status == 503
    finally:
        for sock in hogs:
            sock.close()
    time.sleep(0.3)
    assert _request(port, "POST", PREDICT, BODY)[0] == 200
    assert _closed_counts(port)["concurrency_limit"] - before["concurrency_limit"] >= 1


def test_listens_on_every_configured_address_and_nowhere_else(
    artifacts: Path, tmp_path: Path
) -> None:
    proc, port, log_path = _start(artifacts, tmp_path, host="127.0.0.1,127.0.0.2")
    try:
        _wait_ready(proc, port, log_path)
        assert _request(port, "GET", "/health", host="127.0.0.2")[0] == 200
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.3", port), timeout=2).close()
    finally:
        _stop(proc)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    start = next(line for line in lines if line["msg"] == "starting")
    assert start["addresses"] == ["127.0.0.1", "127.0.0.2"]
    assert start["header_timeout_s"] == 5.0


@pytest.mark.parametrize(
    ("host", "words"),
    [
        ("localhost", "is not an IP address"),
        ("127.0.0.1,127.0.0.1", "repeat"),
        ("", "at least one"),
    ],
)
def test_bad_listen_address_refuses_to_start(
    artifacts: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    host: str,
    words: str,
) -> None:
    monkeypatch.setenv("GRANDMODEL_MODEL_DIR", str(artifacts))
    monkeypatch.setenv("GRANDMODEL_HOST", host)
    assert server.main([]) == 2
    assert words in capsys.readouterr().err


def test_address_in_use_is_a_clear_refusal(
    artifacts: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("GRANDMODEL_MODEL_DIR", str(artifacts))
        monkeypatch.setenv("GRANDMODEL_PORT", str(taken.getsockname()[1]))
        assert server.main([]) == 2
    err = capsys.readouterr().err
    assert "cannot listen" in err
    assert "Address already in use" in err


def test_docs_are_self_contained(guarded: int) -> None:
    status, page, headers = _request(guarded, "GET", "/docs")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in headers["content-security-policy"]
    assert not re.search(rb"(src|href)\s*=\s*[\"']?(https?:)?//", page), "external asset in /docs"
    assert b"/openapi.json" in page
    spec = json.loads(_request(guarded, "GET", "/openapi.json")[1])
    assert PREDICT in spec["paths"]
    assert _request(guarded, "GET", "/redoc")[0] == 404
