"""Daily health's backup checks and post-market's backups on the data hosts (playbooks/runbooks/).

The scenario's db host has the pg_dump and RDB timers and pgBackRest with its repository on the client host. The
daily health check must see each backup and its age, and name each one a tighter limit makes too old; post-market
must take a new backup of each kind and read each one back, and name a backup that could not be taken (its folder
made unwritable for the run), losing nothing: the older backups are all still there afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
EPHEMERAL = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent"))
OUT = EPHEMERAL / "market-data"
DB_HOST = "gm-mol-data-db"
PG_DIR = "/var/backups/grandmodel/postgresql"
RDB_DIR = "/var/backups/grandmodel/redis"


def runbook(name: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    reports = OUT / "reports"
    before = set(reports.glob(f"{name}-*"))
    proc = subprocess.run(
        [str(REPO / ".venv/bin/ansible-playbook"), "-i", os.environ["MOLECULE_INVENTORY_FILE"],
         str(REPO / "playbooks" / "runbooks" / f"{name}.yml"), "-e", f"runbook_reports_dir={reports}", *extra],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )
    new = sorted(set(reports.glob(f"{name}-*")) - before)
    assert new, f"{name} wrote no report: {' '.join((proc.stdout + proc.stderr).split())[-3000:]}"
    return proc, json.loads((new[-1] / "report.json").read_text())


def on_db(*argv: str) -> str:
    return subprocess.run(["podman", "exec", DB_HOST, *argv], capture_output=True, text=True, check=True,
                          timeout=120).stdout


def files(directory: str) -> set[str]:
    return set(on_db("find", directory, "-maxdepth", "1", "-type", "f", "-name", "*.*").split())


def test_daily_health_sees_every_backup_and_names_the_old_ones() -> None:
    # What the backup timers run, once (the test must not depend on an earlier test having taken backups).
    on_db("systemctl", "start", "grandmodel-postgresql-backup.service", "grandmodel-redis-backup.service")
    proc, report = runbook("daily_health")
    assert proc.returncode == 0, report["problems"]
    host = report["hosts"][DB_HOST]
    assert host["backups"]["postgresql"]["newest"] in files(PG_DIR)
    assert host["backups"]["redis"]["newest"] in files(RDB_DIR)
    assert 0 <= host["backups"]["postgresql"]["age_hours"] < 26
    pgbackrest = host["pgbackrest"]
    assert pgbackrest["check_ok"] is True and pgbackrest["status"] == "ok" and pgbackrest["newest"], pgbackrest
    assert on_db("runuser", "-u", "postgres", "--", "pgbackrest", "--stanza=grandmodel", "info").count(
        pgbackrest["newest"]) == 1
    # A limit tighter than any backup's age: each kind is named, nothing else.
    proc, report = runbook("daily_health", "-e", "daily_health_backup_max_age_hours=0.0001")
    assert proc.returncode != 0
    aged = [p for p in report["problems"] if " h old (limit " in p]
    assert len(aged) == 3 and all(p.startswith(DB_HOST) for p in aged), report["problems"]
    assert {kind for kind in ("postgresql", "redis", "pgBackRest") for p in aged if f"newest {kind} backup" in p} \
        == {"postgresql", "redis", "pgBackRest"}


def test_post_market_takes_each_backup_and_reads_it_back() -> None:
    pg_before, rdb_before = files(PG_DIR), files(RDB_DIR)
    proc, report = runbook("post_market")
    assert proc.returncode == 0, report["problems"]
    pg, rdb = report["backups"][f"{DB_HOST} postgresql"], report["backups"][f"{DB_HOST} redis"]
    assert pg["readable"] is True and int(pg["tables"]) > 0 and pg["path"] in files(PG_DIR) - pg_before, pg
    assert rdb["readable"] is True and rdb["path"] in files(RDB_DIR) - rdb_before, rdb
    assert pg_before <= files(PG_DIR) and rdb_before <= files(RDB_DIR)


def test_post_market_names_a_backup_that_could_not_be_taken_and_loses_nothing() -> None:
    pg_before = files(PG_DIR)
    mode = on_db("stat", "-c", "%a", PG_DIR).strip()
    on_db("chmod", "0500", PG_DIR)
    try:
        proc, report = runbook("post_market")
    finally:
        on_db("chmod", mode, PG_DIR)
    assert proc.returncode != 0
    assert [p for p in report["problems"] if p.startswith(f"{DB_HOST} postgresql: no backup taken")], report
    # The failed backup neither ends the run nor keeps the snapshot of the same host from being taken.
    assert report["backups"][f"{DB_HOST} redis"]["readable"] is True, report
    assert not [p for p in report["problems"] if "redis" in p], report["problems"]
    assert files(PG_DIR) == pg_before


def test_a_password_set_in_sql_never_lands_in_the_query_statistics() -> None:
    """pg_stat_statements keeps statement texts for pg_read_all_stats members (the exporter's role): the role turns
    utility tracking off, so CREATE/ALTER ROLE ... PASSWORD is not kept (it was, before: the app role's own)."""
    marker = "leakprobe" + os.urandom(6).hex()
    sql = f"CREATE ROLE probe_{marker} LOGIN PASSWORD '{marker}'; DROP ROLE probe_{marker};"
    on_db("runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-d", "grandmodel", "-c", sql)
    assert on_db("runuser", "-u", "postgres", "--", "psql", "-X", "-At", "-d", "grandmodel", "-c",
                 "SHOW pg_stat_statements.track_utility").strip() == "off"
    kept = on_db("runuser", "-u", "postgres", "--", "psql", "-X", "-At", "-d", "grandmodel", "-c",
                 f"SELECT count(*) FROM pg_stat_statements WHERE query LIKE '%{marker}%'")
    assert kept.strip() == "0"
