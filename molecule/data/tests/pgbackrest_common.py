"""What the pgBackRest tests share (test_archive.py runs first, test_pgbackrest.py last): the names of the
scenario's hosts and stanza, and the helpers that read the database and the repository (the `repo_host` fixture
is in conftest.py)."""

from __future__ import annotations

DB = "grandmodel"
DB_HOST = "gm-mol-data-db"
STANZA = "grandmodel"
REPO_PATH = "/var/lib/pgbackrest"


def sql(host, query: str, db: str = DB) -> str:
    return host.check_output(f"runuser -u postgres -- psql -X -At -v ON_ERROR_STOP=1 -d {db} -c \"{query}\"")


def wait_archived(repo_host, segment: str, timeout_s: int = 60) -> float | None:
    """Poll on the repository host until the WAL segment is in the archive: its clock time then, or None."""
    pattern = f"{REPO_PATH}/archive/{STANZA}/15-*/{segment[:16]}/{segment}-*"
    found = repo_host.run(
        f"timeout {timeout_s} sh -c 'until ls {pattern} >/dev/null 2>&1; do sleep 0.05; done; date +%s.%N'")
    return float(found.stdout) if found.rc == 0 else None


def archiving_state(host, repo_host) -> str:
    """What to look at when a segment does not arrive: the archiver's counters and the last log lines."""
    return "\n".join([
        sql(host, "SELECT row_to_json(a)::text || ' insert ' || pg_current_wal_insert_lsn() FROM pg_stat_archiver a"),
        host.run("tail -n 15 /var/log/postgresql/postgresql-15-main.log").stdout,
        host.run("tail -n 15 /var/log/pgbackrest/grandmodel-archive-push.log").stdout,
        repo_host.run(f"ls {REPO_PATH}/archive/{STANZA}/15-*/0000000*/ | tail -n 4").stdout,
    ])
