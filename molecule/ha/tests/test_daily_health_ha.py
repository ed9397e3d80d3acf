"""The daily health runbook (playbooks/runbooks/daily_health.yml) on the HA members: replication as Patroni and
Redis themselves report it, never the playbook's word alone.

Runs before test_ha.py and test_redis_sentinel.py (file order) and leaves the cluster as it found it:
1. the healthy cluster: the run passes with no problem; its report lists three Patroni members (one leader, one
   synchronous standby, every member running or streaming) and one Redis master with two linked replicas,
   exactly what Patroni's /cluster and each Redis's INFO say, and three Sentinels naming that master with a
   failover quorum, exactly what each Sentinel says;
2. three faults at once: Patroni stopped on a replica (its PostgreSQL stops too), a live Redis replica whose
   link to the master is broken (a wrong masterauth, so the process answers while replication is down) and the
   Sentinel stopped on the master's host. The run fails naming exactly those: the member missing from the
   cluster, its unit inactive, the replica's link down, the Sentinel unit inactive and unreadable. All are then
   repaired and the cluster is proved healthy again;
3. a Sentinel that names a replica as master (told at run time to monitor it: a Sentinel restored from an old
   file or reconfigured by hand): after its own down-after plus two INFO periods it sees that "master" as down
   (it answers as a replica) and it disagrees with the two others. The run names exactly those two; the
   Sentinel's file is then put back and the three agree again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import (
    MEMBERS,
    REPO_HOST,
    address,
    cluster,
    damaged_repository,
    leader,
    member,
    run_playbook,
    secret,
    wait_for,
)
from test_redis_sentinel import MASTER_NAME, agreed_master, cli, info, sentinel, sentinel_master

# The Sentinel's own file (quantnova.grandmodel.redis writes it once; Sentinel rewrites it from then on).
SENTINEL_CONF = "/etc/redis/grandmodel-sentinel.conf"


def daily_health(tmp_path: Path, name: str) -> tuple[int, dict[str, Any], str]:
    reports = tmp_path / name
    # The scenario's Prometheus (the repository host, group monitoring) is left out: its alerts would add to the
    # problems each fault here is named by (a stopped Patroni is also a down target), and the machine's own alerts
    # (CPU under the suite's load, the unsynchronised clock) are no replication fault. molecule/monitoring proves
    # the runbook's monitoring section; test_monitoring_ha.py the data tier's alerts.
    extra = {"runbook_reports_dir": str(reports), "runbook_monitoring_group": "no_monitoring_in_this_check"}
    proc = run_playbook("runbooks/daily_health.yml", "-e", json.dumps(extra))
    found = sorted(reports.glob("daily_health-*/report.json"))
    assert found, proc.stdout[-3000:] + proc.stderr[-2000:]
    markdown = found[-1].with_name("report.md").read_text()
    return proc.returncode, json.loads(found[-1].read_text()), markdown


def healthy_cluster() -> bool:
    view = cluster()
    states = {m["name"]: m["state"] for m in view["members"]}
    sync = [m["name"] for m in view["members"] if m["role"] == "sync_standby"]
    redis = [info(h) for h in MEMBERS]
    links = [r.get("master_link_status") for r in redis if r.get("role") == "slave"]
    return (len(states) == 3 and set(states.values()) <= {"running", "streaming"} and leader(view) is not None
            and len(sync) == 1 and links == ["up", "up"])


def test_daily_health_reads_replication_from_patroni_and_redis(tmp_path: Path) -> None:
    wait_for("a healthy cluster (3 members, a sync standby, 2 linked Redis replicas)", healthy_cluster, 120)
    rc, report, markdown = daily_health(tmp_path, "healthy")
    assert rc == 0 and report["problems"] == [], report["problems"]

    view = cluster()
    truth = {m["name"]: m["role"] for m in view["members"]}
    seen = next(h["patroni"] for h in report["hosts"].values() if h["patroni"]["members"])
    roles = {m["Member"]: m["Role"] for m in seen["members"]}
    assert roles == {n: {"leader": "Leader", "sync_standby": "Sync Standby", "replica": "Replica"}[r]
                     for n, r in truth.items()}, (roles, truth)
    assert seen["synchronous_mode"] is True
    redis_roles = {h: report["hosts"][h]["redis_replication"]["role"] for h in MEMBERS}
    assert sorted(redis_roles.values()) == ["master", "slave", "slave"], redis_roles
    assert {h: info(h)["role"] for h in MEMBERS} == redis_roles
    for host, role in redis_roles.items():
        if role == "slave":
            assert report["hosts"][host]["redis_replication"]["master_link_status"] == "up"
    for host in MEMBERS:
        units = report["hosts"][host]["units"]
        assert units == {u: "active" for u in ("etcd", "patroni", "haproxy", "redis-server", "redis-sentinel")}
    master = next(h for h, role in redis_roles.items() if role == "master")
    for host in MEMBERS:
        seen_sentinel, truth_sentinel = report["hosts"][host]["redis_sentinel"], sentinel_master(host)
        assert seen_sentinel["error"] is None and seen_sentinel["quorum_ok"] is True, seen_sentinel
        assert seen_sentinel["master"] == f"{truth_sentinel['ip']}:{truth_sentinel['port']}", seen_sentinel
        assert seen_sentinel["master"].rsplit(":", 1)[0] == address(master), (seen_sentinel, master)
        assert seen_sentinel["other_sentinels"] == "2" and seen_sentinel["ckquorum"].startswith("OK 3 usable")
    # pgBackRest of the cluster: check (archiving) and the newest backup on every member, verify on the repository.
    for host in MEMBERS:
        backrest = report["hosts"][host]["pgbackrest"]
        assert backrest["check_ok"] is True and backrest["newest_type"] == "full", (host, backrest)
    assert report["hosts"][REPO_HOST]["pgbackrest_verify"] == {"stanzas": {"grandmodel": "ok"}, "error": None}
    assert "repository: verify grandmodel ok" in markdown
    assert "## Replication" in markdown and "Sync Standby" in markdown and "| master |" in markdown
    assert markdown.count(", OK 3 usable Sentinels") == 3


def test_daily_health_names_a_stopped_member_and_a_broken_redis_link(tmp_path: Path) -> None:
    view = cluster()
    pg_victim = next(m["name"] for m in view["members"] if m["role"] != "leader")
    redis_victim = next(h for h in MEMBERS if info(h)["role"] == "slave")
    sentinel_victim = next(h for h in MEMBERS if info(h)["role"] == "master")
    masterauth = cli(redis_victim, "CONFIG", "GET", "masterauth").splitlines()[1]
    try:
        member(sentinel_victim).check_output("systemctl stop redis-sentinel")
        member(pg_victim).check_output("systemctl stop patroni")
        assert cli(redis_victim, "CONFIG", "SET", "masterauth", "not-the-replication-password") == "OK"
        redis_kill = cli(redis_victim, "CLIENT", "KILL", "TYPE", "master")
        wait_for(f"{redis_victim}'s link to its master to go down",
                 lambda: info(redis_victim).get("master_link_status") == "down", 30)
        with damaged_repository():
            rc, report, markdown = daily_health(tmp_path, "faults")
    finally:
        member(pg_victim).check_output("systemctl start patroni")
        cli(redis_victim, "CONFIG", "SET", "masterauth", masterauth)
        member(sentinel_victim).check_output("systemctl start redis-sentinel")
    assert rc != 0
    problems = report["problems"]
    print("daily health with the faults:", json.dumps(problems))
    # Stopped cleanly, the member's key stays in etcd as "stopped" until its TTL ends, then goes: either is named.
    member_gone = [p for p in problems if p.startswith(f"{pg_victim}: ") and (
        "not a member of the Patroni cluster" in p or p.startswith(f"{pg_victim}: Patroni member is stopped"))]
    unit = f"{pg_victim}: patroni is inactive"
    link = [p for p in problems if p.startswith(f"{redis_victim}: Redis replica link to its master ")]
    assert unit in problems and len(member_gone) == 1, problems
    assert len(link) == 1 and link[0].endswith(" is down"), (problems, redis_kill)
    sentinel_unit = f"{sentinel_victim}: redis-sentinel is inactive"
    unreadable = [p for p in problems if p.startswith(f"{sentinel_victim}: its Redis Sentinel could not be read: ")]
    assert sentinel_unit in problems and len(unreadable) == 1, problems
    # The damaged repository file, and pgBackRest's check on the stopped member (its PostgreSQL is down).
    verify = [p for p in problems if p.startswith(f"{REPO_HOST}: pgbackrest verify of the stanza grandmodel fails ")]
    check = f"{pg_victim}: pgbackrest check fails (WAL archiving to the repository fails)"
    assert len(verify) == 1 and check in problems, problems
    # Nothing else: the other members, the leader, the Redis master and the two Sentinels still running (a
    # quorum of 2 of 3) are reported as they are.
    assert set(problems) - {unit, *member_gone, *link, sentinel_unit, *unreadable, *verify, check} <= {
        # Patroni may need a moment to make the remaining replica synchronous.
        "the Patroni cluster has no synchronous standby while synchronous mode is on: a failover now could lose "
        "committed transactions"}, problems
    assert "## Replication" in markdown

    wait_for("the cluster healthy again", healthy_cluster, 180, interval=2)
    rc, report, _ = daily_health(tmp_path, "repaired")
    assert rc == 0 and report["problems"] == [], report["problems"]


def test_daily_health_names_a_sentinel_that_names_another_master(tmp_path: Path) -> None:
    wait_for("a healthy cluster", healthy_cluster, 120)
    master = wait_for("the three Sentinels naming one master", agreed_master, 60)
    rogue, named = (h for h in MEMBERS if h != master)
    state = sentinel_master(rogue)
    # Sentinels adopt a higher configuration epoch from each other's hello messages: at epoch 0 (no failover
    # yet, as this file runs before test_redis_sentinel.py) the rogue Sentinel keeps its wrong master.
    assert state["config-epoch"] == "0", f"run this before any failover (config-epoch {state['config-epoch']})"
    saved = "/root/sentinel.conf.before-rogue"
    member(rogue).check_output(f"cp -p {SENTINEL_CONF} {saved}")
    try:
        assert sentinel(rogue, "SENTINEL", "REMOVE", MASTER_NAME) == "OK"
        assert sentinel(rogue, "SENTINEL", "MONITOR", MASTER_NAME, address(named), "6380", "2") == "OK"
        assert sentinel(rogue, "SENTINEL", "SET", MASTER_NAME, "auth-user", "sentinel",
                        "auth-pass", secret("redis_sentinel"), "down-after-milliseconds", "2000") == "OK"
        wait_for(f"{rogue}'s Sentinel to see its 'master' {named} as down (it answers as a replica)",
                 lambda: "s_down" in sentinel_master(rogue).get("flags", ""), 60)
        rc, report, markdown = daily_health(tmp_path, "rogue-sentinel")
    finally:
        member(rogue).check_output(f"systemctl stop redis-sentinel && cp -p {saved} {SENTINEL_CONF} "
                                   "&& systemctl start redis-sentinel")
    assert rc != 0
    problems = report["problems"]
    print("daily health with a rogue Sentinel:", json.dumps(problems))
    seen = f"{address(named)}:6380"
    assert report["hosts"][rogue]["redis_sentinel"]["master"] == seen
    down = f"{rogue}: its Redis Sentinel sees the master {seen} as down ("
    disagree = "the Redis Sentinels disagree on the master: "
    assert [p for p in problems if p.startswith(down) and "s_down" in p], problems
    disagreement = [p for p in problems if p.startswith(disagree)]
    assert len(disagreement) == 1 and f"{rogue} names {seen}" in disagreement[0], problems
    for host in MEMBERS:
        if host != rogue:
            assert f"{host} names {address(master)}:6380" in disagreement[0], disagreement
    # Its hello messages still reach the other two under the same master name: it counts three usable
    # Sentinels, so its quorum check passes and nothing else is named.
    assert len(problems) == 2, problems
    assert "s_down" in markdown

    def three_agree_with_a_quorum() -> bool:
        return agreed_master() == master and all(
            sentinel(h, "SENTINEL", "CKQUORUM", MASTER_NAME).startswith("OK 3 usable") for h in MEMBERS)

    wait_for("the three Sentinels agreeing again with a quorum", three_agree_with_a_quorum, 60, interval=1)
    rc, report, _ = daily_health(tmp_path, "rogue-repaired")
    assert rc == 0 and report["problems"] == [], report["problems"]
