"""The load generator's own accounting: the colour sequence and the reload overlap it reports."""

from __future__ import annotations

import http.client
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from frontdoor_load import LoadGenerator, Report, Request


def report(*answers: tuple[float, str], failed_at: float | None = None) -> Report:
    rep = Report()
    for started, color in answers:
        rep.add(Request(started, 0.01, 200, color, True))
    if failed_at is not None:
        rep.add(Request(failed_at, 0.01, 0, "", True, "RemoteDisconnected: closed"))
    return rep


def test_a_clean_cutover_is_one_switch():
    rep = report((0.0, "blue"), (0.5, "blue"), (1.0, "green"), (1.5, "green"))
    assert rep.colors() == rep.colors(settle=1.0) == ["blue", "green"]
    assert rep.overlap(1.0) == {"requests": 0, "max_s": 0.0, "settle_s": 1.0}


def test_old_workers_finishing_within_the_settle_window_are_overlap_not_a_switch_back():
    rep = report((0.0, "blue"), (1.0, "green"), (1.2, "blue"), (1.6, "blue"), (2.0, "green"))
    assert rep.colors() == ["blue", "green", "blue", "green"]
    assert rep.colors(settle=1.0) == ["blue", "green"]
    assert rep.overlap(1.0) == {"requests": 2, "max_s": 0.6, "settle_s": 1.0}


def test_the_old_colour_answering_later_is_a_switch_back():
    rep = report((0.0, "blue"), (1.0, "green"), (2.5, "blue"), (3.0, "blue"))
    assert rep.colors(settle=1.0) == ["blue", "green", "blue"]
    summary = rep.summary()
    assert summary["color_sequence_settled"] == ["blue", "green", "blue"]


def test_each_switch_has_its_own_window_and_failures_never_count_as_a_colour():
    rep = report((0.0, "blue"), (1.0, "green"), (1.1, "blue"), (5.0, "blue"), (5.3, "green"),
                 (9.0, "green"), failed_at=9.5)
    assert rep.colors(settle=1.0) == ["blue", "green", "blue", "green"]
    assert rep.overlap(1.0)["requests"] == 2
    assert rep.summary()["failed"] == 1


def _serve(listener: socket.socket, script: list[str]) -> None:
    """Per accepted connection, in order: 'answer' requests until told 'close-after-read'."""
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Served-By: app:8002\r\n"
              b"Content-Length: 2\r\n\r\n{}")
    for plan in script:
        conn, _ = listener.accept()
        with conn:
            for step in plan.split(","):
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(body) < length:
                    body += conn.recv(65536)
                if step == "close":  # read the request, then close without a byte of answer
                    break
                conn.sendall(answer)


def test_a_reused_connection_closed_before_any_answer_is_resent_once_and_counted():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    server = threading.Thread(target=_serve, args=(listener, ["answer,close", "answer"]), daemon=True)
    server.start()
    gen = LoadGenerator(port=port, rate=10, workers=1, seconds=5)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    first = gen._one(conn, keepalive=True)
    second = gen._one(conn, keepalive=True)  # the server closes this reused connection unanswered
    conn.close()
    server.join(5)
    listener.close()
    assert (first.status, first.retried, first.color) == (200, False, "green")
    assert (second.status, second.retried, second.color) == (200, True, "green")
    rep = Report()
    rep.add(first)
    rep.add(second)
    assert rep.summary()["failed"] == 0 and rep.summary()["retried_reused_connection"] == 1


def test_a_new_connection_closed_before_any_answer_is_a_failure_not_a_retry():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    server = threading.Thread(target=_serve, args=(listener, ["close"]), daemon=True)
    server.start()
    gen = LoadGenerator(port=port, rate=10, workers=1, seconds=5)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    req = gen._one(conn, keepalive=True)
    conn.close()
    server.join(5)
    listener.close()
    assert req.status == 0 and not req.retried and "RemoteDisconnected" in req.error
