"""Fixtures for the collection's unit tests: loopback HTTP servers, a real nginx, module runner.

pytest runs these from the repository root (`pytest ansible_collections/quantnova/grandmodel/tests/unit`);
the repository root goes on sys.path so `ansible_collections.quantnova.grandmodel...` imports resolve
to this checkout, the way ansible-test units resolve them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[5]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.testing import patch_module_args

from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic import render_upstream

Route = Callable[["Handler", bytes], tuple[int, Any]]


class Handler(BaseHTTPRequestHandler):
    server: LoopbackServer

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def _answer(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append((method, self.path, body))
        route = self.server.routes.get((method, self.path.split("?")[0]))
        if route is None:
            status, payload = 404, {"error": "not found"}
        else:
            status, payload = route(self, body)
        delay = self.server.delay
        if delay:
            time.sleep(delay)
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")


class LoopbackServer(ThreadingHTTPServer):
    """A tiny real HTTP server on 127.0.0.1 whose answers a test sets per (method, path)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: list[tuple[str, str, bytes]] = []
        self.delay = 0.0
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LoopbackServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class ColorServer(LoopbackServer):
    """Stands in for one colour's service process: GET /version answers {"color": <colour>}."""

    def __init__(self, color: str) -> None:
        super().__init__()
        self.color = color
        self.routes[("GET", "/version")] = lambda _h, _b: (200, {"color": self.color, "service_version": "1"})


@pytest.fixture
def loopback_server() -> Iterator[LoopbackServer]:
    server = LoopbackServer().start()
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- nginx --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def nginx_binary() -> str:
    """The real nginx. CI machines get it from Debian (`apt-get install -y nginx`, also in make setup)."""
    found = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx"], env=env, capture_output=True,
                       timeout=600, check=False)
        found = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    if not found:
        pytest.skip("nginx is not installed and could not be installed with apt-get (needs root and Debian's "
                    "mirror): install the `nginx` package to run the real-nginx traffic switch tests")
    return str(found)


NGINX_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    include {prefix}/conf.d/*.conf;
{extra}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://grandmodel_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 1s;
            proxy_read_timeout 1s;
            proxy_next_upstream {next_upstream};
        }}
    }}
}}
"""


class NginxUnderTest:
    """A real nginx master on a free loopback port, in its own prefix, fronting the blue and green servers."""

    def __init__(self, binary: str, prefix: Path, blue: ColorServer, green: ColorServer) -> None:
        self.binary = binary
        self.prefix = prefix
        self.blue, self.green = blue, green
        self.port = free_port()
        self.conf = prefix / "nginx.conf"
        self.upstream_file = prefix / "conf.d" / "grandmodel_upstream.conf"
        self.pid_file = prefix / "nginx.pid"
        (prefix / "conf.d").mkdir(parents=True)
        (prefix / "tmp").mkdir()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/version"

    def backends(self, **override: list[str]) -> dict[str, list[str]]:
        addresses = {"blue": [f"127.0.0.1:{self.blue.port}"], "green": [f"127.0.0.1:{self.green.port}"]}
        addresses.update(override)
        return addresses

    def write_conf(self, extra: str = "", next_upstream: str = "off") -> None:
        """The main configuration; `next_upstream` is the site's proxy_next_upstream (the front door's
        is `error timeout http_502 http_503 non_idempotent`)."""
        self.conf.write_text(NGINX_CONF.format(prefix=self.prefix, port=self.port, extra=extra,
                                               next_upstream=next_upstream))

    def cmd(self, *args: str) -> list[str]:
        return [self.binary, "-p", str(self.prefix), "-c", str(self.conf), *args]

    def start(self, color: str = "blue") -> None:
        self.write_conf()
        self.upstream_file.write_text(render_upstream("grandmodel_backend", color, self.backends()[color], 8))
        subprocess.run(self.cmd(), check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 10
        while self.serving() != color:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start serving {color}: {self.log_tail()}")
            time.sleep(0.05)

    def serving(self) -> str | None:
        """The colour one fresh request through the front door gets once only the current configuration's
        worker runs (see settle), or None."""
        self.settle()
        return self.probe()

    def probe(self) -> str | None:
        """The colour one fresh request through the front door gets right now, or None: during a reload the
        old worker may still answer (what a client watching a switch must see)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(b"GET /version HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                raw = b""
                while chunk := sock.recv(65536):
                    raw += chunk
        except OSError:
            return None
        head, _sep, body = raw.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return None
        return str(json.loads(body).get("color"))

    def settle(self, timeout: float = 20) -> None:
        """Wait until only the current generation of workers runs. After a reload the master lets the old
        worker keep accepting for 100 ms or more (much more on a loaded machine) before it tells it to stop, so
        a fresh connection may still get the old configuration's colour: a test that asserts on answers waits
        for the old worker to leave first."""
        deadline = time.monotonic() + timeout
        while len(self.worker_pids()) > 1:
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx still runs workers {sorted(self.worker_pids())} {timeout} s after a "
                                     f"reload: {self.log_tail()}")
            time.sleep(0.02)

    def worker_pids(self) -> set[int]:
        """PIDs of the master's worker processes (worker_processes is 1: more than one means a reload is in
        progress); empty when no master runs."""
        pid = self.master_pid()
        if pid is None:
            return set()
        try:
            return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
        except OSError:
            return set()

    def log_tail(self) -> str:
        log = self.prefix / "error.log"
        return log.read_text()[-2000:] if log.exists() else ""

    def master_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        pid = self.master_pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        # The master has stopped once it is gone or a zombie: its parent (PID 1, the master daemonized) may take
        # a second or two to reap it, and waiting for that cost every test with this fixture about 2 s.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not exited(pid):
            time.sleep(0.02)


def exited(pid: int) -> bool:
    """Whether the process is gone or has exited and waits to be reaped (a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


@pytest.fixture
def nginx(nginx_binary: str, tmp_path: Path) -> Iterator[NginxUnderTest]:
    blue, green = ColorServer("blue").start(), ColorServer("green").start()
    # nginx workers run as an unprivileged user when the master is root: let them traverse the prefix.
    for path in (tmp_path, *tmp_path.parents):
        if str(path).startswith("/tmp/") and path != Path("/tmp"):
            path.chmod(path.stat().st_mode | 0o711)
    server = NginxUnderTest(nginx_binary, tmp_path / "nginx", blue, green)
    try:
        server.start("blue")
        yield server
    finally:
        server.stop()
        blue.stop()
        green.stop()


# -- running modules the way ansible-test units do -----------------------------------------------

@pytest.fixture
def ansible_module() -> AnsibleModule:
    """A real AnsibleModule (no options) whose run_command and atomic_move the module_utils use."""
    with patch_module_args({}):
        return AnsibleModule(argument_spec={}, supports_check_mode=True)


def run_module(main: Callable[[], None], args: dict[str, Any], capsys: pytest.CaptureFixture[str],
               check_mode: bool = False, diff: bool = False) -> dict[str, Any]:
    """Run a module's main() with ANSIBLE_MODULE_ARGS and return its JSON result (failed or not)."""
    full = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
    capsys.readouterr()
    with patch_module_args(full), pytest.raises(SystemExit):
        main()
    out = capsys.readouterr().out
    result: dict[str, Any] = json.loads(out)
    return result
