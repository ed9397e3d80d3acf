"""pgBackRest on the real hosts, right after the converge: backups and WAL off the database host and the
RPO of continuous archiving (issue 16, items 2 and 6).

gm-mol-data-db is the database host; gm-mol-data-client is the repository host (group backup_repo).
Named to run before test_data.py, on the server as the converge left it; test_pgbackrest.py (point-in-time
recovery, which replaces the data directory) runs last.
"""

from __future__ import annotations

import json

from pgbackrest_common import DB_HOST, REPO_PATH, STANZA, archiving_state, sql, wait_archived

testinfra_hosts = ["ansible://gm-mol-data-db"]

ARCHIVE_TIMEOUT_S = 5  # postgresql_archive_timeout in molecule.yml


def info(host, user: str) -> dict[str, object]:
    out = host.check_output(f"runuser -u {user} -- pgbackrest --stanza={STANZA} --output=json info")
    return json.loads(out)[0]


def test_backup_is_on_the_repository_host_not_the_database_host(host, repo_host):
    state = info(repo_host, "pgbackrest")
    assert state["status"]["code"] == 0, state["status"]
    # Of the repository host's repository (repo1); the object store's (repo2) is test_pgbackrest.py's.
    full = [b for b in state["backup"] if b["type"] == "full" and b["database"]["repo-key"] == 1]
    assert full, state["backup"]
    label = full[-1]["label"]
    # The files are on the repository host...
    assert repo_host.file(f"{REPO_PATH}/backup/{STANZA}/{label}/backup.manifest").is_file
    assert repo_host.file(f"{REPO_PATH}/backup/{STANZA}/{label}/pg_data").is_directory
    # ...and not on the database host, which reads the same catalogue over TLS.
    assert host.run(f"ls {REPO_PATH}/backup 2>/dev/null").stdout.strip() == ""
    # A scheduled backup (the differential timer fires at 01:30 on weekdays) may land between the two reads:
    # the database host must see this full backup, not necessarily as the newest entry.
    assert label in [b["label"] for b in info(host, "postgres")["backup"]]
    b = full[-1]
    print(f"\nFIGURE backup {label}: database {b['info']['size']} B, repository {b['info']['repository']['delta']} B, "
          f"took {b['timestamp']['stop'] - b['timestamp']['start']} s")


def test_backup_timers_and_tls_servers_run(host, repo_host):
    for unit in ("pgbackrest-backup-full.timer", "pgbackrest-backup-diff.timer", "pgbackrest-server.service"):
        assert repo_host.service(unit).is_enabled and repo_host.service(unit).is_running, unit
    assert host.service("pgbackrest-server.service").is_running
    conf = repo_host.file("/etc/pgbackrest/pgbackrest.conf")
    assert conf.mode == 0o640 and conf.group == "pgbackrest"
    assert "repo1-retention-full=2" in conf.content_string
    assert f"tls-server-auth={DB_HOST}={STANZA}" in conf.content_string
    assert repo_host.file("/etc/grandmodel/pki/pgbackrest.key").mode == 0o600


def test_a_certificate_the_server_does_not_allow_is_refused(host):
    # The database host's TLS server accepts the repository host's CN only: the database host's own valid
    # certificate (same CA, another CN) asking it for the repository gets nothing.
    proc = host.run(f"runuser -u postgres -- pgbackrest --stanza={STANZA} --repo1-host=localhost info")
    assert "access denied" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_wal_is_archived_continuously_with_a_short_rpo(host, repo_host):
    sql(host, "CREATE TABLE IF NOT EXISTS public.rpo_probe (id serial PRIMARY KEY)")
    # A forced switch after a write: the segment is in the repository at once.
    sql(host, "INSERT INTO public.rpo_probe DEFAULT VALUES")
    segment = sql(host, "SELECT pg_walfile_name(pg_switch_wal())")
    assert wait_archived(repo_host, segment, timeout_s=30), archiving_state(host, repo_host)
    # A commit and nothing else: archive_timeout alone must bring its segment to the other host.
    rpo = []
    for _ in range(2):
        out = sql(host, "WITH i AS (INSERT INTO public.rpo_probe DEFAULT VALUES RETURNING id) "
                        "SELECT extract(epoch FROM clock_timestamp()) || ' ' "
                        "|| pg_walfile_name(pg_current_wal_insert_lsn()) FROM i")
        committed, segment = out.split()[0], out.split()[-1]
        arrived = wait_archived(repo_host, segment, timeout_s=ARCHIVE_TIMEOUT_S + 25)
        assert arrived, f"{segment} not archived: " + archiving_state(host, repo_host)
        rpo.append(arrived - float(committed))
    print(f"\nFIGURE RPO (commit -> its WAL segment in the repository, archive_timeout {ARCHIVE_TIMEOUT_S} s): "
          + ", ".join(f"{r:.1f} s" for r in rpo))
    assert max(rpo) < ARCHIVE_TIMEOUT_S + 10, rpo
