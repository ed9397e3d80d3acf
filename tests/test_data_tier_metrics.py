"""The data tier's two metrics programs, on real outputs captured from the ha scenario's hosts: Patroni 3.0.2's
/metrics page of a replica (tests/data/patroni-3.0.2-replica-metrics.txt, which Prometheus refuses whole:
"strconv.ParseFloat: parsing "None"") and pgBackRest 2.45's `info --output=json` (tests/data). The ha scenario
runs both against the live cluster (molecule/ha/tests/test_monitoring_ha.py)."""

from __future__ import annotations

import copy
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import COLLECTION

DATA = Path(__file__).with_name("data")
PATRONI_BRIDGE = COLLECTION / "roles/patroni/templates/grandmodel-patroni-metrics.j2"
PGBACKREST_METRICS = COLLECTION / "roles/pgbackrest/templates/grandmodel-pgbackrest-metrics.j2"


def program(template: Path, tmp_path: Path) -> Path:
    """The template as the role installs it (its only Jinja is the ansible_managed comment)."""
    text = template.read_text()
    jinja = text.count("{{") + text.count("{%") + text.count("{#")
    assert jinja == 1, f"{template.name} has Jinja besides ansible_managed: the role would render it differently"
    path = tmp_path / template.stem
    path.write_text(text.replace("{{ ansible_managed | comment }}", "# Ansible managed"))
    return path


def module(template: Path, tmp_path: Path) -> types.ModuleType:
    loaded = types.ModuleType(template.stem.replace("-", "_"))
    exec(compile(program(template, tmp_path).read_text(), str(template), "exec"), loaded.__dict__)
    return loaded


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def samples(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = value
    return out


def test_the_patroni_page_keeps_every_number_and_drops_what_prometheus_refuses(tmp_path: Path) -> None:
    bridge = module(PATRONI_BRIDGE, tmp_path)
    page = (DATA / "patroni-3.0.2-replica-metrics.txt").read_text()
    assert 'patroni_postgres_timeline{scope="grandmodel"} None' in page
    cleaned, dropped = bridge.clean(page)
    assert dropped == 1
    got = samples(cleaned)
    assert "None" not in cleaned
    assert got['patroni_postgres_server_version{scope="grandmodel"}'] == "150018"
    assert got["grandmodel_patroni_metrics_dropped_samples"] == "1"
    mended = page.replace("patroni_postgres_server_version {", "patroni_postgres_server_version{")
    kept = {k: v for k, v in samples(mended).items() if v != "None"}
    assert {k: got[k] for k in kept} == kept
    # Every sample line now has the shape Prometheus' parser takes: name, optional labels, one number.
    for line in cleaned.splitlines():
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
            assert bridge.SAMPLE.match(line) and " {" not in line


@pytest.fixture
def patroni_stand_in() -> Iterator[tuple[str, list[int]]]:
    """An HTTP server answering with the captured page (the live Patroni is proven in the ha scenario); its
    status code can be changed by the test."""
    page = (DATA / "patroni-3.0.2-replica-metrics.txt").read_bytes()
    status = [200]

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status[0])
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", status
    finally:
        server.shutdown()


def test_the_bridge_serves_the_cleaned_page_and_503_when_patroni_does_not_answer(
        tmp_path: Path, patroni_stand_in: tuple[str, list[int]]) -> None:
    url, status = patroni_stand_in
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(program(PATRONI_BRIDGE, tmp_path)), f"--listen=127.0.0.1:{port}",
                             f"--patroni-url={url}"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "the bridge did not start"
                time.sleep(0.1)
        assert "None" not in body and 'patroni_primary{scope="grandmodel"} 0' in body
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=3)
        assert missing.value.code == 404
        status[0] = 500
        with pytest.raises(urllib.error.HTTPError) as down:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3)
        assert down.value.code == 503 and "did not answer" in down.value.read().decode()
        assert proc.poll() is None, "the bridge died on an upstream error"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_pgbackrest_info_becomes_the_newest_good_backup_per_repository_and_type(tmp_path: Path) -> None:
    metrics = module(PGBACKREST_METRICS, tmp_path)
    info = json.loads((DATA / "pgbackrest-2.45-info.json").read_text())
    full = info[0]["backup"][0]
    assert full["type"] == "full" and info[0]["repo"][0]["key"] == 1
    # A newer differential in repository 1, a newer full one with a checksum error (never the newest good one)
    # and a second repository holding only an older full backup.
    diff = copy.deepcopy(full) | {"type": "diff", "label": full["label"] + "_D"}
    diff["timestamp"] = {"start": full["timestamp"]["stop"] + 100, "stop": full["timestamp"]["stop"] + 160}
    broken = copy.deepcopy(full) | {"error": True, "label": full["label"] + "X"}
    broken["timestamp"] = {"start": full["timestamp"]["stop"] + 500, "stop": full["timestamp"]["stop"] + 900}
    other = copy.deepcopy(full)
    other["database"]["repo-key"] = 2
    other["timestamp"] = {"start": 1000, "stop": 1500}
    info[0]["backup"] += [diff, broken, other]
    info[0]["repo"].append({"cipher": "none", "key": 2, "status": {"code": 3, "message": "missing stanza data"}})
    got = samples(metrics.render(info, True, 1_800_000_000.5))
    stop = full["timestamp"]["stop"]
    last = "grandmodel_pgbackrest_backup_last_completed_timestamp_seconds"
    assert got["grandmodel_pgbackrest_info_success"] == "1"
    assert got["grandmodel_pgbackrest_collected_timestamp_seconds"] == "1800000000"
    assert got[last + '{repo="1",stanza="grandmodel",type="full"}'] == str(stop)
    assert got[last + '{repo="1",stanza="grandmodel",type="diff"}'] == str(stop + 160)
    assert got['grandmodel_pgbackrest_backup_last_duration_seconds{repo="1",stanza="grandmodel",type="diff"}'] == "60"
    assert got[last + '{repo="2",stanza="grandmodel",type="full"}'] == "1500"
    assert got['grandmodel_pgbackrest_backups{repo="1",stanza="grandmodel"}'] == "3"
    assert got['grandmodel_pgbackrest_repo_status_code{repo="2",stanza="grandmodel"}'] == "3"
    assert got['grandmodel_pgbackrest_stanza_status_code{stanza="grandmodel"}'] == "0"
    assert got['grandmodel_pgbackrest_backup_last_repository_size_bytes{repo="1",stanza="grandmodel",type="full"}'] \
        == str(full["info"]["repository"]["delta"])


def test_a_failing_pgbackrest_info_is_written_as_a_failure_not_left_stale(tmp_path: Path) -> None:
    fake = tmp_path / "pgbackrest"
    fake.write_text("#!/bin/sh\necho 'ERROR: [041]: unable to open file' >&2\nexit 41\n")
    fake.chmod(0o755)
    out = tmp_path / "textfile" / "grandmodel-pgbackrest.prom"
    out.parent.mkdir()
    run = subprocess.run([sys.executable, str(program(PGBACKREST_METRICS, tmp_path)), f"--output={out}",
                          f"--pgbackrest={fake}"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "exit 41" in run.stderr and "unable to open file" in run.stderr
    got = samples(out.read_text())
    assert got["grandmodel_pgbackrest_info_success"] == "0"
    assert not any(k.startswith("grandmodel_pgbackrest_backup") for k in got)
    assert oct(out.stat().st_mode & 0o777) == "0o644" and not list(out.parent.glob("*.tmp"))
