"""Point-in-time recovery of the whole Patroni cluster (playbooks/pg_pitr_restore.yml) from gm-mol-ha-repo.

Named to run after test_pgbackrest_ha.py: by then the failover and the switchover have moved the cluster to a
third timeline while its only full backup is on the first, so the recovery replays WAL across two timeline
switches. The restore is attacked three ways: refused input (nothing may change), a target the archive does not
hold (the copy fails, the running cluster may not notice), and a real restore under a write load whose client
counts every acknowledged commit: the rows acknowledged after the target and before the swap must be gone,
every row acknowledged after the swap must stay.
"""

from __future__ import annotations

import concurrent.futures
import re
import shlex
import time
from typing import Any

import pytest
from conftest import (
    DATA_DIR,
    MEMBERS,
    REPO_HOST,
    WriteLoad,
    cluster,
    damaged_repository,
    leader,
    longest_gap,
    lost_rows,
    member,
    record,
    run_playbook,
    sql,
    wait_for,
)
from test_pgbackrest_ha import STANZA, info, local_sql, wait_in_repository

PLAYBOOK = "pg_pitr_restore.yml"
LOCK = "/var/lib/pgbackrest/grandmodel-pitr-grandmodel.lock"


def flat(proc: Any) -> str:
    return " ".join((proc.stdout + proc.stderr).split())


def start_times() -> dict[str, str]:
    return {name: local_sql(name, "SELECT pg_postmaster_start_time()") for name in MEMBERS}


def leftovers() -> dict[str, str]:
    """Copies (.pitr-*) and kept directories (.before-pitr-*) next to each member's data directory."""
    return {name: member(name).run(f"ls -d {DATA_DIR}.*pitr* 2>/dev/null").stdout.strip() for name in MEMBERS}


def now_sql(name: str) -> str:
    return local_sql(name, "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")


def restore_under_load(now: str, unit: str, *extra: str) -> tuple[str, float, list[int], list[int], float]:
    """The playbook, confirmed, with `extra`, while a client on another member commits through its own HAProxy.
    Returns the playbook's output and seconds, the ids the client had acknowledged before the longest gap between
    two commits (the swap) and after it, and that gap."""
    client = next(n for n in MEMBERS if n != now)
    load = WriteLoad(client, f"{unit}-{int(time.time())}")
    load.start(first_id=int(sql(now, "SELECT coalesce(max(id), 0) + 1000 FROM ha_probe")), seconds=240)
    try:
        wait_for("the client's first commits", lambda: len(load.acknowledged()) > 20, timeout=30)
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(run_playbook, PLAYBOOK, "-e", "pitr_confirm=grandmodel", *extra)
            # A second restore started while this one holds the lock is refused and changes nothing.
            wait_for("the restore's lock", lambda: member(REPO_HOST).run(f"test -s {LOCK}/owner").rc == 0, timeout=60)
            second = run_playbook(PLAYBOOK, "-e", "pitr_confirm=grandmodel", *extra)
            proc = running.result()
        took = time.monotonic() - started
        assert proc.returncode == 0, flat(proc)[-4000:]
        assert second.returncode != 0 and "says another restore holds it" in flat(second), flat(second)[-3000:]
        assert "Nothing was changed" in flat(second), flat(second)[-3000:]
        assert member(REPO_HOST).run(f"test -e {LOCK}").rc != 0, "the restore's lock was not released"
        wait_for("commits after the swap", lambda: load.acknowledged()[-1][1] > time.time() - 2, timeout=30)
    finally:
        acked = load.stop()
    gap = longest_gap(acked)
    cut = next(i for i in range(1, len(acked)) if acked[i][1] - acked[i - 1][1] == gap)
    return flat(proc), took, [i for i, _ in acked[:cut]], [i for i, _ in acked[cut:]], gap


@pytest.fixture(scope="module")
def before() -> dict[str, Any]:
    view = cluster()
    now = leader(view)
    assert now, view
    return {"leader": now, "started": start_times(), "leftovers": leftovers()}


REFUSED = {
    # A host's name is not the cluster's: the confirmation names what is replaced.
    "confirmed-with-a-host": (["-e", "pitr_confirm=gm-mol-ha-1", "-e", "pitr_target_time='TARGET'"],
                              "pass -e pitr_confirm=grandmodel (got 'gm-mol-ha-1')"),
    "future": (["-e", "pitr_confirm=grandmodel", "-e", "pitr_target_time='2099-01-01 00:00:00+00'"],
               "is in the future"),
    "not-a-member": (["-e", "pitr_confirm=grandmodel", "-e", "pitr_member=gm-mol-ha-repo",
                      "-e", "pitr_target_name=x"], "'gm-mol-ha-repo' is not a member of 'db_ha'"),
    "no-offset": (["-e", "pitr_confirm=grandmodel", "-e", "pitr_target_time='2026-12-01 10:00:00'"],
                  "give exactly one target"),
    "rollback-and-a-target": (["-e", "pitr_confirm=grandmodel", "-e", "pitr_rollback=20261201T000000Z",
                               "-e", "pitr_target_name=x"], "pitr_rollback takes the stamp of a completed cluster"),
    "rollback-of-no-restore": (["-e", "pitr_confirm=grandmodel", "-e", "pitr_rollback=20261201T000000Z"],
                               "exactly one must be a primary shut down cleanly"),
}
# What the restore test leaves for the rollback test: the restore's stamp and the client's commits around it.
RESTORED: dict[str, Any] = {}


def test_a_wrong_or_unconfirmed_cluster_restore_is_refused_and_changes_nothing(before: dict[str, Any]) -> None:
    target = now_sql(before["leader"])
    for case, (extra, message) in REFUSED.items():
        proc = run_playbook(PLAYBOOK, *(e.replace("TARGET", target) for e in extra))
        assert proc.returncode != 0, (case, flat(proc)[-2000:])
        assert message in flat(proc), (case, flat(proc)[-3000:])
        assert "Nothing was changed" in flat(proc), (case, flat(proc)[-3000:])
    # --check runs every check and says what it would do; nothing changes.
    proc = run_playbook(PLAYBOOK, "--check", "-e", f"pitr_target_time='{target}'")
    assert proc.returncode == 0, flat(proc)[-3000:]
    assert f"Check mode: the point-in-time restore of the cluster grandmodel to {target} passed its checks" in \
        flat(proc), flat(proc)[-3000:]
    assert "Nothing was changed; to run it, pass -e pitr_confirm=grandmodel" in flat(proc), flat(proc)[-3000:]
    # A damaged repository: pgbackrest verify reports "status: error" (and exits 0, which is not trusted).
    with damaged_repository() as damaged:
        proc = run_playbook(PLAYBOOK, "-e", "pitr_confirm=grandmodel", "-e", f"pitr_target_time='{target}'")
    assert proc.returncode != 0, flat(proc)[-2000:]
    assert "pgbackrest verify on gm-mol-ha-repo found a problem" in flat(proc), (damaged, flat(proc)[-3000:])
    assert "Nothing was changed" in flat(proc), flat(proc)[-3000:]
    # The lock an interrupted restore left in its swap: refused, the message quotes it and points to the steps.
    repo = member(REPO_HOST)
    repo.check_output(f"mkdir {LOCK} && printf 'stamp: 20261201T000000Z\\nstage: swap\\n' > {LOCK}/owner")
    try:
        proc = run_playbook(PLAYBOOK, "-e", "pitr_confirm=grandmodel", "-e", f"pitr_target_time='{target}'")
    finally:
        repo.check_output(f"rm -r {LOCK}")
    assert proc.returncode != 0, flat(proc)[-2000:]
    assert "says another restore holds it (stamp: 20261201T000000Z; stage: swap)" in flat(proc), flat(proc)[-3000:]
    assert "A cluster restore interrupted during the swap" in flat(proc), flat(proc)[-3000:]
    assert "Nothing was changed" in flat(proc), flat(proc)[-3000:]
    assert leader(cluster()) == before["leader"]
    assert start_times() == before["started"]
    assert leftovers() == before["leftovers"]


def test_a_cluster_restore_that_fails_on_the_copy_leaves_the_cluster_running(before: dict[str, Any]) -> None:
    # Confirmed and well-formed, but no such restore point exists: pgBackRest restores the copy, recovery runs to
    # the end of the archive without reaching the target and the copy stops. The members never noticed.
    proc = run_playbook(PLAYBOOK, "-e", "pitr_confirm=grandmodel", "-e", "pitr_target_name=no-such-restore-point")
    out = flat(proc)
    assert proc.returncode != 0, out[-2000:]
    assert "recovery ended before configured recovery target was reached" in out, out[-3000:]
    assert "The running cluster was never touched; the restored copy was removed" in out, out[-3000:]
    assert leader(cluster()) == before["leader"]
    assert start_times() == before["started"]
    assert leftovers() == before["leftovers"]


def test_a_swap_that_fails_puts_every_member_back_and_loses_no_acknowledged_commit(before: dict[str, Any]) -> None:
    # The restoring member is a replica whose Patroni cannot start (its unit masked): the copy is proven, every
    # member stops, the DCS keys go, the directories are swapped, and then the restored member never leads. The
    # old cluster must come back on its own data, the former leader first, with every commit a client had
    # acknowledged before the failure.
    now: str = before["leader"]
    assert leader(cluster()) == now
    victim, client = [n for n in MEMBERS if n != now]
    load = WriteLoad(client, f"pitr-fail-load-{int(time.time())}")
    load.start(first_id=int(sql(now, "SELECT coalesce(max(id), 0) + 1000 FROM ha_probe")), seconds=240)
    wait_for("the client's first commits", lambda: len(load.acknowledged()) > 20, timeout=30)
    target = now_sql(now)
    member(victim).check_output("systemctl mask patroni")
    try:
        proc = run_playbook(PLAYBOOK, "-e", "pitr_confirm=grandmodel", "-e", f"pitr_member={victim}",
                            "-e", f"pitr_target_time='{target}'")
    finally:
        member(victim).check_output("systemctl unmask patroni")
        if member(victim).run("systemctl is-active patroni").rc != 0:
            member(victim).check_output("systemctl start patroni")
    out = flat(proc)
    assert proc.returncode != 0, out[-3000:]
    assert "failed at 'Start Patroni on the restoring member'" in out, out[-3000:]
    assert f"{now} leads again on its own data" in out, out[-3000:]
    assert f"could not be started on {victim}" in out, out[-3000:]

    def whole() -> bool:
        view = cluster()
        streaming = [m for m in view["members"] if m["role"] in ("replica", "sync_standby")
                     and m["state"] in ("running", "streaming") and isinstance(m.get("lag"), int)]
        return leader(view) == now and len(streaming) == 2

    wait_for("the old cluster whole again", whole, timeout=120, interval=2)
    wait_for("commits after the failed swap", lambda: load.acknowledged()[-1][1] > time.time() - 2, timeout=30)
    acked = load.stop()
    lost = lost_rows(now, acked)
    assert not lost, lost[:20]
    assert leftovers() == before["leftovers"]
    gap = longest_gap(acked)
    record(pitr_failed_swap_client_gap_s=round(gap, 2), pitr_failed_swap_acknowledged=len(acked),
           pitr_failed_swap_lost=len(lost))
    print(f"\nFIGURE failed cluster PITR swap (restoring member {victim} cannot start Patroni): {now} leads again, "
          f"{len(acked)} acknowledged commits, {len(lost)} lost, client gap {gap:.1f} s")


def test_pitr_of_the_cluster_gives_exactly_the_rows_before_the_target_and_keeps_every_later_commit(
        before: dict[str, Any]) -> None:
    now = before["leader"]
    timeline_before = int(local_sql(now, "SELECT timeline_id FROM pg_control_checkpoint()"))
    sql(now, "DROP TABLE IF EXISTS pitr_probe; CREATE TABLE pitr_probe (id int PRIMARY KEY, batch text)")
    sql(now, "INSERT INTO pitr_probe SELECT g, 'A' FROM generate_series(1, 5) g")
    time.sleep(1.2)
    target = now_sql(now)
    time.sleep(1.2)
    sql(now, "INSERT INTO pitr_probe SELECT g, 'B' FROM generate_series(6, 8) g")
    # The archiving RPO: seconds from B's commit until its WAL segment is in the repository, without a switch
    # (archive_timeout forces one: 20 s in this scenario, patroni_archive_timeout 60 s by default).
    timeout = int(local_sql(now, "SELECT setting FROM pg_settings WHERE name = 'archive_timeout'"))
    assert 0 < timeout <= 60, timeout
    committed = time.monotonic()
    wait_in_repository(now, local_sql(now, "SELECT pg_walfile_name(pg_current_wal_lsn())"), timeout=timeout + 30)
    rpo = time.monotonic() - committed
    assert rpo < timeout + 15, (rpo, timeout)

    # A client on another member, through its HAProxy, commits during the whole restore: its rows are all after the
    # target. Those acknowledged before the swap must be gone afterwards, those acknowledged after it must stay.
    out, took, before_swap, after_swap, gap = restore_under_load(now, "pitr-load", "-e", f"pitr_target_time='{target}'")
    down = re.search(r"The cluster was down for ([0-9.]+) s", out)
    assert down, out[-3000:]

    rows = sql(now, "SELECT string_agg(id || batch, ',' ORDER BY id) FROM pitr_probe")
    assert rows == "1A,2A,3A,4A,5A", rows
    view = cluster()
    assert leader(view) == now, view
    replicas = [m for m in view["members"] if m["name"] != now]
    assert all(m["state"] in ("running", "streaming") and isinstance(m.get("lag"), int) for m in replicas), view
    assert any(m["role"] == "sync_standby" for m in replicas), view
    timeline_after = int(local_sql(now, "SELECT timeline_id FROM pg_control_checkpoint()"))
    assert timeline_after > timeline_before, (timeline_before, timeline_after)
    for name in MEMBERS:
        # Every member holds exactly the restored rows, and reaches the leader through its own endpoint.
        assert local_sql(name, "SELECT string_agg(id || batch, ',' ORDER BY id) FROM pitr_probe") == rows, name
        assert sql(name, "SELECT pg_is_in_recovery()") == "f", name
        kept = sorted(set(leftovers()[name].split()) - set(before["leftovers"][name].split()))
        assert len(kept) == 1 and ".before-pitr-" in kept[0], (name, kept)
        assert member(name).run(f"test -s {shlex.quote(kept[0])}/PG_VERSION").rc == 0, (name, kept)

    # The client's own log against the table, split at the swap.
    ids = ",".join(str(i) for i in before_swap + after_swap)
    present = {int(i) for i in sql(now, f"SELECT id FROM ha_probe WHERE id IN ({ids})").split()}
    lost_after = [i for i in after_swap if i not in present]
    kept_before = [i for i in before_swap if i in present]
    assert not lost_after, lost_after[:20]
    assert not kept_before, kept_before[:20]
    assert len(after_swap) > 10, after_swap[-5:]
    # The restored cluster archives on its new timeline: a switch on the leader reaches the repository.
    check = member(REPO_HOST).run(f"runuser -u pgbackrest -- pgbackrest --stanza={STANZA} check")
    assert check.rc == 0, check.stdout[-800:] + check.stderr[-800:]
    assert info()["status"]["code"] == 0
    stamp = re.search(r"kept in \S+[.]before-pitr-([0-9]{8}T[0-9]{6}Z)", out)
    assert stamp, out[-2000:]
    RESTORED.update(stamp=stamp.group(1), before_swap=before_swap, after_swap=after_swap, timeline=timeline_after)
    record(pitr_playbook_s=round(took, 1), pitr_down_s=float(down.group(1)), pitr_client_gap_s=round(gap, 2),
           pitr_rows=rows, pitr_archive_rpo_s=round(rpo, 1), pitr_archive_timeout_s=timeout,
           pitr_timelines=[timeline_before, timeline_after],
           pitr_client_commits_discarded=len(before_swap), pitr_client_commits_kept=len(after_swap))
    print(f"\nFIGURE cluster PITR to {target} (timeline {timeline_before} -> {timeline_after}): rows {rows} "
          f"(A 1-5 before, B 6-8 after); archive RPO {rpo:.1f} s (archive_timeout {timeout} s); "
          f"playbook {took:.0f} s, down {down.group(1)} s, "
          f"client gap {gap:.2f} s; client commits {len(before_swap)} after the target discarded, "
          f"{len(after_swap)} after the swap kept (0 lost)")


def test_rolling_back_the_cluster_restore_brings_back_every_commit_it_discarded(before: dict[str, Any]) -> None:
    # Undo the restore above: the former leader's kept directory (every commit up to that swap, rows B and the
    # client's commits after the target among them) comes back through a copy, under a new write load.
    assert RESTORED, "the restore test did not complete"
    now: str = before["leader"]
    assert leader(cluster()) == now
    _, took, during, after, gap = restore_under_load(now, "pitr-back-load", "-e", f"pitr_rollback={RESTORED['stamp']}")

    assert sql(now, "SELECT string_agg(id || batch, ',' ORDER BY id) FROM pitr_probe") == "1A,2A,3A,4A,5A,6B,7B,8B"
    view = cluster()
    assert leader(view) == now, view
    assert any(m["role"] == "sync_standby" for m in view["members"]), view
    timeline = int(local_sql(now, "SELECT timeline_id FROM pg_control_checkpoint()"))
    assert timeline > RESTORED["timeline"], (RESTORED["timeline"], timeline)
    ids = ",".join(str(i) for i in RESTORED["before_swap"] + RESTORED["after_swap"] + during + after)
    present = {int(i) for i in sql(now, f"SELECT id FROM ha_probe WHERE id IN ({ids})").split()}
    # Back: every commit the restore had discarded. Gone: what was written on the restored data (kept aside).
    assert [i for i in RESTORED["before_swap"] if i not in present] == []
    assert [i for i in RESTORED["after_swap"] if i in present] == []
    assert [i for i in during if i in present] == []
    assert [i for i in after if i not in present] == []
    for name in MEMBERS:
        assert local_sql(name, "SELECT count(*) FROM pitr_probe") == "8", name
    check = member(REPO_HOST).run(f"runuser -u pgbackrest -- pgbackrest --stanza={STANZA} check")
    assert check.rc == 0, check.stdout[-800:] + check.stderr[-800:]
    record(pitr_rollback_playbook_s=round(took, 1), pitr_rollback_client_gap_s=round(gap, 2),
           pitr_rollback_commits_back=len(RESTORED["before_swap"]), pitr_rollback_timeline=timeline)
    print(f"\nFIGURE cluster PITR rolled back ({RESTORED['stamp']}): rows B and {len(RESTORED['before_swap'])} "
          f"discarded commits back, {len(RESTORED['after_swap'])} written on the restored data gone; playbook "
          f"{took:.0f} s, client gap {gap:.2f} s, timeline {RESTORED['timeline']} -> {timeline}")


def test_an_emptied_repository_group_is_refused_and_archiving_stops_only_when_asked() -> None:
    # Last in the file: stopping archiving leaves a hole in the repository's WAL (no later test recovers through it).
    # A run whose repository group is empty must not leave the cluster's archive_command pushing to a repository
    # nobody manages (every push fails and pg_wal grows until the disk is full), and must not stop the backups
    # unasked either: it refuses; with patroni_archive_stop it stops archiving (no restart), and a run with the
    # repository back turns it on again and says that a new full backup is needed.
    now = leader(cluster())
    assert now
    pushing = f"pgbackrest --stanza={STANZA} archive-push %p"

    def archive_commands() -> set[str]:
        return {local_sql(name, "SHOW archive_command") for name in MEMBERS}

    assert archive_commands() == {pushing}
    emptied = ("--tags", "patroni_service", "-e", "patroni_pgbackrest_repo_group=gm_no_repository")
    refused = run_playbook("data_ha.yml", *emptied)
    said = flat(refused)
    assert refused.returncode != 0, said[-2000:]
    assert "'gm_no_repository' has no host now" in said and "Nothing was changed" in said, said[-2000:]
    assert archive_commands() == {pushing}

    stopped = run_playbook("data_ha.yml", *emptied, "-e", "patroni_archive_stop=true")
    said = flat(stopped)
    assert stopped.returncode == 0, said[-2000:]
    assert "WAL archiving of grandmodel is stopped" in said, said[-2000:]
    wait_for("/bin/true as every member's archive_command", lambda: archive_commands() == {"/bin/true"}, timeout=30)
    assert local_sql(now, "SELECT pending_restart FROM pg_settings WHERE name = 'archive_command'") == "f"
    # A switched segment now counts as archived at once (recycled, not kept in pg_wal), and nothing fails.
    failed = local_sql(now, "SELECT failed_count FROM pg_stat_archiver")
    local_sql(now, "DROP TABLE IF EXISTS archive_stop_probe; CREATE TABLE archive_stop_probe (id int)")
    switched = local_sql(now, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    local_sql(now, "SELECT pg_switch_wal()")
    wait_for("the switched segment archived by /bin/true",
             lambda: local_sql(now, "SELECT last_archived_wal FROM pg_stat_archiver") >= switched, timeout=30)
    assert local_sql(now, "SELECT failed_count FROM pg_stat_archiver") == failed
    again = run_playbook("data_ha.yml", *emptied, "-e", "patroni_archive_stop=true")
    assert again.returncode == 0 and re.search(r"changed=[1-9]", again.stdout) is None, flat(again)[-2000:]

    resumed = run_playbook("data_ha.yml", "--tags", "patroni_service")
    said = flat(resumed)
    assert resumed.returncode == 0, said[-2000:]
    assert "WAL archiving of grandmodel resumes" in said and "pgbackrest-backup@full.service" in said, said[-2000:]
    wait_for("archive-push as every member's archive_command again", lambda: archive_commands() == {pushing},
             timeout=30)
    check = member(REPO_HOST).run(f"runuser -u pgbackrest -- pgbackrest --stanza={STANZA} check")
    assert check.rc == 0, check.stdout[-800:] + check.stderr[-800:]
