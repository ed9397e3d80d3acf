"""Point-in-time recovery with pgBackRest on the real hosts: exact to a time between two writes, and never
harming the live data when refused or failing (issue 16, items 2, 4 and 6).

gm-mol-data-db is the database host; gm-mol-data-client is the repository host (group backup_repo).
Runs after test_data.py: the successful PITR at the end replaces the data directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pgbackrest_common import DB_HOST, STANZA, archiving_state, sql, wait_archived

testinfra_hosts = ["ansible://gm-mol-data-db"]

REPO = Path(__file__).resolve().parent.parent.parent.parent
PG_PATH = "/var/lib/postgresql/15/main"
PITR = REPO / "playbooks" / "pitr_restore.yml"


def pitr(**extra_vars: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(PITR), "-e", json.dumps(extra_vars)],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )


def flat(proc: subprocess.CompletedProcess[str]) -> str:
    return " ".join((proc.stdout + proc.stderr).split())


@pytest.fixture(scope="module")
def probe(host) -> dict[str, str]:
    """Rows A, a target time, rows B; B's commit archived so recovery can see past the target."""
    sql(host, "DROP TABLE IF EXISTS public.pitr_probe; CREATE TABLE public.pitr_probe (id int PRIMARY KEY, batch text)")
    sql(host, "INSERT INTO public.pitr_probe SELECT g, 'A' FROM generate_series(1, 5) g")
    time.sleep(1.5)
    target = sql(host, "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")
    trades_at_target = sql(host, "SELECT count(*) FROM trading.trades")
    time.sleep(1.5)
    sql(host, "INSERT INTO public.pitr_probe SELECT g, 'B' FROM generate_series(6, 8) g")
    return {"target": target, "trades": trades_at_target}


def live_state(host) -> tuple[str, str, str]:
    return (sql(host, "SELECT pg_postmaster_start_time()"),
            sql(host, "SELECT string_agg(id || batch, ',' ORDER BY id) FROM public.pitr_probe"),
            host.check_output(f"ls -d {PG_PATH}* | sort | tr '\\n' ' '"))


REFUSED: dict[str, tuple[dict[str, str], str]] = {
    "unconfirmed": ({"pitr_target_time": "TARGET"}, f"Not confirmed: the point-in-time restore of {DB_HOST}"),
    "confirmed-for-another-host": ({"pitr_target_time": "TARGET", "pitr_confirm": "yes"},
                                   f"pass -e pitr_confirm={DB_HOST} (got 'yes')"),
    "future": ({"pitr_confirm": DB_HOST, "pitr_target_time": "2099-01-01 00:00:00+00"}, "is in the future"),
    "before-the-oldest-backup": ({"pitr_confirm": DB_HOST, "pitr_target_time": "2001-01-01 00:00:00+00"},
                                 "is before the end of the oldest backup"),
    "not-a-time": ({"pitr_confirm": DB_HOST, "pitr_target_time": "yesterday"}, "give exactly one target"),
    "no-offset": ({"pitr_confirm": DB_HOST, "pitr_target_time": "2026-12-01 10:00:00"}, "give exactly one target"),
    "two-targets": ({"pitr_confirm": DB_HOST, "pitr_target_time": "TARGET", "pitr_target_name": "x"},
                    "give exactly one target"),
}


@pytest.fixture(scope="module")
def refused(host, probe) -> dict[str, subprocess.CompletedProcess[str]]:
    before = live_state(host)

    def run(case: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        extra = {k: v.replace("TARGET", probe["target"]) for k, v in REFUSED[case][0].items()}
        return case, pitr(**extra)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(pool.map(run, REFUSED))
    assert live_state(host) == before, "a refused restore changed the live server"
    return results


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_wrong_or_unconfirmed_pitr_is_refused_and_changes_nothing(refused, case):
    proc = refused[case]
    assert proc.returncode != 0, flat(proc)[-2000:]
    assert REFUSED[case][1] in flat(proc), flat(proc)[-2000:]
    assert "Nothing was changed" in flat(proc), flat(proc)[-2000:]


def test_a_pitr_that_fails_on_the_copy_leaves_the_live_server_alone(host, refused):
    # A fault in the middle: a restore point that does not exist passes every check, is restored into the new
    # directory, and fails there (recovery ends before the target): the live server never noticed.
    before = live_state(host)
    proc = pitr(pitr_confirm=DB_HOST, pitr_target_name="no-such-restore-point")
    assert proc.returncode != 0, flat(proc)[-2000:]
    assert "The live data directory was never touched" in flat(proc), flat(proc)[-3000:]
    assert "recovery ended before configured recovery target was reached" in flat(proc), flat(proc)[-3000:]
    assert live_state(host) == before


def test_a_pitr_from_a_damaged_repository_is_refused_and_changes_nothing(host, repo_host, probe, refused):
    # A few bytes of the oldest archived WAL file overwritten: pgbackrest verify reports "status: error" but exits 0,
    # so the restore must read what verify says, not only its exit code. The file is put back afterwards.
    path = repo_host.check_output("find /var/lib/pgbackrest/archive -type f -name '0000*-*' | sort | head -n 1").strip()
    assert path
    saved = "/root/damaged-repository-original"
    repo_host.check_output(f"cp -p {path} {saved}")
    before = live_state(host)
    try:
        repo_host.check_output(f"printf 'not the WAL that was archived' | dd of={path} bs=1 seek=64 conv=notrunc "
                               "status=none")
        proc = pitr(pitr_confirm=DB_HOST, pitr_target_time=probe["target"])
    finally:
        repo_host.check_output(f"cp -p {saved} {path} && rm -f {saved}")
    assert proc.returncode != 0, flat(proc)[-2000:]
    assert "pgbackrest verify of repository 1 on gm-mol-data-client found a problem" in flat(proc), flat(proc)[-3000:]
    # The overwritten bytes no longer decompress: pgBackRest's own error is named, not its whole log.
    told = flat(proc).split("found a problem")[-1]
    assert "ERROR: [029]: lz4 error" in told and "verify command begin" not in told, told[:2000]
    assert "Nothing was changed" in flat(proc), flat(proc)[-3000:]
    assert live_state(host) == before


def test_pitr_to_a_time_between_two_writes_gives_exactly_the_rows_before_it(host, repo_host, probe, refused):
    # B's commit must be in the repository for recovery to know the target was passed.
    segment = sql(host, "SELECT pg_walfile_name(pg_switch_wal())")
    assert wait_archived(repo_host, segment, timeout_s=30), archiving_state(host, repo_host)
    started = time.monotonic()
    proc = pitr(pitr_confirm=DB_HOST, pitr_target_time=probe["target"])
    took = time.monotonic() - started
    assert proc.returncode == 0, flat(proc)[-4000:]
    rows = sql(host, "SELECT string_agg(id || batch, ',' ORDER BY id) FROM public.pitr_probe")
    print(f"\nFIGURE PITR to {probe['target']}: rows {rows} (A 1-5 before, B 6-8 after), playbook {took:.0f} s")
    assert rows == "1A,2A,3A,4A,5A"
    assert sql(host, "SELECT count(*) FROM trading.trades") == probe["trades"]
    # Promoted onto a new timeline, writable, and archiving again from it.
    assert sql(host, "SELECT pg_is_in_recovery()") == "f"
    assert not sql(host, "SELECT pg_walfile_name(pg_current_wal_lsn())").startswith("00000001")
    sql(host, "INSERT INTO public.pitr_probe VALUES (9, 'C')")
    assert repo_host.run(f"runuser -u pgbackrest -- pgbackrest --stanza={STANZA} check").rc == 0
    # The data directory it replaced is kept aside, complete.
    aside = host.check_output(f"ls -d {PG_PATH}.before-pitr-*").split()
    assert len(aside) == 1 and host.file(f"{aside[0]}/PG_VERSION").is_file
    assert host.run(f"ls -d {PG_PATH}.pitr-* 2>/dev/null").stdout.strip() == ""


def backups_per_repo(repo_host) -> dict[int, int]:
    info = json.loads(repo_host.check_output(
        f"runuser -u pgbackrest -- pgbackrest --stanza={STANZA} --output=json info"))
    counts: dict[int, int] = {}
    for backup in info[0]["backup"]:
        counts[backup["database"]["repo-key"]] = counts.get(backup["database"]["repo-key"], 0) + 1
    return counts


def test_the_object_store_repository_takes_backups_and_wal_and_restores_without_the_repository_host(
        host, repo_host, refused):
    # The second repository (repo2, pgbackrest_s3_*) is an S3 object store (moto behind nginx's TLS on the
    # controller, scripts/s3_emulator.py). The converge took a first full backup into each repository; the
    # backup unit the timers start backs up into both and verifies both.
    counts = backups_per_repo(repo_host)
    assert set(counts) == {1, 2}, counts
    started = time.monotonic()
    repo_host.check_output("systemctl start pgbackrest-backup@diff.service")
    backup_s = time.monotonic() - started
    after = backups_per_repo(repo_host)
    assert after == {1: counts[1] + 1, 2: counts[2] + 1}, (counts, after)
    journal = repo_host.check_output("journalctl -u pgbackrest-backup@diff.service -n 200 --no-pager")
    assert "--repo=2" in journal and "verify command end: completed successfully" in journal, journal[-2000:]

    # Rows E, a target time, rows F; F's segment in the object store.
    sql(host, "INSERT INTO public.pitr_probe SELECT g, 'E' FROM generate_series(10, 12) g")
    time.sleep(1.2)
    target = sql(host, "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")
    time.sleep(1.2)
    sql(host, "INSERT INTO public.pitr_probe SELECT g, 'F' FROM generate_series(13, 15) g")
    segment = sql(host, "SELECT pg_walfile_name(pg_switch_wal())")
    fetch = f"runuser -u postgres -- pgbackrest --stanza={STANZA} --repo=2 archive-get {segment} /tmp/s3-probe-wal"
    deadline = time.monotonic() + 60
    while host.run(fetch).rc != 0:
        assert time.monotonic() < deadline, archiving_state(host, repo_host)
        time.sleep(1)
    host.run("rm -f /tmp/s3-probe-wal")

    # The repository host is lost (its pgBackRest TLS server stopped: nothing reaches repo1): the restore reads
    # the object store, verify included, and recovery fetches WAL from it.
    repo_host.check_output("systemctl stop pgbackrest-server")
    try:
        refused_repo = pitr(pitr_confirm=DB_HOST, pitr_target_time=target, pitr_repo="3")
        started = time.monotonic()
        proc = pitr(pitr_confirm=DB_HOST, pitr_target_time=target, pitr_repo="2")
        took = time.monotonic() - started
    finally:
        repo_host.check_output("systemctl start pgbackrest-server")
    assert refused_repo.returncode != 0 and "pgbackrest_restore_repo must be 1" in flat(refused_repo), \
        flat(refused_repo)[-2000:]
    assert proc.returncode == 0, flat(proc)[-4000:]
    rows = sql(host, "SELECT string_agg(id || batch, ',' ORDER BY id) FROM public.pitr_probe")
    print(f"\nFIGURE PITR from the object store (repository host down) to {target}: rows {rows}, playbook "
          f"{took:.0f} s; a differential backup into both repositories with both verified {backup_s:.0f} s")
    assert rows == "1A,2A,3A,4A,5A,9C,10E,11E,12E", rows
    assert sql(host, "SELECT pg_is_in_recovery()") == "f"
    # With the repository host back, archiving reaches both repositories again.
    assert repo_host.run(f"runuser -u pgbackrest -- pgbackrest --stanza={STANZA} check").rc == 0
