"""Removing a member from the Patroni and etcd clusters and adding it back (playbooks/pg_member_remove.yml,
playbooks/pg_member_add.yml) on the cluster test_ha.py leaves whole.

Runs after test_ha.py (file order) on the same hosts: the refusals first (no confirmation, the leader), then a
replica removed and added back under the steady write load of ha_writer.py, counting the acknowledged rows lost
and the longest gap between acknowledged writes. The cluster is whole again (three members, etcd of three)
when the module ends, for test_redis_sentinel.py and anything after it.
"""

from __future__ import annotations

import shlex
import time

from conftest import (
    DATA_DIR,
    ETCDCTL,
    MEMBERS,
    WriteLoad,
    cluster,
    leader,
    longest_gap,
    lost_rows,
    member,
    record,
    roles,
    run_playbook,
    sql,
    wait_for,
)

testinfra_hosts = ["podman://gm-mol-ha-1"]

TABLE = "CREATE TABLE IF NOT EXISTS ha_probe (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"


def streaming(view: dict) -> list[str]:
    return [m["name"] for m in view["members"]
            if m["role"] in ("replica", "sync_standby") and m["state"] in ("running", "streaming")
            and isinstance(m.get("lag"), int)]


def etcd_members(name: str) -> str:
    return str(member(name).check_output(f"{ETCDCTL} member list"))


def backends(name: str, of: str) -> int:
    """How many HAProxy backends (read-write and read-only) on `name` list the member `of`."""
    return int(member(name).run(f"grep -c '^ *server {of} ' /etc/haproxy/haproxy.cfg").stdout.strip() or 0)


def local(name: str, query: str) -> str:
    """A query to the member's own PostgreSQL (not through the endpoint), as the postgres login on the socket."""
    return str(member(name).check_output(f"runuser -u postgres -- psql -X -At -c {shlex.quote(query)}"))


def whole() -> dict | None:
    view = cluster()
    return view if leader(view) and len(streaming(view)) == 2 else None


def test_member_removal_is_refused_without_confirmation_and_for_the_leader() -> None:
    view = wait_for("a leader and two streaming replicas", whole, 60)
    now = leader(view)
    replica = next(n for n in MEMBERS if n != now)
    unconfirmed = run_playbook("pg_member_remove.yml", "-e", f"member={replica}")
    output = " ".join((unconfirmed.stdout + unconfirmed.stderr).split())
    assert unconfirmed.returncode != 0
    assert f"confirm with -e pg_member_remove_confirm={replica}" in output, output[-1500:]
    refused = run_playbook("pg_member_remove.yml", "-e", f"member={now}", "-e", f"pg_member_remove_confirm={now}")
    output = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode != 0
    assert f"{now} is the leader: move the leader away first" in output, output[-1500:]
    assert "pg_switchover.yml" in output
    after = cluster()
    assert leader(after) == now and sorted(m["name"] for m in after["members"]) == MEMBERS


def test_a_replica_removed_and_added_back_under_write_load_loses_no_acknowledged_commit() -> None:
    view = wait_for("a leader and two streaming replicas", whole, 60)
    now = leader(view)
    assert now
    current = roles(view)
    # A replica that is not the synchronous standby when there is one: the leader's commits never wait for it.
    victim = next((n for n, r in current.items() if r == "replica"),
                  next(n for n, r in current.items() if r != "leader"))
    # The client writes through the leader's HAProxy, which stays up while the victim leaves and returns.
    load = WriteLoad(now, "ha-writer-members")
    sql(now, TABLE)
    load.start(int(sql(now, "SELECT coalesce(max(id), 0) + 1000 FROM ha_probe")), seconds=400)
    try:
        wait_for("steady acknowledged writes", lambda: len(load.acknowledged()) >= 50, 30)
        started = time.monotonic()
        removed = run_playbook("pg_member_remove.yml", "-e", f"member={victim}",
                               "-e", f"pg_member_remove_confirm={victim}")
        remove_seconds = time.monotonic() - started
        assert removed.returncode == 0, removed.stdout[-3000:]
        after_remove = cluster(exclude=(victim,))
        assert leader(after_remove) == now
        assert victim not in [m["name"] for m in after_remove["members"]], after_remove
        assert streaming(after_remove), after_remove
        assert victim not in etcd_members(now)
        assert backends(now, victim) == 0
        # The data is moved aside, never deleted.
        assert member(victim).run(f"ls -d {DATA_DIR}.removed-*").rc == 0
        assert member(victim).run("systemctl is-active patroni").rc != 0
        removed_at = time.time()
        wait_for("writes acknowledged without the member",
                 lambda: any(t > removed_at for _, t in load.acknowledged()), 30)

        started = time.monotonic()
        added = run_playbook("pg_member_add.yml", "-e", f"member={victim}")
        assert added.returncode == 0, added.stdout[-3000:]
        wait_for(f"{victim} streaming again", lambda: victim in streaming(cluster()), 60)
        stream_seconds = time.monotonic() - started
        assert victim in etcd_members(now)
        assert all(backends(n, victim) == 2 for n in MEMBERS)
        assert local(victim, "SELECT pg_is_in_recovery()") == "t"
        added_at = time.time()
        wait_for("writes acknowledged with the member back",
                 lambda: any(t > added_at for _, t in load.acknowledged()), 30)
    finally:
        acked = load.stop()
    lost = lost_rows(now, acked)
    gap = longest_gap(acked)
    # The rows written while it was away reached the re-added member too.
    count = f"SELECT count(*) FROM ha_probe WHERE id BETWEEN {acked[0][0]} AND {acked[-1][0]}"
    copied = wait_for(f"every acknowledged row on {victim}",
                      lambda: (n := int(local(victim, count))) >= len(acked) and n, 30)
    record(member_removed=victim, member_remove_seconds=round(remove_seconds, 1),
           member_add_until_streaming_seconds=round(stream_seconds, 1), member_change_acknowledged=len(acked),
           member_change_lost=len(lost), member_change_longest_write_gap_seconds=round(gap, 2))
    assert not lost, f"acknowledged commits missing after removing and adding {victim}: {lost[:20]}"
    assert copied >= len(acked), copied
    assert gap < 10, f"{gap:.1f} s without an acknowledged write while a replica left and came back"
    assert wait_for("the whole cluster again", whole, 60)
