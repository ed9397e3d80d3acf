"""Release records in PostgreSQL monitoring.deployments, with the JSON-lines file as the record of truth.

records.yml runs the rollout role's record step on the db host exactly as every app host runs it at the end of a
release (the test gives the plan and outcome). The record must reach the table once, through the least-privilege
release-record login; with PostgreSQL stopped the release must go on within seconds with its record kept in the
file, and the next record must back-fill it; every webhook must get the event, and a dead receiver must not hold
the release back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SCENARIO = Path(__file__).resolve().parents[1]
EPHEMERAL = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent"))
DB_HOST = "gm-mol-data-db"
RECORD_FILE = "/var/lib/grandmodel-test/deployments.jsonl"
sys.path.insert(0, str(REPO / "scripts"))

from webhook_receiver import WebhookReceiver  # noqa: E402

RUN = str(int(time.time()))  # ids of this run: a converge kept from an earlier verify has older rows


def record(record_id: str, outcome: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [str(REPO / ".venv/bin/ansible-playbook"), "-i", os.environ["MOLECULE_INVENTORY_FILE"],
         str(SCENARIO / "records.yml"), "-e", f"record_id={record_id}", "-e", f"record_outcome={outcome}", *extra],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
    )
    return proc, time.monotonic() - started


def on_db(*argv: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
    return subprocess.run(["podman", "exec", *flags, DB_HOST, *argv], capture_output=True, text=True, check=check,
                          timeout=120)


def superuser(sql: str) -> str:
    return on_db("runuser", "-u", "postgres", "--", "psql", "-X", "-At", "-d", "grandmodel", "-c", sql).stdout.strip()


def rows(record_id: str) -> list[list[str]]:
    out = superuser("SELECT outcome, version, previous_version, colour, environment, initiated_by, "
                    "gate_evidence->>'host', gate_evidence->'evidence'->'pre_gate'->>'status' "
                    f"FROM monitoring.deployments WHERE gate_evidence->>'id' = '{record_id}'")
    return [line.split("|") for line in out.splitlines() if line]


def as_deployer(sql: str) -> subprocess.CompletedProcess[str]:
    password = (EPHEMERAL / "secrets" / "postgresql_deployer").read_text().split()[0]
    return on_db("psql", "-X", "-w", "-At", "-v", "ON_ERROR_STOP=1",
                 "host=127.0.0.1 user=grandmodel_deployer dbname=grandmodel sslmode=require", "-c", sql,
                 env={"PGPASSWORD": password}, check=False)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


def dead_url() -> str:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        port = closed.server_address[1]
    return f"http://127.0.0.1:{port}/hook"  # nothing listens there any more: connection refused


def test_a_record_reaches_the_table_once_and_every_webhook_hears_of_it(receiver: WebhookReceiver) -> None:
    hooks = json.dumps({"rollout_notify_webhooks": [dead_url(), receiver.url]})
    proc, _ = record(f"{RUN}-promoted", "success", "-e", hooks)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert rows(f"{RUN}-promoted") == [["promoted", "2026.11.1", "2026.11.0", "green", "molecule", "molecule",
                                        DB_HOST, "passed"]]
    # The dead receiver is named and the release went on; the live one got the outcome with the record.
    assert "did not take the release_success notification" in proc.stdout
    (event,) = receiver.bodies
    assert event["event"] == "release_success" and event["record"]["id"] == f"{RUN}-promoted", event
    assert event["environment"] == "molecule" and event["record"]["outcome"] == "success"
    # A second record offers the first one again (the back-fill window): it is not written twice.
    proc, _ = record(f"{RUN}-aborted", "aborted_pre_promotion")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert rows(f"{RUN}-aborted")[0][0] == "aborted"
    assert len(rows(f"{RUN}-promoted")) == 1


PG_PID = "head -1 /var/lib/postgresql/15/main/postmaster.pid"


class Locked:
    """Another session holds an ACCESS EXCLUSIVE lock on monitoring.deployments (a stuck migration, say)."""

    def __enter__(self) -> None:
        self.proc = subprocess.Popen(
            ["podman", "exec", DB_HOST, "runuser", "-u", "postgres", "--", "psql", "-X", "-d", "grandmodel", "-c",
             "BEGIN; LOCK TABLE monitoring.deployments IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(120);"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while "AccessExclusiveLock" not in superuser(
                "SELECT string_agg(mode, ',') FROM pg_locks WHERE relation = 'monitoring.deployments'::regclass"):
            assert time.monotonic() < deadline, "the lock was never taken"
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        superuser("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%LOCK TABLE%' "
                  "AND pid <> pg_backend_pid()")
        self.proc.wait(timeout=60)


class Stopped:
    """PostgreSQL stopped: the connection is refused."""

    def __enter__(self) -> None:
        on_db("systemctl", "stop", "postgresql@15-main")

    def __exit__(self, *exc: object) -> None:
        on_db("systemctl", "start", "postgresql@15-main")


class Hung:
    """The postmaster frozen (SIGSTOP): TCP connects, the server never answers."""

    def __enter__(self) -> None:
        on_db("sh", "-c", f"kill -STOP $({PG_PID})")

    def __exit__(self, *exc: object) -> None:
        on_db("sh", "-c", f"kill -CONT $({PG_PID})")


def test_a_database_stopped_hung_or_locked_keeps_the_record_in_the_file_and_it_is_back_filled() -> None:
    """Each fault costs at most the record's timeout (3 s to connect, 3 s for the statement) over the same play
    with the database up, measured just before; then the next record back-fills every record the faults kept."""
    proc, baseline = record(f"{RUN}-baseline", "success")
    assert proc.returncode == 0, proc.stdout[-3000:]
    figures: dict[str, float] = {"baseline_s": round(baseline, 1)}
    for name, fault in (("stopped", Stopped), ("hung", Hung), ("locked", Locked)):
        with fault():
            proc, seconds = record(f"{RUN}-db-{name}", "rolled_back_post_promotion")
        figures[f"{name}_s"] = round(seconds, 1)
        assert proc.returncode == 0, (name, proc.stdout[-3000:])
        assert f"deployment record {RUN}-db-{name} kept in {DB_HOST}:{RECORD_FILE} only" in proc.stdout, name
        # 6 s of timeouts at most, plus a margin for a loaded machine; an unbounded wait would hit 300 s.
        assert seconds - baseline < 6 + 15, (name, figures)
        assert rows(f"{RUN}-db-{name}") == [], name
    print("records with the database at fault:", figures)
    lines = [json.loads(line) for line in on_db("cat", RECORD_FILE).stdout.splitlines()]
    for name in ("stopped", "hung", "locked"):
        assert [r["outcome"] for r in lines if r["id"] == f"{RUN}-db-{name}"] == ["rolled_back_post_promotion"]
    proc, _ = record(f"{RUN}-after", "success")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert rows(f"{RUN}-after")[0][0] == "promoted"
    for name in ("stopped", "hung", "locked"):
        assert [r[0] for r in rows(f"{RUN}-db-{name}")] == ["rolled_back"], name


def test_the_release_record_login_may_only_add_and_read_records() -> None:
    assert as_deployer("SELECT count(*) > 0 FROM monitoring.deployments").stdout.strip() == "t"
    for sql in ("DELETE FROM monitoring.deployments", "UPDATE monitoring.deployments SET notes = 'x'",
                "SELECT count(*) FROM trading.trades", "CREATE TABLE monitoring.sneaky (id int)"):
        denied = as_deployer(sql)
        assert denied.returncode != 0 and "permission denied" in denied.stderr, (sql, denied.stdout, denied.stderr)
