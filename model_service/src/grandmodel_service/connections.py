"""Bounded connections: uvicorn's httptools protocol with header and body read deadlines.

uvicorn closes a keep-alive connection that stays idle after a response
(``timeout_keep_alive``), but it arms nothing before the first request: a connection that
never sends a byte, or sends half a header line, or announces a body and then trickles it,
stays open for ever and holds a slot. This protocol adds two deadlines and counts every
connection it cuts:

- **header**: from the moment a connection opens (or, on a kept-alive connection, from the
  first byte of the next request) the request line and headers must be complete within
  ``header_timeout_s``. Otherwise: ``408`` and close (reason ``header_timeout``; a connection
  that sent nothing at all is closed silently, reason ``idle_timeout``).
- **body**: once the headers are in, the whole body must arrive within ``body_timeout_s``
  (reason ``body_timeout``; the application sees a disconnect).

Plus ``keepalive_timeout`` (uvicorn's own idle timer, counted here) and
``concurrency_limit`` (uvicorn's 503 when ``limit_concurrency`` connections or requests are
in use, counted here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

RESPONSE_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: 69\r\n\r\n"
    b'{"error":"request_timeout","detail":"request not received in time"}\r\n'
)
assert len(RESPONSE_408.partition(b"\r\n\r\n")[2]) == 69


def guarded_protocol(
    *,
    header_timeout_s: float,
    body_timeout_s: float,
    on_close: Callable[[str], None],
) -> type[asyncio.Protocol]:
    """An ``HttpToolsProtocol`` subclass enforcing the deadlines; pass it as uvicorn's ``http``."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._deadline: asyncio.TimerHandle | None = None
            self._got_bytes = False

        # -- deadlines ------------------------------------------------------------------
        def _arm(self, seconds: float, handler: Callable[[], None]) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, handler)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _header_expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self._got_bytes:
                on_close("header_timeout")
                self.transport.write(RESPONSE_408)
            else:
                on_close("idle_timeout")
            self.transport.close()

        def _body_expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            on_close("body_timeout")
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                self.transport.write(RESPONSE_408)
            if cycle is not None:
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.close()

        # -- protocol hooks ---------------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(header_timeout_s, self._header_expired)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
                # First byte of a new request on a kept-alive connection.
                self._arm(header_timeout_s, self._header_expired)
            self._got_bytes = True
            super().data_received(data)

        def on_headers_complete(self) -> None:
            limited = self.limit_concurrency is not None and (
                len(self.connections) >= self.limit_concurrency
                or len(self.tasks) >= self.limit_concurrency
            )
            if limited:
                on_close("concurrency_limit")
            self._arm(body_timeout_s, self._body_expired)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            self._got_bytes = False
            super().on_response_complete()

        def timeout_keep_alive_handler(self) -> None:
            if not self.transport.is_closing():
                on_close("keepalive_timeout")
            super().timeout_keep_alive_handler()

    return GuardedHttpToolsProtocol
