"""WAL archiving and backups of the Patroni cluster to the pgBackRest repository on gm-mol-ha-repo.

Named to run after test_ha.py and test_ha_members.py: by then the failover test has killed the leader and the
switchover test has moved it again, so the member that leads now is not the one that took the first full backup
(on timeline 1). The tests here switch WAL on today's leader and prove the segment reaches the repository.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from conftest import MEMBERS, REPO_HOST, cluster, leader, member, wait_for

STANZA = "grandmodel"


def info() -> dict[str, Any]:
    out = member(REPO_HOST).check_output(f"runuser -u pgbackrest -- pgbackrest --stanza={STANZA} --output=json info")
    return dict(json.loads(out)[0])


def local_sql(name: str, query: str) -> str:
    """A query on the member's own PostgreSQL over its socket (peer login as postgres)."""
    return str(member(name).check_output(
        f"runuser -u postgres -- psql -X -At -v ON_ERROR_STOP=1 -c {shlex.quote(query)}"))


def archiver(name: str) -> dict[str, str]:
    row = local_sql(name, "SELECT archived_count, coalesce(last_archived_wal, ''), failed_count, "
                          "coalesce(extract(epoch FROM last_failed_time)::bigint::text, ''), "
                          "coalesce(last_failed_wal, '') FROM pg_stat_archiver")
    keys = ("archived_count", "last_archived_wal", "failed_count", "last_failed_epoch", "last_failed_wal")
    return dict(zip(keys, row.split("|"), strict=True))


def switch_and_fetch(name: str) -> str:
    """Write on the leader, switch its WAL segment and wait until archive-get of that segment succeeds."""
    local_sql(name, "CREATE TABLE IF NOT EXISTS pgbackrest_probe (at timestamptz DEFAULT now()); "
                    "INSERT INTO pgbackrest_probe DEFAULT VALUES")
    segment = local_sql(name, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    local_sql(name, "SELECT pg_switch_wal()")
    wait_in_repository(name, segment, timeout=60)
    return segment


def wait_in_repository(name: str, segment: str, timeout: float) -> None:
    """Wait until `pgbackrest archive-get` of the WAL segment succeeds on the member (it is in the repository)."""
    host = member(name)

    def fetched() -> bool:
        return bool(host.run(f"runuser -u postgres -- pgbackrest --stanza={STANZA} archive-get {segment} "
                             f"/tmp/pgbackrest-probe-{segment}").rc == 0)

    wait_for(f"{segment} of {name} in the repository", fetched, timeout=timeout, interval=1)
    host.run(f"rm -f /tmp/pgbackrest-probe-{segment}")


def test_the_repository_holds_a_full_backup_archived_wal_and_runs_its_timers() -> None:
    state = info()
    assert state["status"]["code"] == 0, state["status"]
    assert any(b["type"] == "full" for b in state["backup"]), state["backup"]
    assert state["archive"] and state["archive"][0]["min"] and state["archive"][0]["max"], state["archive"]
    repo = member(REPO_HOST)
    for unit in ("pgbackrest-backup-full.timer", "pgbackrest-backup-diff.timer", "pgbackrest-server.service"):
        assert repo.service(unit).is_enabled, unit
    now = leader(cluster())
    for name in MEMBERS:
        assert member(name).service("pgbackrest-server.service").is_running, name
        assert local_sql(name, "SHOW archive_mode") == "on", name
        assert local_sql(name, "SHOW archive_command") == f"pgbackrest --stanza={STANZA} archive-push %p", name
        if name != now:
            # Patroni writes postgresql.recovery_conf from the DCS into the replica's configuration.
            expected = f'pgbackrest --stanza={STANZA} archive-get %f "%p"'
            assert local_sql(name, "SHOW restore_command") == expected, name


def test_the_leader_after_failover_and_switchover_archives_and_the_repository_checks() -> None:
    now = leader(cluster())
    assert now, "no leader"
    first_backup_wal = info()["backup"][0]["archive"]["start"]
    segment = switch_and_fetch(now)
    # The first backup's WAL is on timeline 1; the failover and the switchover before this test each began a
    # new timeline, so the segment just fetched was archived by a member that became leader afterwards.
    assert first_backup_wal.startswith("00000001"), first_backup_wal
    assert int(segment[:8], 16) > 1, (now, segment)
    assert archiver(now)["last_archived_wal"] >= segment, archiver(now)
    check = member(REPO_HOST).run(f"runuser -u pgbackrest -- pgbackrest --stanza={STANZA} check")
    assert check.rc == 0, check.stdout[-800:] + check.stderr[-800:]


def test_replicas_do_not_archive_and_no_member_failed_since_the_repository_exists() -> None:
    now = leader(cluster())
    assert now
    replicas = [n for n in MEMBERS if n != now]
    before = {n: archiver(n)["archived_count"] for n in replicas}
    switch_and_fetch(now)
    after = {n: archiver(n)["archived_count"] for n in replicas}
    assert before == after, (before, after)
    # Archiving is on from the cluster's bootstrap, and the repository's stanza is made a little later in the
    # same run: attempts in that window fail (counted in failed_count until a crash or a stats reset). None may
    # fail once the first backup has started.
    since = int(info()["backup"][0]["timestamp"]["start"])
    for name in MEMBERS:
        state = archiver(name)
        assert state["failed_count"] == "0" or int(state["last_failed_epoch"]) < since, (name, state, since)
