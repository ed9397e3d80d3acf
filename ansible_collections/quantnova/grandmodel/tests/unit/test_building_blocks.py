"""The Ansible building blocks under the modules: open_url's Request, module.run_command, module.atomic_move.

Each promise the hand-written code kept is tried against the real thing: files keep their owner, group and
mode; a hung command is killed at command_timeout; probes skip proxies, ~/.netrc and cookies, send the headers
given, and verify TLS unless told not to.
"""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from ansible.module_utils.basic import AnsibleModule
from conftest import LoopbackServer, free_port

from ansible_collections.quantnova.grandmodel.plugins.module_utils.http_client import HttpClient, HttpProbeError
from ansible_collections.quantnova.grandmodel.plugins.module_utils.traffic import (
    NginxBackend,
    StateFile,
    TrafficSwitchError,
    atomic_write,
)

NOBODY = 65534


# -- module.atomic_move ---------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_replaced_file_keeps_its_owner_group_and_mode(tmp_path: Path, ansible_module: AnsibleModule) -> None:
    path = tmp_path / "upstream.conf"
    path.write_text("old\n")
    os.chown(path, NOBODY, NOBODY)
    path.chmod(0o640)
    atomic_write(ansible_module, str(path), "new\n")
    info = path.stat()
    assert path.read_text() == "new\n"
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (NOBODY, NOBODY, 0o640)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upstream.conf"]  # no temporary file left


@pytest.mark.parametrize("existing_mode", [None, 0o600, 0o666])
def test_a_mode_given_is_the_mode_the_file_ends_with_whatever_the_umask(
        tmp_path: Path, ansible_module: AnsibleModule, existing_mode: int | None) -> None:
    path = tmp_path / ".upstream.conf.state.json"
    if existing_mode is not None:
        path.write_text("{}")
        path.chmod(existing_mode)
    old_umask = os.umask(0o077)  # atomic_move gives a new file 0666 & ~umask: 0600 here
    try:
        record = StateFile(str(path), ansible_module).write("green", "blue")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert record["active"] == "green" and '"previous": "blue"' in path.read_text()


def test_a_new_file_without_a_mode_gets_0644(tmp_path: Path, ansible_module: AnsibleModule) -> None:
    path = tmp_path / "new.conf"
    old_umask = os.umask(0o077)
    try:
        atomic_write(ansible_module, str(path), "x\n")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_replacement_that_cannot_happen_says_why_and_leaves_nothing(
        tmp_path: Path, ansible_module: AnsibleModule) -> None:
    target = tmp_path / "upstream.conf"
    target.mkdir()  # a directory where the file should be: the rename is refused
    (target / "keep").write_text("data")
    with pytest.raises(TrafficSwitchError, match=r"cannot write .*upstream.conf: Is a directory"):
        atomic_write(ansible_module, str(target), "new\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upstream.conf"]
    assert (target / "keep").read_text() == "data"


def test_without_an_ansible_module_nothing_is_written_or_run(tmp_path: Path) -> None:
    backend = NginxBackend(str(tmp_path / "up.conf"), backends={"blue": ["127.0.0.1:1"]})
    assert backend.read_state().active is None  # reading and planning need no module
    with pytest.raises(TrafficSwitchError, match=r"cannot write .*state.json: no AnsibleModule was given"):
        backend.state.write("blue", None)
    with pytest.raises(TrafficSwitchError, match=r"nginx reload failed: cannot run nginx: no AnsibleModule"):
        backend._run(backend.reload_cmd(), "nginx reload")
    assert list(tmp_path.iterdir()) == []


# -- module.run_command ---------------------------------------------------------------------------------

def test_a_hung_command_is_killed_at_command_timeout(tmp_path: Path, ansible_module: AnsibleModule) -> None:
    pid_file = tmp_path / "pid"
    backend = NginxBackend(str(tmp_path / "up.conf"), module=ansible_module, command_timeout=0.5,
                           reload_command=["/bin/sh", "-c", f"echo $$ > {pid_file}; exec sleep 30"])
    started = time.monotonic()
    with pytest.raises(TrafficSwitchError, match=r"nginx reload failed: /bin/sh -c .* did not finish within 0.5s"):
        backend._run(backend.reload_cmd(), "nginx reload")
    assert time.monotonic() - started < 5
    assert not Path(f"/proc/{pid_file.read_text().strip()}").exists()  # killed and reaped


@pytest.mark.parametrize(("make", "reason"), [
    (lambda d: str(d / "missing-nginx"), "No such file or directory"),
    (lambda d: (d / "not-executable").write_text("#!/bin/sh\n") and str(d / "not-executable"), "Permission denied"),
])
def test_a_command_that_cannot_start_says_which_and_why(
        tmp_path: Path, ansible_module: AnsibleModule, make: Any, reason: str) -> None:
    binary = make(tmp_path)
    backend = NginxBackend(str(tmp_path / "up.conf"), module=ansible_module, nginx_binary=binary)
    with pytest.raises(TrafficSwitchError, match=rf"nginx test failed: cannot run {binary}: {reason}"):
        backend._run(backend.test_command(), "nginx test")


def test_a_failing_command_reports_exit_code_and_output_as_given(
        tmp_path: Path, ansible_module: AnsibleModule) -> None:
    # Arguments reach the command literally: no ~ or $VAR expansion (run_command would expand them by default),
    # and output that is not UTF-8 (here byte 0xff) is reported with a replacement character, not a crash.
    backend = NginxBackend(str(tmp_path / "up.conf"), module=ansible_module,
                           reload_command=["/bin/sh", "-c", 'printf "%s \\377\\n" "$1" >&2; exit 3', "sh", "$HOME/~x"])
    with pytest.raises(TrafficSwitchError) as info:
        backend._run(backend.reload_cmd(), "nginx reload")
    assert "nginx reload failed: `/bin/sh -c" in str(info.value) and "exited 3: $HOME/~x \ufffd" in str(info.value)
    assert info.value.result["rc"] == 3 and info.value.result["command"][-1] == "$HOME/~x"


# -- open_url's Request -----------------------------------------------------------------------------------

def echo(handler: BaseHTTPRequestHandler, _body: bytes) -> tuple[int, Any]:
    return 200, {"headers": {k.lower(): v for k, v in handler.headers.items()}}


@pytest.fixture
def echo_server(loopback_server: LoopbackServer) -> LoopbackServer:
    loopback_server.routes[("GET", "/echo")] = echo
    loopback_server.routes[("GET", "/fail")] = lambda h, _b: (503, {"ready": False})
    return loopback_server


def test_probes_send_their_headers_and_skip_proxy_and_netrc(
        echo_server: LoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = free_port()
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{dead}")  # a proxy that would refuse every request
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("no_proxy", "")
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login probe password not-for-probes\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    headers = HttpClient(timeout=2, headers={"Authorization": "Bearer t0"}).get(echo_server.url + "/echo").json()
    assert headers["headers"]["authorization"] == "Bearer t0"
    headers = HttpClient(timeout=2).get(echo_server.url + "/echo").json()["headers"]
    assert "authorization" not in headers  # the ~/.netrc entry for 127.0.0.1 is not used
    assert headers["user-agent"] == "quantnova.grandmodel" and headers["accept"] == "application/json"
    # The inference service counts a gate's own requests apart from client traffic (model_service/tests/test_probes.py).
    assert headers["x-grandmodel-probe"] == "quantnova.grandmodel"
    assert headers["accept-encoding"] == "identity"  # as urllib sent it: no gzip to decode


def test_an_error_status_is_an_answer_and_a_refusal_or_hang_an_error(echo_server: LoopbackServer) -> None:
    client = HttpClient(timeout=0.5)
    answer = client.get(echo_server.url + "/fail")
    assert (answer.status, answer.ok, answer.json()) == (503, False, {"ready": False})
    with pytest.raises(HttpProbeError, match=r"GET http://127.0.0.1:\d+/x failed: connection refused"):
        client.get(f"http://127.0.0.1:{free_port()}/x")
    echo_server.delay = 1.5
    with pytest.raises(HttpProbeError, match=r"GET .*/echo (timed out after 0.5s|failed: timed out)"):
        client.get(echo_server.url + "/echo")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A self-signed https server on loopback that answers {"color": "blue"}."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)

    class Blue(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "17")
            self.end_headers()
            self.wfile.write(b'{"color": "blue"}')

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Blue)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/version"
    server.shutdown()
    server.server_close()


def test_tls_is_verified_unless_told_not_to(tls_server: str) -> None:
    with pytest.raises(HttpProbeError, match=r"GET https://127.0.0.1:\d+/version failed: .*certificate verify failed"):
        HttpClient(timeout=2).get(tls_server)
    client = HttpClient(timeout=2, validate_certs=False)
    assert client.get(tls_server).json() == {"color": "blue"}
    context = client._tls_context
    assert client.get(tls_server).json() == {"color": "blue"}
    assert client._tls_context is context  # one TLS context per client, not one per request
