"""Helpers of the HA scenario's tests: the members, Patroni's view of the cluster, SQL through the endpoint,
and the write-load client whose log of acknowledged commits the failover tests count against."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import testinfra

REPO = Path(__file__).resolve().parents[3]
EPHEMERAL = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent"))
SECRETS = EPHEMERAL / "secrets"
FIGURES = EPHEMERAL / "ha-figures.json"
MEMBERS = ["gm-mol-ha-1", "gm-mol-ha-2", "gm-mol-ha-3"]
DATA_DIR = "/var/lib/postgresql/15/grandmodel"
WRITER = Path(__file__).with_name("ha_writer.py")
# TLS of etcd and Patroni's REST API (etcd_tls, patroni_tls): the internal CA and each member's certificates.
PKI = "/etc/grandmodel/pki"
ETCDCTL = (f"ETCDCTL_API=3 etcdctl --cacert={PKI}/ca.crt --cert={PKI}/etcd.crt --key={PKI}/etcd.key "
           "--endpoints=https://127.0.0.1:2379")


def secret(name: str) -> str:
    return (SECRETS / name).read_text().split()[0]


def member(name: str) -> Any:
    """The member as the scenario reaches it: SSH with one persistent connection (testinfra's SSH backend for an
    `ssh` connection in the inventory), about 0.05 s a command, where `podman exec` costs 0.4 s and more."""
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"])


@functools.cache
def address(name: str) -> str:
    """The member's address (asked once: the containers keep theirs for the whole scenario)."""
    return str(member(name).check_output("hostname -I").split()[0])


def cluster(exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Patroni's /cluster as the first member that answers sees it (members in `exclude` are not asked)."""
    errors = []
    for name in MEMBERS:
        if name in exclude:
            continue
        url = f"https://{address(name)}:8008/cluster"
        run = member(name).run(
            "python3 -c " + shlex.quote(
                "import ssl, urllib.request; "
                f"context = ssl.create_default_context(cafile='{PKI}/ca.crt'); "
                f"print(urllib.request.urlopen({url!r}, timeout=3, context=context).read().decode())"))
        if run.rc == 0:
            return dict(json.loads(run.stdout))
        errors.append(f"{name}: {run.stderr[-300:]}")
    raise AssertionError(f"no member answered /cluster: {errors}")


def roles(view: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["role"] for m in view["members"]}


def leader(view: dict[str, Any]) -> str | None:
    return next((m["name"] for m in view["members"] if m["role"] == "leader" and m["state"] == "running"), None)


def sql(name: str, query: str, port: int = 5000, database: str = "postgres") -> str:
    """A query through the endpoint (HAProxy on `name`), as the superuser over TCP (scram-sha-256)."""
    return str(member(name).check_output(
        f"PGPASSWORD={shlex.quote(secret('patroni_superuser'))} psql -X -At -h 127.0.0.1 -p {port} "
        f"-U postgres -d {database} -v ON_ERROR_STOP=1 -c {shlex.quote(query)}"))


def wait_for(what: str, check: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError as error:
            last = error
        if last and not isinstance(last, AssertionError):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last})")


def record(**figures: Any) -> None:
    """Keep a figure for the report (the scenario's ephemeral dir) and show it in the test output."""
    known = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    known.update(figures)
    FIGURES.write_text(json.dumps(known, indent=2))
    print(f"HA figures: {figures}")


@dataclass
class WriteLoad:
    """ha_writer.py running on one member as a transient systemd unit."""

    host: str
    unit: str

    @property
    def log(self) -> str:
        return f"/root/{self.unit}.log"

    @property
    def stop_file(self) -> str:
        return f"/root/{self.unit}.stop"

    def start(self, first_id: int, seconds: int = 120) -> None:
        subprocess.run(["podman", "cp", str(WRITER), f"{self.host}:/root/ha_writer.py"], check=True)
        member(self.host).check_output(
            f"rm -f {self.log} {self.stop_file}; systemd-run --unit={self.unit} "
            f"--setenv=PGPASSWORD={shlex.quote(secret('patroni_superuser'))} "
            f"python3 /root/ha_writer.py --log {self.log} --stop-file {self.stop_file} --seconds {seconds} "
            f"--first-id {first_id}")

    def acknowledged(self) -> list[tuple[int, float]]:
        out = member(self.host).run(f"cat {self.log}").stdout
        return [(int(i), float(t)) for i, t in (line.split() for line in out.splitlines() if line.strip())]

    def stop(self) -> list[tuple[int, float]]:
        host = member(self.host)
        host.check_output(f"touch {self.stop_file}")
        wait_for(f"{self.unit} to stop", lambda: host.run(f"systemctl is-active {self.unit}").rc != 0, 20)
        return self.acknowledged()


def longest_gap(acked: list[tuple[int, float]]) -> float:
    times = [t for _, t in acked]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def lost_rows(name: str, acked: list[tuple[int, float]]) -> list[int]:
    if not acked:
        return []
    low, high = acked[0][0], acked[-1][0]
    present = {int(i) for i in sql(name, f"SELECT id FROM ha_probe WHERE id BETWEEN {low} AND {high}").split()}
    return [i for i, _ in acked if i not in present]


REPO_HOST = "gm-mol-ha-repo"


@contextlib.contextmanager
def damaged_repository() -> Iterator[str]:
    """The oldest archived WAL file in the pgBackRest repository replaced by the next one's content (a well-formed
    file with the wrong data, as a bad copy or a careless hand would leave it: pgBackRest 2.45's verify reports
    "status: error" for it and still exits 0), put back as it was afterwards. Yields the damaged file's path."""
    repo = member(REPO_HOST)
    first, second = repo.check_output(
        "find /var/lib/pgbackrest/archive -type f -name '0000*-*' | sort | head -n 2").split()
    saved = "/root/damaged-repository-original"
    repo.check_output(f"cp -p {shlex.quote(first)} {saved}")
    try:
        repo.check_output(f"cp {shlex.quote(second)} {shlex.quote(first)}")
        yield first
    finally:
        repo.check_output(f"cp -p {saved} {shlex.quote(first)} && rm -f {saved}")


def run_playbook(playbook: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / ".venv/bin/ansible-playbook"), "-i", os.environ["MOLECULE_INVENTORY_FILE"],
         str(REPO / "playbooks" / playbook), *extra],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO)
