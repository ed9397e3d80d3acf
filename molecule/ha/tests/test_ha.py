"""Highly available PostgreSQL on gm-mol-ha-1..3: Patroni with etcd, synchronous replication, HAProxy.

The tests run in this order on one cluster: its shape, the endpoint, playbooks/pg_failover_drill.yml killing
the leader's Patroni and postmaster with SIGKILL under a steady write load (seconds without a writable leader,
acknowledged rows lost, the old leader back as a replica), a refused and a real switchover through
playbooks/pg_switchover.yml under load, and playbooks/pg_rolling_restart.yml (the leader restarted last).
"""

from __future__ import annotations

import re
import shlex
import time

from conftest import (
    DATA_DIR,
    ETCDCTL,
    MEMBERS,
    PKI,
    WriteLoad,
    address,
    cluster,
    leader,
    longest_gap,
    lost_rows,
    member,
    record,
    roles,
    run_playbook,
    secret,
    sql,
    wait_for,
)

testinfra_hosts = ["podman://gm-mol-ha-1"]

TABLE = "CREATE TABLE IF NOT EXISTS ha_probe (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"


def streaming_replicas(view: dict) -> list[str]:
    return [m["name"] for m in view["members"]
            if m["role"] in ("replica", "sync_standby") and m["state"] in ("running", "streaming")
            and isinstance(m.get("lag"), int)]


def next_id(name: str) -> int:
    sql(name, TABLE)
    return int(sql(name, "SELECT coalesce(max(id), 0) + 1000 FROM ha_probe"))


def writer_host(view: dict) -> str:
    """A member that is neither the leader nor the synchronous standby: its HAProxy outlives the fault."""
    current = roles(view)
    return next((n for n, r in current.items() if r == "replica"),
                next(n for n, r in current.items() if r != "leader"))


def test_one_leader_two_streaming_replicas_one_synchronous() -> None:
    def healthy() -> dict | None:
        view = cluster()
        return view if leader(view) and len(streaming_replicas(view)) == 2 else None

    view = wait_for("a leader and two streaming replicas", healthy, 60)
    assert sorted(m["name"] for m in view["members"]) == MEMBERS
    assert list(roles(view).values()).count("sync_standby") == 1, view
    out = member(view["members"][0]["name"]).check_output(
        "runuser -u postgres -- patronictl -c /etc/patroni/config.yml list")
    assert "Leader" in out and out.count("Sync Standby") == 1, out


def test_endpoint_serves_the_leader_read_write_and_replicas_read_only() -> None:
    for name in MEMBERS:
        assert sql(name, "SELECT pg_is_in_recovery()") == "f"
        assert sql(name, "SELECT pg_is_in_recovery()", port=5001) == "t"
    assert sql(MEMBERS[0], "SHOW synchronous_commit") == "on"
    assert sql(MEMBERS[0], "SHOW password_encryption") == "scram-sha-256"


def as_login(name: str, user: str, secret_name: str, query: str, port: int = 5000) -> str:
    """A query through the endpoint on `name` to the application's database, as one of its logins."""
    return str(member(name).check_output(
        f"PGPASSWORD={shlex.quote(secret(secret_name))} psql -X -At -h 127.0.0.1 -p {port} "
        f"-U {user} -d grandmodel -v ON_ERROR_STOP=1 -c {shlex.quote(query)}"))


def test_the_application_database_is_made_on_the_leader_and_every_replica_has_it() -> None:
    # data_ha.yml ran the postgresql role's logins, database, migrations and grants on the leader only: the
    # replicas have them by replication, and the application's login reaches them through every endpoint.
    applied = sql(leader(cluster()) or MEMBERS[0],
                  "SELECT string_agg(version, ',' ORDER BY version) FROM grandmodel_schema_migrations",
                  database="grandmodel")
    record(application_migrations=applied)
    for name in MEMBERS:
        assert as_login(name, "grandmodel_app", "postgresql_app", "SELECT current_user") == "grandmodel_app"
        # On a replica the read-only login reads the application's tables and may not write them (its grants).
        replica = as_login(name, "grandmodel_ro", "postgresql_readonly",
                           "SELECT pg_is_in_recovery(), has_table_privilege('trading.trades', 'SELECT'), "
                           "has_table_privilege('trading.trades', 'INSERT')", port=5001)
        assert replica == "t|t|f", replica
    assert applied == "V001,V002,V003,V004"
    # The release-record login may insert a deployment record and nothing else, as on a single server.
    insert = ("INSERT INTO monitoring.deployments (release_id, service, version, environment, initiated_by) "
              "VALUES (gen_random_uuid(), 'ha-probe', '0', 'molecule', 'test_ha')")
    denied = member(MEMBERS[0]).run(
        f"PGPASSWORD={shlex.quote(secret('postgresql_deployer'))} psql -X -At -h 127.0.0.1 -p 5000 "
        "-U grandmodel_deployer -d grandmodel -c 'DELETE FROM monitoring.deployments'")
    assert denied.rc != 0 and "permission denied" in denied.stderr, denied.stderr
    assert as_login(MEMBERS[1], "grandmodel_deployer", "postgresql_deployer", insert) == "INSERT 0 1"


def test_replication_login_from_outside_the_members_is_refused() -> None:
    hba = member(MEMBERS[0]).check_output(f"runuser -u postgres -- cat {DATA_DIR}/pg_hba.conf")
    replication = [line for line in hba.splitlines() if line.split()[:2] == ["hostssl", "replication"]]
    assert len(replication) == 3 and all(line.split()[3].endswith("/32") for line in replication), hba
    assert all(line.split()[-1] == "scram-sha-256" for line in hba.splitlines() if line.startswith("host")), hba
    # Only loopback may connect without TLS (patroni_tls): every other host line is hostssl.
    plain = [line for line in hba.splitlines() if line.split()[:1] == ["host"]]
    assert all(line.split()[3] == "127.0.0.1/32" for line in plain), hba


def test_replication_and_clients_from_other_hosts_use_tls_and_plain_tcp_is_refused() -> None:
    view = cluster()
    now = leader(view)
    assert now
    # Both replicas stream over TLS, verified against the internal CA and the leader's address (verify-full).
    streams = sql(now, "SELECT count(*) FILTER (WHERE s.ssl), count(*), min(s.version) "
                       "FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)")
    assert streams.split("|")[:2] == ["2", "2"], streams
    assert sql(now, "SHOW ssl") == "on"
    replica = next(m["name"] for m in view["members"] if m["name"] != now)
    primary_conninfo = member(replica).check_output(
        "runuser -u postgres -- psql -X -At -c \"SHOW primary_conninfo\"")
    assert "sslmode=verify-full" in primary_conninfo and "sslrootcert=" in primary_conninfo, primary_conninfo
    # A client through the endpoint without TLS is refused by pg_hba; with TLS it gets in.
    plain = member(now).run(
        f"PGPASSWORD={shlex.quote(secret('patroni_superuser'))} psql -X -At "
        "'host=127.0.0.1 port=5000 user=postgres dbname=postgres sslmode=disable' -c 'SELECT 1'")
    assert plain.rc != 0 and "no encryption" in plain.stderr, plain.stderr
    assert sql(now, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == "t"
    record(replication_tls=streams)


def test_etcd_and_the_rest_api_refuse_plain_http_and_etcd_refuses_clients_without_a_certificate() -> None:
    """etcd (client 2379, peer 2380) serves only TLS clients presenting a certificate of the internal CA, and
    Patroni's REST API only https: asked from another member (the network an attacker would be on), plain http and
    a certificate-less client get nothing, while the members' own certificate gets an answer."""
    target = address(MEMBERS[0])
    host = member(MEMBERS[1])
    curl = f"curl -sS -f -m 5 --cacert {PKI}/ca.crt"
    client = f"--cert {PKI}/etcd.crt --key {PKI}/etcd.key"
    for port in (2379, 2380):
        plain = host.run(f"curl -sS -f -m 5 http://{target}:{port}/version")
        assert plain.rc != 0 and "etcdserver" not in plain.stdout, (port, plain.stdout, plain.stderr)
        no_cert = host.run(f"{curl} https://{target}:{port}/version")
        assert no_cert.rc != 0 and "etcdserver" not in no_cert.stdout, (port, no_cert.stdout, no_cert.stderr)
    assert "etcdserver" in host.check_output(f"{curl} {client} https://{target}:2379/version")
    # etcdctl without a client certificate cannot even read, let alone write the leader key; with it, it can.
    refused = host.run(f"ETCDCTL_API=3 etcdctl --dial-timeout=2s --command-timeout=3s --cacert={PKI}/ca.crt "
                       f"--endpoints=https://{target}:2379 put /service/grandmodel/leader intruder")
    assert refused.rc != 0, refused.stdout
    refused = host.run(f"ETCDCTL_API=3 etcdctl --dial-timeout=2s --command-timeout=3s --cacert={PKI}/ca.crt "
                       f"--endpoints=https://{target}:2379 get --prefix --keys-only /service/")
    assert refused.rc != 0 and "/service/grandmodel/leader" not in refused.stdout, refused.stdout
    assert "/service/grandmodel/leader" in host.check_output(f"{ETCDCTL} get --prefix --keys-only /service/")
    # The REST API: https only, verified against the internal CA and the member's address.
    plain = host.run(f"curl -sS -f -m 5 http://{target}:8008/patroni")
    assert plain.rc != 0 and "state" not in plain.stdout, (plain.stdout, plain.stderr)
    assert '"state"' in host.check_output(f"{curl} https://{target}:8008/patroni")
    # patronictl goes over TLS too (etcd with the client certificate, the REST API with the ctl section).
    assert "grandmodel" in host.check_output("runuser -u postgres -- patronictl -c /etc/patroni/config.yml list")


def test_bad_input_is_refused_with_what_to_fix_and_changes_nothing() -> None:
    config = "stat -c %Y /etc/patroni/config.yml"
    before = member(MEMBERS[0]).check_output(config)
    cases = [
        (["-e", "patroni_ttl=10"], "exceeds patroni_ttl (10): lower the first two or raise patroni_ttl"),
        (["-e", "grandmodel_environment=production", "-e", "patroni_min_members=5"],
         "production needs at least 5 Patroni members; the group db_ha has 3"),
        (["-e", "patroni_restapi_password=short"], "patroni_restapi_password not set or shorter than 16 characters"),
    ]
    for extra, message in cases:
        run = run_playbook("data_ha.yml", "--tags", "patroni_preflight", *extra)
        assert run.returncode != 0, run.stdout[-1500:]
        output = " ".join((run.stdout + run.stderr).split())
        assert message in output, output[-1500:]
    assert member(MEMBERS[0]).check_output(config) == before


def test_kill_9_of_the_leader_under_write_load_loses_no_acknowledged_commit() -> None:
    """playbooks/pg_failover_drill.yml kills the leader's Patroni unit (PostgreSQL included) with SIGKILL under a
    steady write load, keeps systemd from restarting it until a new leader serves writes, then brings it back as a
    replica; the client's own log of acknowledged commits is the count. Without the confirmation it refuses."""
    view = cluster()
    old = leader(view)
    assert old
    refused = run_playbook("pg_failover_drill.yml")
    said_refused = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode != 0 and "confirm with -e pg_failover_drill_confirm=grandmodel" in said_refused, \
        said_refused[-2000:]
    assert leader(cluster()) == old
    load = WriteLoad(writer_host(view), "ha-writer-failover")
    load.start(next_id(load.host))
    wait_for("steady acknowledged writes", lambda: len(load.acknowledged()) >= 50, 30)
    started = time.time()
    try:
        run = run_playbook("pg_failover_drill.yml", "-e", "pg_failover_drill_confirm=grandmodel")
        wait_for("writes acknowledged after the drill",
                 lambda: any(t > time.time() - 1 for _, t in load.acknowledged()), 30)
        time.sleep(1)
    finally:
        acked = load.stop()
    assert run.returncode == 0, run.stdout[-3000:]
    said = re.search(r"failover drill of grandmodel: leader (\S+) killed, (\S+) served writes ([0-9.]+) s later; "
                     r"\S+ streamed again as a replica ([0-9.]+) s after the kill", " ".join(run.stdout.split()))
    assert said, run.stdout[-3000:]
    killed, new = said.group(1), said.group(2)
    gap = longest_gap([a for a in acked if a[1] > started - 5])
    lost = lost_rows(load.host, acked)
    record(failover_kill9_seconds_without_writable_leader=round(gap, 2), failover_kill9_acknowledged=len(acked),
           failover_kill9_lost=len(lost), failover_kill9_new_leader=new,
           failover_drill_seconds_without_leader=float(said.group(3)),
           failover_old_leader_rejoin_seconds_after_kill=float(said.group(4)))
    assert killed == old and new != old and new in MEMBERS
    assert not lost, f"acknowledged commits missing after the failover: {lost[:20]}"
    assert gap < 30, f"{gap:.1f} s without a writable leader (target < 30 s)"
    view = cluster()
    assert leader(view) == new and old in streaming_replicas(view), view
    # systemd may restart it again: the drill's drop-in is gone
    assert not member(old).file("/run/systemd/system/patroni.service.d/grandmodel-failover-drill.conf").exists
    assert sql(old, "SELECT count(*) FROM ha_probe", port=5001)


def test_switchover_refuses_a_candidate_that_is_not_a_healthy_replica() -> None:
    before = leader(cluster())
    run = run_playbook("pg_switchover.yml", "-e", "patroni_switchover_candidate=gm-mol-ha-nonexistent")
    assert run.returncode != 0
    output = " ".join((run.stdout + run.stderr).split())
    refusal = "No switchover: the candidate gm-mol-ha-nonexistent is not among the healthy replicas"
    assert refusal in output, output[-2000:]
    assert leader(cluster()) == before


def test_switchover_playbook_moves_the_leader_with_a_short_gap() -> None:
    view = cluster()
    before = leader(view)
    load = WriteLoad(writer_host(view), "ha-writer-switchover")
    load.start(next_id(load.host))
    wait_for("steady acknowledged writes", lambda: len(load.acknowledged()) >= 50, 30)
    started = time.time()
    try:
        run = run_playbook("pg_switchover.yml")
        wait_for("writes after the switchover", lambda: any(t > time.time() - 1 for _, t in load.acknowledged()), 30)
        time.sleep(1)
    finally:
        acked = load.stop()
    assert run.returncode == 0, run.stdout[-3000:]
    after = leader(cluster())
    gap = longest_gap([a for a in acked if a[1] > started - 5])
    lost = lost_rows(load.host, acked)
    record(switchover_seconds_without_writable_leader=round(gap, 2), switchover_lost=len(lost),
           switchover_from=before, switchover_to=after)
    assert after and after != before
    assert not lost, lost[:20]
    assert gap < 15, f"{gap:.1f} s without a writable leader during a planned switchover"


def test_the_application_database_follows_the_leader_and_a_rerun_changes_nothing() -> None:
    # After the failover and the switchover above the leader is another member than at the first run: the
    # application's part of data_ha.yml runs there now, finds everything replicated, and changes nothing.
    now = leader(cluster())
    run = run_playbook("data_ha.yml", "--tags", "data_ha_application")
    assert run.returncode == 0, run.stdout[-3000:]
    recap = {line.split()[0]: line for line in run.stdout.splitlines() if "changed=" in line and " : ok=" in line}
    # The pgBackRest play's bookkeeping (tagged always) also lists the repository host: changed=0 there too.
    assert sorted(recap) == [*MEMBERS, "gm-mol-ha-repo"], run.stdout[-2000:]
    assert all("changed=0" in line for line in recap.values()), recap
    applied_on = {line.split("[")[1].split("]")[0] for line in run.stdout.splitlines()
                  if line.startswith(("ok: [", "changed: [")) and "=>" not in line}
    assert now in applied_on, run.stdout[-2000:]
    granted = [block for block in run.stdout.split("TASK [")
               if block.startswith("quantnova.grandmodel.postgresql : Ensure the application and read-only roles hold")]
    assert granted and all(f"[{now}]" in block for block in granted), granted
    assert all(f"[{other}]" not in block for block in granted for other in MEMBERS if other != now), granted
    record(application_rerun_leader=now)


def test_rolling_restart_restarts_every_member_and_the_leader_last() -> None:
    def started_at() -> dict[str, float]:
        return {n: float(member(n).check_output(
            "runuser -u postgres -- psql -X -At -c \"SELECT extract(epoch FROM pg_postmaster_start_time())\""))
            for n in MEMBERS}

    first_leader = leader(cluster())
    before = started_at()
    begun = time.monotonic()
    run = run_playbook("pg_rolling_restart.yml")
    assert run.returncode == 0, run.stdout[-3000:]
    record(rolling_restart_seconds=round(time.monotonic() - begun, 1))
    after = started_at()
    assert all(after[n] > before[n] for n in MEMBERS), (before, after)
    assert after[first_leader] == max(after.values()), "the first leader was not restarted last"
    view = cluster()
    assert leader(view) and leader(view) != first_leader
    wait_for("every replica streaming again", lambda: len(streaming_replicas(cluster())) == 2, 60)
