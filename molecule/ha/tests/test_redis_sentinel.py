"""Redis with Sentinel on gm-mol-ha-1..3 (group cache_ha, playbooks/cache_ha.yml).

In this order on one replication set: its shape (one master, two replicas, three Sentinels agreeing with a
quorum of 2), the ACL users (replication and Sentinel users limited to what they send, the application's
rights unchanged, no anonymous Sentinel), a kill -9 of the master's redis-server under a steady write load
by a Sentinel-aware client (seconds without a writable master, acknowledged writes lost, the old master
back as a replica), the same master hung (SIGSTOP) instead, with a stale connection whose write reaches it
after the failover and must be refused, a second run of the playbook after both failovers that changes
nothing, and a run that changes a setting Redis reads at start only (maxmemory in redis.conf) under the write
load: one member restarted at a time, the master last after a failover, no write lost; then a restart that an
interrupted run left undone (a file newer than the running server) is made by the next run, and only that one.
"""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import MEMBERS, WriteLoad, address, longest_gap, member, record, run_playbook, secret, wait_for

testinfra_hosts = ["podman://gm-mol-ha-1"]

MASTER_NAME = "grandmodel"
CA = "/etc/grandmodel/pki/ca.crt"
SOCKET = "/run/redis/redis-server.sock"
KEY = "sentinel_probe"
USERS = {"admin": ("grandmodel_admin", "redis_admin"), "app": ("grandmodel_app", "redis_app"),
         "sentinel": ("sentinel", "redis_sentinel"), "replication": ("replication", "redis_replication")}
WRITER = Path(__file__).with_name("redis_writer.py")
STALE_CLIENT = Path(__file__).with_name("redis_stale_client.py")
SENTINEL_DROPIN = "/etc/systemd/system/redis-sentinel.service.d/50-grandmodel.conf"


def cli(host: str, *args: str, user: str = "admin", target: str = "socket") -> str:
    """redis-cli on `host` as `user`: to its Redis over the Unix socket, or over TLS to `target`
    ("<address>:<port>"). Returns stdout and stderr together (error replies included)."""
    name, secret_name = USERS[user]
    where = f"-s {SOCKET}" if target == "socket" else (
        f"--tls --cacert {CA} -h {target.rsplit(':', 1)[0]} -p {target.rsplit(':', 1)[1]}")
    run = member(host).run(
        f"REDISCLI_AUTH={shlex.quote(secret(secret_name))} redis-cli {where} --user {name} --no-auth-warning "
        + " ".join(shlex.quote(a) for a in args))
    return str(run.stdout + run.stderr).strip()


def sentinel(host: str, *args: str, user: str = "sentinel") -> str:
    return cli(host, *args, user=user, target="127.0.0.1:26379")


def addresses() -> dict[str, str]:
    return {address(n): n for n in MEMBERS}


def master_by(host: str) -> str | None:
    """The member the Sentinel on `host` names as master."""
    lines = sentinel(host, "SENTINEL", "get-master-addr-by-name", MASTER_NAME).splitlines()
    return addresses().get(lines[0]) if len(lines) == 2 else None


def agreed_master(among: tuple[str, ...] = tuple(MEMBERS)) -> str | None:
    named = {master_by(h) for h in among}
    return named.pop() if len(named) == 1 and None not in named else None


def info(host: str, section: str = "replication") -> dict[str, str]:
    return dict(line.split(":", 1) for line in cli(host, "INFO", section).splitlines() if ":" in line)


def sentinel_master(host: str) -> dict[str, str]:
    lines = sentinel(host, "SENTINEL", "MASTER", MASTER_NAME).splitlines()
    return dict(zip(lines[0::2], lines[1::2], strict=False))


def main_pid(host: str, unit: str) -> str:
    return str(member(host).check_output(f"systemctl show -p MainPID --value {unit}"))


@dataclass
class SentinelLoad(WriteLoad):
    """redis_writer.py on one member as a transient systemd unit, as the application user (its log, stop file and
    stop as the PostgreSQL write load's); each acknowledged line also names the master's port that took it."""

    unit: str = "redis-writer-failover"

    def start(self, first_id: int) -> None:
        subprocess.run(["podman", "cp", str(WRITER), f"{self.host}:/root/redis_writer.py"], check=True)
        sentinels = " ".join(f"--sentinel {a}:26379" for a in addresses())
        member(self.host).check_output(
            f"rm -f {self.log} {self.stop_file}; systemd-run --unit={self.unit} "
            f"--setenv=REDIS_PASSWORD={shlex.quote(secret('redis_app'))} "
            f"python3 /root/redis_writer.py {sentinels} --master-name {MASTER_NAME} --cafile {CA} "
            f"--user grandmodel_app --key {KEY} --log {self.log} --stop-file {self.stop_file} --seconds 120 "
            f"--first-id {first_id}")

    def acknowledged(self) -> list[tuple[int, float, int]]:  # type: ignore[override]
        out = member(self.host).run(f"cat {self.log}").stdout
        return [(int(i), float(t), int(r)) for i, t, r in (line.split() for line in out.splitlines() if line.strip())]


def rejoin_seconds(old: str, new: str) -> float:
    """Seconds until `old` replicates from `new` with its link up; then waits for it to hold `new`'s data."""
    started = time.monotonic()
    wait_for(f"{old} back as a replica of {new}",
             lambda: (i := info(old)).get("role") == "slave" and i.get("master_host") == address(new)
             and i.get("master_link_status") == "up", 90, 1)
    seconds = round(time.monotonic() - started, 1)
    wait_for("the old master holding the new master's data",
             lambda: cli(old, "SCARD", KEY) == cli(new, "SCARD", KEY), 30)
    return seconds


def test_one_master_two_replicas_three_sentinels_with_a_quorum() -> None:
    master = wait_for("the three Sentinels naming one master", agreed_master, 60)
    replicas = [n for n in MEMBERS if n != master]

    def replicas_streaming() -> bool:
        return info(master).get("connected_slaves") == "2" and all(
            info(n).get("master_link_status") == "up" for n in replicas)

    wait_for("two replicas streaming from the master", replicas_streaming, 60)
    assert info(master)["role"] == "master"
    for name in MEMBERS:
        state = wait_for(f"{name}'s Sentinel knowing both replicas and both other Sentinels",
                         lambda n=name: (s := sentinel_master(n)).get("num-slaves") == "2"
                         and s.get("num-other-sentinels") == "2" and s, 60)
        assert state["quorum"] == "2" and state["down-after-milliseconds"] == "2000", state
        assert sentinel(name, "SENTINEL", "CKQUORUM", MASTER_NAME).startswith("OK 3 usable Sentinels"), name
    # The role's redis.conf names no master: the topology is Sentinel's (runtime and its own file).
    conf = member(replicas[0]).check_output("cat /etc/redis/redis.conf")
    assert not [line for line in conf.splitlines() if line.startswith(("replicaof", "slaveof"))], conf


def test_replication_and_sentinel_users_have_least_privilege_and_the_app_user_is_unchanged() -> None:
    master = agreed_master()
    assert master
    target = f"{address(master)}:6380"
    # The replication user: PSYNC, REPLCONF and PING only.
    assert "NOPERM" in cli(MEMBERS[0], "GET", "x", user="replication", target=target)
    assert cli(MEMBERS[0], "PING", user="replication", target=target) == "PONG"
    # The Sentinel user on Redis: what Sentinel sends (INFO, ROLE, REPLICAOF via SLAVEOF, ...), no data.
    assert "NOPERM" in cli(MEMBERS[0], "GET", "x", user="sentinel", target=target)
    assert "NOPERM" in cli(MEMBERS[0], "FLUSHALL", user="sentinel", target=target)
    assert "role:master" in cli(MEMBERS[0], "INFO", "replication", user="sentinel", target=target)
    # The application user: data as before, never the topology.
    assert cli(MEMBERS[0], "SET", "acl_probe", "1", user="app", target=target) == "OK"
    assert "NOPERM" in cli(MEMBERS[0], "REPLICAOF", "NO", "ONE", user="app", target=target)
    # The Sentinels: no anonymous access; the application asks where the master is and nothing more.
    anonymous = member(MEMBERS[0]).run(
        f"redis-cli --tls --cacert {CA} -h 127.0.0.1 -p 26379 SENTINEL get-master-addr-by-name {MASTER_NAME}")
    assert re.search("NOAUTH|NOPERM|WRONGPASS", anonymous.stdout + anonymous.stderr), anonymous.stdout
    assert sentinel(MEMBERS[0], "SENTINEL", "get-master-addr-by-name", MASTER_NAME, user="app").splitlines()[0] \
        == address(master)
    assert "NOPERM" in sentinel(MEMBERS[0], "SENTINEL", "FAILOVER", MASTER_NAME, user="app")
    assert "NOPERM" in sentinel(MEMBERS[0], "SENTINEL", "SET", MASTER_NAME, "quorum", "1", user="app")


def test_kill_9_of_the_master_under_write_load_promotes_a_replica_and_the_client_follows() -> None:
    old = agreed_master()
    assert old
    writer_host = next(n for n in MEMBERS if n != old)
    load = SentinelLoad(writer_host)
    first = int(cli(old, "SCARD", KEY) or 0) + 100000
    load.start(first)
    wait_for("steady acknowledged writes", lambda: len(load.acknowledged()) >= 50, 30)
    victim = member(old)
    # Debian's unit restarts Redis at once after a crash (before any Sentinel could notice); a dead host
    # does not come back: no restart for this test.
    victim.check_output("mkdir -p /run/systemd/system/redis-server.service.d && printf '[Service]\\nRestart=no\\n' "
                        "> /run/systemd/system/redis-server.service.d/ha-test.conf && systemctl daemon-reload")
    victim.check_output("kill -9 $(systemctl show -p MainPID --value redis-server)")
    killed_at = time.time()
    others = tuple(n for n in MEMBERS if n != old)
    try:
        new = wait_for("the other Sentinels naming a new master",
                       lambda: (m := agreed_master(others)) != old and m, 60)
        promoted_after = time.time() - killed_at
        wait_for("writes acknowledged by the new master",
                 lambda: any(t > killed_at + 1 for _, t, _ in load.acknowledged()), 30)
        time.sleep(2)
    finally:
        acked = load.stop()
    present = {int(i) for i in cli(new, "SMEMBERS", KEY).split()}
    lost = [i for i, _, _ in acked if i not in present]
    lost_confirmed = [i for i, _, r in acked if r >= 1 and i not in present]
    gap = longest_gap([(i, t) for i, t, _ in acked if t > killed_at - 5])
    record(redis_failover_seconds_without_writable_master=round(gap, 2),
           redis_failover_promoted_after_seconds=round(promoted_after, 2),
           redis_failover_acknowledged=len(acked), redis_failover_lost=len(lost),
           redis_failover_replica_confirmed=sum(1 for a in acked if a[2] >= 1),
           redis_failover_replica_confirmed_lost=len(lost_confirmed), redis_failover_new_master=new)
    assert new != old
    assert not lost_confirmed, f"writes a replica had confirmed (WAIT) missing after failover: {lost_confirmed[:20]}"
    assert gap < 30, f"{gap:.1f} s without a writable master"

    victim.check_output("rm -f /run/systemd/system/redis-server.service.d/ha-test.conf && systemctl daemon-reload "
                        "&& systemctl start redis-server")
    record(redis_old_master_rejoin_seconds=rejoin_seconds(old, new))


@dataclass
class StaleClient:
    """redis_stale_client.py on one member: one connection opened to one instance before it hangs, used
    again after the failover (a connection pool that has not noticed)."""

    host: str
    target: str
    unit: str = "redis-stale-client"

    @property
    def log(self) -> str:
        return f"/root/{self.unit}.log"

    def start(self, key_member: str) -> None:
        for script in (WRITER, STALE_CLIENT):
            subprocess.run(["podman", "cp", str(script), f"{self.host}:/root/{script.name}"], check=True)
        member(self.host).check_output(
            f"rm -f {self.log} {self.log}.go; systemd-run --unit={self.unit} --working-directory=/root "
            f"--setenv=REDIS_PASSWORD={shlex.quote(secret('redis_app'))} "
            f"python3 /root/{STALE_CLIENT.name} --target {self.target} --cafile {CA} --user grandmodel_app "
            f"--key {KEY} --member {key_member} --log {self.log} --go-file {self.log}.go --timeout 30")
        wait_for(f"the stale client connected to {self.target}", lambda: self.lines()[:1] == ["connected PONG"], 20)

    def lines(self) -> list[str]:
        return member(self.host).run(f"cat {self.log} 2>/dev/null").stdout.splitlines()

    def go(self) -> None:
        member(self.host).check_output(f"touch {self.log}.go")

    def outcomes(self) -> dict[str, str]:
        """{"queued": ..., "after": ...}: each write's outcome ("reply 1 <time>", "error NOREPLICAS ...")."""
        lines = wait_for("the stale client's two answers",
                         lambda: (got := self.lines()[1:]) and (len(got) == 2 or "failed" in got[-1]) and got, 45)
        return dict(line.split(" ", 1) for line in lines)


def test_a_hung_master_is_replaced_and_a_write_reaching_it_afterwards_is_refused() -> None:
    """SIGSTOP, not kill: the unit stays active, the port accepts connections and nothing answers. A stale
    connection (opened before the hang, never told of the failover) writes to it once while it hangs and
    once a second after it resumes. The second write must be refused (min-replicas-to-write): an
    acknowledged write there would vanish when Sentinel turns the old master into a replica. The first,
    read in the same event-loop pass as its replicas' hang-ups, is reported, not asserted: Redis answers
    it before it has counted its replicas gone (docs/data.md)."""
    old = wait_for("the three Sentinels naming one master", agreed_master, 60)
    writer_host = next(n for n in MEMBERS if n != old)
    wait_for("both replicas streaming", lambda: info(old).get("connected_slaves") == "2", 60)
    load = SentinelLoad(writer_host, unit="redis-writer-hang")
    first = int(cli(old, "SCARD", KEY) or 0) + 200000
    stale_member = f"stale-{int(time.time())}"
    stale = StaleClient(writer_host, f"{address(old)}:6380")
    stale.start(stale_member)
    load.start(first)
    wait_for("steady acknowledged writes", lambda: len(load.acknowledged()) >= 50, 30)
    max_lag = int(cli(old, "CONFIG", "GET", "min-replicas-max-lag").splitlines()[1])
    pid = main_pid(old, "redis-server")
    member(old).check_output(f"kill -STOP {pid}")
    stopped_at = time.time()
    resumed = False
    try:
        new = wait_for("all three Sentinels naming a new master",
                       lambda: (m := agreed_master()) != old and m, 60)
        promoted_after = time.time() - stopped_at
        wait_for("writes acknowledged by the new master",
                 lambda: any(t > stopped_at + 1 for _, t, _ in load.acknowledged()), 30)
        # The stale connection's write waits in the hung process's socket; the hang lasts past
        # min-replicas-max-lag, as a real stall's would.
        stale.go()
        time.sleep(max(0.0, stopped_at + max_lag + 2 - time.time()))
        hung_for = time.time() - stopped_at
        member(old).check_output(f"kill -CONT {pid}")
        resumed = True
        answers = stale.outcomes()
        time.sleep(1)
    finally:
        if not resumed:
            member(old).run(f"kill -CONT {pid}")
        acked = load.stop()
    present = {i for i in cli(new, "SMEMBERS", KEY).split()}
    lost_confirmed = [i for i, _, r in acked if r >= 1 and str(i) not in present]
    gap = longest_gap([(i, t) for i, t, _ in acked if t > stopped_at - 5])
    record(redis_hang_promoted_after_seconds=round(promoted_after, 2),
           redis_hang_seconds_without_writable_master=round(gap, 2), redis_hang_hung_seconds=round(hung_for, 1),
           redis_hang_acknowledged=len(acked), redis_hang_replica_confirmed_lost=len(lost_confirmed),
           redis_hang_stale_queued_write=answers["queued"].rsplit(" ", 1)[0],
           redis_hang_stale_write_after_resume=answers.get("after", "none").rsplit(" ", 1)[0])
    assert new != old
    assert not lost_confirmed, f"writes a replica had confirmed (WAIT) missing after failover: {lost_confirmed[:20]}"
    assert gap < 30, f"{gap:.1f} s without a writable master"
    after = answers.get("after", answers["queued"])
    assert after.startswith(("error NOREPLICAS", "error READONLY", "failed")), (
        f"the resumed old master acknowledged a write the new master will never have: {after}")
    record(redis_hang_old_master_rejoin_seconds=rejoin_seconds(old, new))
    assert cli(new, "SISMEMBER", KEY, f"{stale_member}-after") == "0"
    assert cli(old, "SISMEMBER", KEY, f"{stale_member}-after") == "0"
    record(redis_hang_stale_queued_write_kept=cli(new, "SISMEMBER", KEY, f"{stale_member}-queued") == "1")


def sentinel_downtime(host: str) -> tuple[int, int]:
    """When redis-sentinel last began to stop and when it was up again (microseconds, kernel monotonic clock)."""
    out = member(host).check_output("systemctl show -p ActiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic "
                                    "redis-sentinel")
    values = dict(line.split("=", 1) for line in out.splitlines())
    return int(values["ActiveExitTimestampMonotonic"]), int(values["ActiveEnterTimestampMonotonic"])


def started_at(host: str) -> int:
    """When redis-server last started on `host`, in microseconds of the shared kernel's monotonic clock (the
    containers have no time namespace of their own), so starts on different members compare."""
    return int(member(host).check_output("systemctl show -p ActiveEnterTimestampMonotonic --value redis-server"))


def test_a_setting_that_needs_a_restart_restarts_one_member_at_a_time_the_master_last() -> None:
    master = wait_for("the three Sentinels naming one master", agreed_master, 60)
    wait_for("both replicas streaming", lambda: info(master).get("connected_slaves") == "2", 60)
    pids = {n: main_pid(n, "redis-server") for n in MEMBERS}
    writer_host = next(n for n in MEMBERS if n != master)
    load = SentinelLoad(writer_host, unit="redis-writer-roll")
    load.start(int(cli(master, "SCARD", KEY) or 0) + 300000)
    wait_for("steady acknowledged writes", lambda: len(load.acknowledged()) >= 50, 30)
    begun = time.time()
    try:
        run = run_playbook("cache_ha.yml", "-e", "redis_maxmemory=300mb")
        time.sleep(2)
    finally:
        acked = load.stop()
    assert run.returncode == 0, run.stdout[-3000:]
    record(redis_rolling_restart_run_seconds=round(time.time() - begun, 1))
    new = wait_for("the three Sentinels naming one master", agreed_master, 60)
    present = set(cli(new, "SMEMBERS", KEY).split())
    lost = [i for i, _, _ in acked if str(i) not in present]
    lost_confirmed = [i for i, _, r in acked if r >= 1 and str(i) not in present]
    gap = longest_gap([(i, t) for i, t, _ in acked if t > begun])
    starts = {n: started_at(n) for n in MEMBERS}
    order = sorted(MEMBERS, key=starts.__getitem__)
    record(redis_rolling_restart_longest_gap_seconds=round(gap, 2), redis_rolling_restart_acknowledged=len(acked),
           redis_rolling_restart_lost=len(lost), redis_rolling_restart_replica_confirmed_lost=len(lost_confirmed),
           redis_rolling_restart_order=order,
           redis_rolling_restart_spacing_seconds=[round((starts[b] - starts[a]) / 1e6, 1)
                                                  for a, b in itertools.pairwise(order)])
    # Every member restarted with the new setting, one at a time, the master last and no longer the master.
    assert all(main_pid(n, "redis-server") != pids[n] for n in MEMBERS), pids
    assert all(cli(n, "CONFIG", "GET", "maxmemory").splitlines()[1] == str(300 * 1024 * 1024) for n in MEMBERS)
    assert order[-1] == master and new != master, (order, master, new)
    recap = re.findall(r"^(gm-mol-ha-\d)\s*:\s*ok=\d+\s+changed=(\d+)", run.stdout, re.MULTILINE)
    assert all(int(changed) > 0 for _, changed in recap), run.stdout[-3000:]
    assert not lost_confirmed, f"writes a replica had confirmed (WAIT) lost in the restarts: {lost_confirmed[:20]}"
    # The master's writes are paused and every replica caught up before the handover: no acknowledged write at
    # all may be lost, confirmed or not.
    assert not lost, f"acknowledged writes lost in the restarts: {lost[:20]}"
    assert gap < 15, f"{gap:.1f} s without a writable master during the rolling restart"
    assert all(info(n).get("master_link_status") == "up" for n in MEMBERS if n != new)


def test_a_restart_an_interrupted_run_left_undone_is_made_and_the_run_after_changes_nothing() -> None:
    """A rolling restart cut off after the files were written leaves members on old settings; the next run
    finds nothing to change in the files, so it must tell from their age that a restart is still due. The same run
    brings every host a changed Sentinel drop-in (as a new role version would): the Sentinels restart one at a
    time, never two down at once."""
    master = wait_for("the three Sentinels naming one master", agreed_master, 60)
    left = next(n for n in MEMBERS if n != master)
    pids = {n: main_pid(n, "redis-server") for n in MEMBERS}
    sentinels = {n: main_pid(n, "redis-sentinel") for n in MEMBERS}
    # What the cut-off run left on `left`: redis.conf newer than the running server (same content here).
    member(left).check_output("sleep 1.1; touch /etc/redis/redis.conf")
    # And what a new version of the role brings to every host in the same run: a changed Sentinel drop-in.
    for n in MEMBERS:
        member(n).check_output(f"sed -i '1i # the drop-in of an older role version' {SENTINEL_DROPIN}")
    # The value the rolling-restart test above left in place: the files themselves do not change.
    run = run_playbook("cache_ha.yml", "-e", "redis_maxmemory=300mb")
    assert run.returncode == 0, run.stdout[-3000:]
    assert "Queue the restart an earlier run left undone" in run.stdout
    assert {n: main_pid(n, "redis-server") != pids[n] for n in MEMBERS} == {n: n == left for n in MEMBERS}
    assert info(left).get("master_link_status") == "up"
    # Every Sentinel restarted on the new drop-in, one at a time: by systemd's own clock of each unit (the
    # containers share the kernel's monotonic clock), no Sentinel went down before the one before it was up.
    assert all(main_pid(n, "redis-sentinel") != sentinels[n] for n in MEMBERS), sentinels
    down = sorted(sentinel_downtime(n) for n in MEMBERS)
    record(redis_sentinel_restart_windows_ms=[round((up - gone) / 1000, 1) for gone, up in down],
           redis_sentinel_restart_spacing_ms=[round((b[0] - a[1]) / 1000, 1) for a, b in itertools.pairwise(down)])
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(down)), f"two Sentinels down at once: {down}"
    assert agreed_master()
    # Done once: the run after it changes nothing and restarts nothing. It also stands for a run after the
    # failovers of this file (kill -9, hang, the rolling restart's handover): the Sentinels rewrote their own and the
    # servers' files, and the role must not fight those rewrites (changed=0, the same PIDs, the same master).
    master = wait_for("the three Sentinels naming one master", agreed_master, 60)
    pids = {n: (main_pid(n, "redis-server"), main_pid(n, "redis-sentinel")) for n in MEMBERS}
    begun = time.monotonic()
    again = run_playbook("cache_ha.yml", "-e", "redis_maxmemory=300mb")
    record(redis_cache_ha_rerun_seconds=round(time.monotonic() - begun, 1))
    recap = re.findall(r"^(gm-mol-ha-\d)\s*:\s*ok=\d+\s+changed=(\d+)", again.stdout, re.MULTILINE)
    assert again.returncode == 0 and sorted(recap) == sorted((n, "0") for n in MEMBERS), again.stdout[-3000:]
    assert agreed_master() == master
    assert {n: (main_pid(n, "redis-server"), main_pid(n, "redis-sentinel")) for n in MEMBERS} == pids
    assert all(info(n).get("master_host") == address(master) for n in MEMBERS if n != master)
