"""A webhook receiver on the loopback that keeps every JSON body it is sent (for the release notification tests).

    with WebhookReceiver() as receiver:
        ...  # give receiver.url to the rollout's rollout_notify_webhooks
        events = [body["event"] for body in receiver.bodies]

It answers 202 with no body, like an Alertmanager-style receiver; a body that is not JSON is kept as
{"unparsed": <text>} so a test sees it instead of the server thread dying.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class WebhookReceiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1") -> None:
        bodies: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    bodies.append(json.loads(raw))
                except ValueError:
                    bodies.append({"unparsed": raw.decode(errors="replace")})
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__((host, 0), Handler)
        self.bodies = bodies
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]!s}:{self.server_address[1]}/hook"

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
