"""Verify the data tier on the converged hosts: real behaviour, not Ansible's word.

gm-mol-data-db carries PostgreSQL, TimescaleDB (extension switched off) and Redis under a
1 GiB / 1 CPU cgroup limit; gm-mol-data-client is an address outside the allowed network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

testinfra_hosts = ["ansible://gm-mol-data-db"]

SCENARIO_DIR = Path(__file__).resolve().parent.parent
REPO = SCENARIO_DIR.parent.parent
SECRETS = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent")) / "secrets"
DB = "grandmodel"
DB_HOST = "gm-mol-data-db"
PKI = "/etc/grandmodel/pki"
CA = f"{PKI}/ca.crt"
SOCKET = "/run/redis/redis-server.sock"


def secret(name: str) -> str:
    return (SECRETS / name).read_text().split()[0]


@pytest.fixture(scope="module")
def client(repo_host):
    """The client host: the same host as conftest's repository host (group clients and backup_repo)."""
    return repo_host


@pytest.fixture(scope="module")
def db_ip(host) -> str:
    return host.check_output("ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1")


def psql(host, sql: str, user: str = "grandmodel_app", password: str | None = None,
         hostname: str = "127.0.0.1", ssl: str = f"sslmode=verify-full sslrootcert={CA}"):
    """Run SQL as an application role over TCP with scram authentication, over TLS verified against the CA."""
    pw = {"grandmodel_app": "postgresql_app", "grandmodel_ro": "postgresql_ro"}[user]
    password = secret(pw) if password is None else password
    env = f"PGPASSWORD={password} " if password else ""
    return host.run(f"{env}psql -X -w -At -v ON_ERROR_STOP=1 "
                    f"'host={hostname} user={user} dbname={DB} {ssl}' -c \"{sql}\"")


def superuser(host, sql: str, db: str = DB) -> str:
    return host.check_output(f"runuser -u postgres -- psql -X -At -d {db} -c \"{sql}\"")


def redis(host, *args: str, user: str | None = "grandmodel_app"):
    auth = ""
    if user:
        pw = {"grandmodel_app": "redis_app", "grandmodel_admin": "redis_admin"}[user]
        auth = f"REDISCLI_AUTH={secret(pw)} "
    cmd = " ".join(args)
    return host.run(f"{auth}redis-cli -s {SOCKET} --no-auth-warning {'--user ' + user if user else ''} {cmd}")


# --- PostgreSQL -------------------------------------------------------------------------------

def test_postgresql_sized_from_the_cgroup_not_the_machine(host):
    # The container is limited to 1 GiB and 1 CPU while the machine has far more.
    assert superuser(host, "SHOW shared_buffers") == "256MB"
    assert superuser(host, "SHOW effective_cache_size") == "768MB"
    assert superuser(host, "SHOW maintenance_work_mem") == "64MB"
    assert superuser(host, "SHOW max_parallel_workers") == "1"
    assert superuser(host, "SHOW max_parallel_workers_per_gather") == "0"
    # An override from postgresql_settings wins over the role's value.
    assert superuser(host, "SHOW log_min_duration_statement") == "250ms"
    assert superuser(host, "SHOW password_encryption") == "scram-sha-256"
    assert superuser(host, "SHOW shared_preload_libraries") == "pg_stat_statements"
    assert superuser(host, "SELECT count(*) FROM pg_file_settings WHERE error IS NOT NULL") == "0"


def test_pg_hba_allows_scram_only_and_network_logins_over_tls_only(host):
    hba = host.file("/etc/postgresql/15/main/pg_hba.conf")
    assert hba.user == "postgres" and hba.mode == 0o640
    rules = [line.split() for line in hba.content_string.splitlines() if line.strip() and not line.startswith("#")]
    assert {rule[-1] for rule in rules} == {"peer", "scram-sha-256", "reject"}
    # Every network rule is hostssl, behind the two that reject TCP without TLS; local rules stay.
    network = [rule for rule in rules if rule[0] != "local"]
    assert [rule[0] for rule in network[:2]] == ["hostnossl", "hostnossl"]
    assert {rule[-1] for rule in network[:2]} == {"reject"}
    assert {rule[3] for rule in network[:2]} == {"0.0.0.0/0", "::/0"}
    assert {rule[0] for rule in network[2:]} == {"hostssl"}
    assert {rule[0] for rule in rules} == {"local", "hostnossl", "hostssl"}
    assert superuser(host, "SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL") == "0"
    assert superuser(host, "SELECT count(*) FROM pg_authid WHERE (rolname LIKE 'grandmodel_%' OR rolname = "
                           "'monitoring') AND rolpassword NOT LIKE 'SCRAM-SHA-256$%'") == "0"


def test_application_role_reads_and_writes_its_schemas(host):
    trade = uuid.uuid4()
    out = psql(host, "INSERT INTO trading.trades (trade_id, symbol, side, quantity, price, strategy, agent, "
                     f"executed_at) VALUES ('{trade}', 'ES', 'BUY', 2, 5000.25, 'momentum', 'tactical', now()) "
                     "RETURNING symbol")
    assert out.rc == 0, out.stderr
    assert psql(host, f"SELECT side FROM trading.trades WHERE trade_id = '{trade}'").stdout.strip() == "BUY"
    for sql in (
        "INSERT INTO analytics.performance_metrics (strategy, agent, period_start, period_end, sharpe_ratio) "
        "VALUES ('momentum', 'tactical', now() - interval '1 day', now(), 1.7)",
        "INSERT INTO monitoring.system_health (component, host, status) VALUES ('api', 'app1', 'healthy')",
        "INSERT INTO monitoring.deployments (release_id, service, version, environment, initiated_by) "
        f"VALUES ('{uuid.uuid4()}', 'model_service', '1.2.3', 'molecule', 'ci')",
        "UPDATE trading.positions SET updated_at = now() WHERE false",
        "INSERT INTO timeseries.market_data (time, symbol, close) VALUES (now(), 'ES', 5000.5)",
    ):
        result = psql(host, sql)
        assert result.rc == 0, f"{sql}: {result.stderr}"
    # The application role owns nothing and cannot change the schema.
    denied = psql(host, "CREATE TABLE trading.sneaky (id int)")
    assert denied.rc != 0 and "permission denied for schema trading" in denied.stderr


def test_readonly_role_reads_but_cannot_write(host):
    assert psql(host, "SELECT count(*) > 0 FROM trading.trades", user="grandmodel_ro").stdout.strip() == "t"
    assert psql(host, "SELECT count(*) FROM timeseries.market_data", user="grandmodel_ro").rc == 0
    for sql in ("INSERT INTO trading.positions (symbol, strategy, quantity, avg_price, opened_at) "
                "VALUES ('ES', 'x', 1, 1, now())",
                "DELETE FROM trading.trades",
                "INSERT INTO timeseries.market_data (time, symbol) VALUES (now(), 'NQ')"):
        result = psql(host, sql, user="grandmodel_ro")
        assert result.rc != 0 and "permission denied for table" in result.stderr, sql


def test_wrong_or_missing_password_is_refused(host):
    wrong = psql(host, "SELECT 1", password="not-the-password-" + secrets.token_hex(4))
    assert wrong.rc != 0 and 'password authentication failed for user "grandmodel_app"' in wrong.stderr
    missing = psql(host, "SELECT 1", password="")
    assert missing.rc != 0 and "no password supplied" in missing.stderr
    # The Unix socket asks for a password too (scram, not peer or trust).
    socket = host.run("runuser -u nobody -- psql -X -w -h /var/run/postgresql -U grandmodel_app "
                      "-d grandmodel -c 'SELECT 1'")
    assert socket.rc != 0 and "no password supplied" in socket.stderr


def test_pg_hba_refuses_an_address_outside_the_allowed_network(host, client, db_ip):
    # From the db host's own address (inside the allowed /32) the right password works ...
    assert psql(host, "SELECT current_user", hostname=db_ip).stdout.strip() == "grandmodel_app"
    # ... from the client container the same credentials are refused by pg_hba.
    assert client.run(f"timeout 5 bash -c '</dev/tcp/{db_ip}/5432'").rc == 0, "port must be reachable"
    refused = psql(client, "SELECT 1", hostname=db_ip, ssl="sslmode=require")
    client_ip = client.check_output("ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1")
    assert refused.rc != 0
    assert f'no pg_hba.conf entry for host "{client_ip}", user "grandmodel_app"' in refused.stderr


def test_migrations_are_recorded_and_applied_once(host):
    rows = superuser(host, "SELECT version || ':' || description FROM public.grandmodel_schema_migrations "
                           "ORDER BY version").splitlines()
    assert [r.split(":")[0] for r in rows] == ["T001", "V001", "V002", "V003", "V004"]
    # The migrations use plain CREATE statements: had the idempotence run replayed one it would
    # have failed. Every version was applied in the first converge only.
    assert superuser(host, "SELECT count(DISTINCT date_trunc('minute', applied_at)) <= 2 "
                           "FROM public.grandmodel_schema_migrations") == "t"
    tables = superuser(host, "SELECT string_agg(schemaname || '.' || tablename, ',' ORDER BY schemaname, tablename) "
                             "FROM pg_tables "
                             "WHERE schemaname IN ('trading', 'analytics', 'monitoring', 'timeseries')")
    assert tables.split(",") == sorted([
        "analytics.performance_metrics", "monitoring.deployments", "monitoring.system_health",
        "timeseries.market_data", "timeseries.system_metrics", "trading.positions", "trading.trades"])
    indexes = superuser(host, "SELECT count(*) FROM pg_indexes WHERE schemaname = 'trading'")
    assert int(indexes) >= 8


def test_pg_stat_statements_collects_queries(host):
    psql(host, "SELECT count(*) FROM trading.trades WHERE symbol = 'ES'")
    count = superuser(host, "SELECT count(*) FROM pg_stat_statements WHERE query LIKE '%FROM trading.trades%'")
    assert int(count) >= 1


def monitoring_psql(host, sql: str, db: str = "postgres", hostname: str = "127.0.0.1", password: str | None = None):
    """Run SQL as the exporter does: the monitoring login over TCP, TLS verified against the CA."""
    password = secret("postgresql_monitoring") if password is None else password
    return host.run(f"PGPASSWORD={password} psql -X -w -At -v ON_ERROR_STOP=1 "
                    f"'host={hostname} port=5432 dbname={db} user=monitoring sslmode=verify-full sslrootcert={CA}' "
                    f"-c \"{sql}\"")


def test_monitoring_login_reads_statistics_and_nothing_else(host, db_ip):
    # The role: LOGIN, member of pg_monitor only, no attributes, 3 connections, SCRAM verifier.
    assert superuser(host, "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, "
                           "rolbypassrls, rolconnlimit FROM pg_roles WHERE rolname = 'monitoring'") == "t|f|f|f|f|f|3"
    assert superuser(host, "SELECT string_agg(g.rolname, ',') FROM pg_auth_members m "
                           "JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member "
                           "WHERE u.rolname = 'monitoring'") == "pg_monitor"
    # What the exporter reads, where it connects (loopback, database postgres).
    assert monitoring_psql(host, "SELECT count(*) > 0 FROM pg_stat_database").stdout.strip() == "t"
    assert monitoring_psql(host, "SELECT count(*) >= 0 FROM pg_stat_activity, pg_settings").rc == 0
    psql(host, "SELECT count(*) FROM trading.trades WHERE symbol = 'MONITORED'")
    statements = monitoring_psql(host, "SELECT count(*) FROM pg_stat_statements WHERE query LIKE '%MONITORED%' "
                                       "OR query LIKE '%trading.trades WHERE symbol%'")
    assert statements.rc == 0 and int(statements.stdout) >= 1, statements.stderr
    # No writes, no application data: the application database refuses the connection outright.
    create = monitoring_psql(host, "CREATE TABLE public.sneaky (id int)")
    assert create.rc != 0 and "permission denied for schema public" in create.stderr
    trades = monitoring_psql(host, "SELECT count(*) FROM trading.trades", db=DB)
    assert trades.rc != 0 and f'permission denied for database "{DB}"' in trades.stderr
    wrong = monitoring_psql(host, "SELECT 1", password="wrong-" + secrets.token_hex(8))
    assert wrong.rc != 0 and 'password authentication failed for user "monitoring"' in wrong.stderr
    # Loopback only: from the host's own network address pg_hba has no rule for it.
    remote = monitoring_psql(host, "SELECT 1", hostname=db_ip)
    assert remote.rc != 0 and f'no pg_hba.conf entry for host "{db_ip}", user "monitoring"' in remote.stderr


# --- TimescaleDB (extension switched off: the vendor repository is unreachable here) -----------

def test_timescaledb_repository_configured_but_disabled(host):
    sources = host.file("/etc/apt/sources.list.d/timescaledb.sources")
    assert sources.mode == 0o644
    assert sources.contains("^URIs: https://packagecloud.io/timescale/timescaledb/debian/$")
    assert sources.contains("^Suites: bookworm$")
    assert sources.contains("^Signed-By: /etc/apt/keyrings/timescaledb.asc$")
    assert sources.contains("^Enabled: no$")
    # A disabled source must not break apt for the rest of the host.
    update = host.run("timeout 120 apt-get update -q")
    assert update.rc == 0 and "timescale" not in update.stdout + update.stderr


def test_timescaledb_preload_rendered_but_not_active(host):
    pending = host.file("/var/lib/postgresql/grandmodel-timescaledb/60-timescaledb.conf.pending")
    assert pending.contains("^shared_preload_libraries = 'pg_stat_statements,timescaledb'$")
    assert pending.contains("^timescaledb.telemetry_level = off$")
    assert not host.file("/etc/postgresql/15/main/conf.d/60-timescaledb.conf").exists
    assert "timescaledb" not in superuser(host, "SHOW shared_preload_libraries")


def test_timescaledb_sql_that_would_run(host):
    hyper = host.file("/var/lib/postgresql/grandmodel-timescaledb/T002__timescaledb_hypertables.sql").content_string
    assert "CREATE EXTENSION IF NOT EXISTS timescaledb;" in hyper
    assert "create_hypertable('timeseries.market_data', 'time'" in hyper
    assert "create_hypertable('timeseries.system_metrics', 'time'" in hyper
    assert "chunk_time_interval => INTERVAL '1 day'" in hyper
    policies = host.file("/var/lib/postgresql/grandmodel-timescaledb/T003__timescaledb_policies.sql").content_string
    assert policies.count("add_retention_policy(") == 2
    assert "INTERVAL '30 days'" in policies and "INTERVAL '7 days'" in policies
    # Not applied: only the plain tables migration is recorded.
    assert superuser(host, "SELECT count(*) FROM public.grandmodel_schema_migrations WHERE version LIKE 'T00%' "
                           "AND version <> 'T001'") == "0"


# --- Redis ------------------------------------------------------------------------------------

def test_redis_refuses_unauthenticated_clients(host):
    assert host.service("redis-server").is_running and host.service("redis-server").is_enabled
    ping = redis(host, "PING", user=None)
    assert "NOAUTH" in ping.stdout + ping.stderr
    default = host.run(f"redis-cli -s {SOCKET} --no-auth-warning --user default --pass anything PING")
    assert "WRONGPASS" in default.stdout + default.stderr or "AUTH failed" in default.stdout + default.stderr
    wrong = host.run(f"redis-cli -s {SOCKET} --no-auth-warning --user grandmodel_app --pass wrong-password PING")
    assert "WRONGPASS" in wrong.stdout + wrong.stderr or "AUTH failed" in wrong.stdout + wrong.stderr


def test_redis_app_user_works_but_dangerous_commands_are_denied(host):
    assert redis(host, "SET", "gm:probe", "42").stdout.strip() == "OK"
    assert redis(host, "GET", "gm:probe").stdout.strip() == "42"
    for command in ("FLUSHALL", "FLUSHDB", "CONFIG GET maxmemory", "KEYS '*'", "SHUTDOWN", "ACL LIST"):
        out = redis(host, command)
        assert "NOPERM" in out.stdout + out.stderr, command
    # DEBUG is refused twice over: the server disables it, and the ACL denies it to the app user.
    debug = redis(host, "DEBUG SLEEP 0")
    assert "DEBUG command not allowed" in debug.stdout + debug.stderr or "NOPERM" in debug.stdout
    dryrun = redis(host, "ACL DRYRUN grandmodel_app DEBUG SLEEP 0", user="grandmodel_admin")
    assert "no permissions to run the 'debug' command" in dryrun.stdout
    assert redis(host, "GET", "gm:probe").stdout.strip() == "42", "nothing was flushed"


def test_redis_monitoring_user_reads_server_statistics_only(host):
    def monitoring(command: str):
        out = host.run(f"REDISCLI_AUTH={secret('redis_monitoring')} redis-cli -s {SOCKET} --no-auth-warning "
                       f"--user monitoring {command}")
        return out.stdout + out.stderr

    assert monitoring("PING").strip() == "PONG"
    assert "redis_version:" in monitoring("INFO ALL")
    # The rest of what redis_exporter sends with its default flags.
    for command in ("CONFIG GET maxmemory", "SLOWLOG LEN", "SLOWLOG GET 1", "LATENCY LATEST", "CLIENT LIST",
                    "DBSIZE", "MEMORY STATS", "SELECT 0"):
        out = monitoring(command)
        assert "NOPERM" not in out and "ERR" not in out, f"{command}: {out}"
    # No keys, no writes, no administration.
    for command in ("GET gm:probe", "SET gm:monitoring 1", "DEL gm:probe", "FLUSHALL", "FLUSHDB",
                    "CONFIG SET maxmemory 1mb", "KEYS '*'", "SCAN 0", "ACL LIST", "SHUTDOWN NOSAVE"):
        assert "NOPERM" in monitoring(command), command
    assert redis(host, "CONFIG GET maxmemory", user="grandmodel_admin").stdout.split()[1] == str(16 * 1024 * 1024)
    assert secret("redis_monitoring") not in host.file("/etc/redis/users.acl").content_string


def test_redis_configuration_and_secrets_at_rest(host, db_ip):
    maxmemory = redis(host, "CONFIG GET maxmemory", user="grandmodel_admin").stdout.split()
    assert maxmemory == ["maxmemory", str(16 * 1024 * 1024)]
    policy = redis(host, "CONFIG GET maxmemory-policy", user="grandmodel_admin").stdout.split()
    assert policy == ["maxmemory-policy", "allkeys-lru"]
    assert redis(host, "CONFIG GET appendonly", user="grandmodel_admin").stdout.split() == ["appendonly", "yes"]
    acl = host.file("/etc/redis/users.acl")
    assert acl.user == "redis" and acl.mode == 0o640
    text = acl.content_string
    assert secret("redis_app") not in text and secret("redis_admin") not in text, "passwords stored hashed"
    assert text.startswith("user default off")
    # TLS only: nothing on the plaintext port, the TLS port on loopback and the scenario's host address.
    assert host.check_output("ss -Htln 'sport = :6379'") == ""
    listeners = host.check_output("ss -Htln 'sport = :6380' | awk '{print $4}'").split()
    assert set(listeners) == {"127.0.0.1:6380", "[::1]:6380", f"{db_ip}:6380"}


def test_redis_systemd_hardening(host):
    props = dict(line.split("=", 1) for line in host.check_output(
        "systemctl show redis-server -p ReadOnlyPaths -p ReadWritePaths -p ProtectSystem -p NoNewPrivileges "
        "-p User -p CapabilityBoundingSet").splitlines())
    assert props["User"] == "redis"
    assert props["ProtectSystem"] == "strict"
    assert props["NoNewPrivileges"] == "yes"
    assert "/etc/redis" in props["ReadOnlyPaths"]
    assert "/etc/redis" not in props["ReadWritePaths"]
    # The daemon really cannot persist a configuration change.
    rewrite = redis(host, "CONFIG REWRITE", user="grandmodel_admin")
    assert "ERR" in rewrite.stdout + rewrite.stderr


def test_redis_kernel_settings_skipped_in_a_container_with_the_reason(host):
    fact = json.loads(host.file("/etc/ansible/facts.d/grandmodel_redis.fact").content_string)
    assert fact["kernel_tuning"] == "skipped"
    assert "container" in fact["reason"] and "host kernel" in fact["reason"]
    assert not host.file("/etc/sysctl.d/60-grandmodel-redis.conf").exists
    assert not host.file("/etc/systemd/system/grandmodel-redis-thp.service").exists


def test_redis_keeps_data_across_a_restart(host):
    assert redis(host, "SET", "gm:durable", "survives").stdout.strip() == "OK"
    host.run_test("systemctl restart redis-server")
    host.run_test(f"timeout 20 sh -c 'until redis-cli -s {SOCKET} PING 2>&1 | grep -q NOAUTH; do sleep 0.2; done'")
    assert redis(host, "GET", "gm:durable").stdout.strip() == "survives"


# --- Backups ----------------------------------------------------------------------------------

def run_playbook(playbook: str, *extra: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(REPO / "playbooks" / playbook), *extra],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_backup_timers_are_scheduled(host):
    for unit in ("grandmodel-postgresql-backup.timer", "grandmodel-redis-backup.timer"):
        assert host.service(unit).is_enabled and host.service(unit).is_running, unit


def test_backup_destroy_restore_gives_identical_data(host):
    # Rows and keys that must survive.
    values = ",".join(
        f"('{uuid.uuid4()}', 'SYM{i}', '{'BUY' if i % 2 else 'SELL'}', {i + 1}, {100 + i}.5, 'restore', 'strategic', "
        f"now() - interval '{i} minutes')" for i in range(50))
    assert psql(host, "INSERT INTO trading.trades (trade_id, symbol, side, quantity, price, strategy, agent, "
                      f"executed_at) VALUES {values}").rc == 0
    fingerprint_sql = "SELECT count(*) || ':' || md5(string_agg(t::text, '|' ORDER BY id)) FROM trading.trades t"
    before = superuser(host, fingerprint_sql)
    for i in range(20):
        redis(host, "SET", f"gm:restore:{i}", f"value-{i}")
    redis_before = [redis(host, "GET", f"gm:restore:{i}").stdout.strip() for i in range(20)]
    # A stale dump beyond retention, which the next backup must remove.
    host.run_test("runuser -u postgres -- touch -d '10 days ago' "
                  "/var/backups/grandmodel/postgresql/grandmodel-20000101T000000Z.dump")

    run_playbook("backup.yml")
    dumps = host.check_output("ls /var/backups/grandmodel/postgresql").split()
    assert "grandmodel-20000101T000000Z.dump" not in dumps, "retention removed the old dump"
    assert any(d.endswith(".dump") for d in dumps)
    assert host.check_output("ls /var/backups/grandmodel/redis").split()

    # Destroy: the schema with the rows, and the whole Redis dataset.
    superuser(host, "DROP SCHEMA trading CASCADE")
    redis(host, "FLUSHALL", user="grandmodel_admin")
    assert redis(host, "GET", "gm:restore:0").stdout.strip() == ""

    run_playbook("restore.yml", "-e", f"restore_confirm={DB_HOST}")
    assert superuser(host, fingerprint_sql) == before
    assert [redis(host, "GET", f"gm:restore:{i}").stdout.strip() for i in range(20)] == redis_before
    # Grants came back with the restore: the application role writes again.
    assert psql(host, "UPDATE trading.trades SET pnl = 0 WHERE strategy = 'restore'").rc == 0


def test_redis_honours_maxmemory(host):
    # Write about 4x the 16 MiB ceiling in bounded batches; allkeys-lru must evict, not grow.
    host.run_test("python3 -c \"import sys; [sys.stdout.write('SET gm:fill:%d %s\\r\\n' % (i, 'x' * 1024)) "
                  "for i in range(60000)]\" > /tmp/fill.txt")
    fill = host.run(f"REDISCLI_AUTH={secret('redis_app')} timeout 60 redis-cli -s {SOCKET} --no-auth-warning "
                    "--user grandmodel_app --pipe < /tmp/fill.txt")
    assert fill.rc == 0, fill.stderr
    info = redis(host, "INFO", user="grandmodel_admin").stdout
    stats = dict(line.split(":", 1) for line in info.split("\r\n") if ":" in line)
    assert int(stats["evicted_keys"]) > 0
    assert int(stats["used_memory"]) <= 16 * 1024 * 1024 * 1.10
    assert int(stats["maxmemory"]) == 16 * 1024 * 1024


# --- Bad input --------------------------------------------------------------------------------

def _pw() -> str:
    return secrets.token_hex(12)


GOOD_PG = {"postgresql_app_password": "A" + _pw(), "postgresql_readonly_password": "B" + _pw()}
GOOD_REDIS = {"redis_admin_password": "A" + _pw(), "redis_app_password": "B" + _pw()}

BAD_INPUTS = {
    "pg-missing-passwords": ("postgresql", {},
                             "missing required arguments: postgresql_app_password, postgresql_readonly_password"),
    "pg-md5-in-hba": ("postgresql", {**GOOD_PG, "postgresql_hba_entries": [
        {"type": "host", "database": "all", "user": "all", "address": "10.0.0.0/8", "method": "md5"}]},
        "value of method must be one of: scram-sha-256, got: md5"),
    "pg-hba-without-address": ("postgresql", {**GOOD_PG, "postgresql_hba_entries": [
        {"type": "host", "database": "all", "user": "all"}]}, "needs address in CIDR notation"),
    "pg-short-password": ("postgresql", {"postgresql_app_password": "short", "postgresql_readonly_password": _pw()},
                          "must each be at least 12 characters"),
    "pg-bad-storage": ("postgresql", {**GOOD_PG, "postgresql_storage": "tape"},
                       "value of postgresql_storage must be one of: ssd, hdd, got: tape"),
    "pg-short-monitoring-password": ("postgresql", {**GOOD_PG, "postgresql_monitoring_password": "short"},
                                     "postgresql_monitoring_password must be at least 12 characters"),
    "redis-monitoring-user-default": ("redis", {**GOOD_REDIS, "redis_monitoring_user": "default"},
                                      "none may be 'default'"),
    "redis-missing-passwords": ("redis", {}, "missing required arguments: redis_admin_password, redis_app_password"),
    "redis-bad-policy": ("redis", {**GOOD_REDIS, "redis_maxmemory_policy": "evict-everything"},
                         "value of redis_maxmemory_policy must be one of"),
    "redis-bad-maxmemory": ("redis", {**GOOD_REDIS, "redis_maxmemory": "lots"}, "needs a size like 256mb"),
    "redis-app-rules-with-password": ("redis", {**GOOD_REDIS, "redis_app_acl_rules": "+@all nopass"},
                                      "may only hold key, channel and command rules"),
    "tsdb-bad-retention": ("timescaledb", {"timescaledb_retention": "forever"}, "is not an interval like"),
    "tsdb-without-postgresql": ("timescaledb", {}, "apply quantnova.grandmodel.postgresql first"),
    "pki-no-ca": ("pki", {"pki_ca_generate": False}, "pki needs a CA"),
    "pki-cert-without-name": ("pki", {"entry_point_under_test": "certificate"},
                              "pki_cert_name must be a plain file name such as 'postgresql' (got '')"),
    "pki-cert-path-as-name": ("pki", {"entry_point_under_test": "certificate", "pki_cert_name": "../../etc/shadow"},
                              "pki_cert_name must be a plain file name"),
    "pki-key-without-cert": ("pki", {"entry_point_under_test": "certificate", "pki_cert_name": "x",
                                     "pki_key_content": "not-a-key"}, "given together or not at all"),
    "pki-renewal-beyond-validity": ("pki", {"entry_point_under_test": "certificate", "pki_cert_name": "x",
                                            "pki_cert_renew_days": 400}, "must be below pki_cert_valid_days"),
    "redis-bad-tls-auth-clients": ("redis", {**GOOD_REDIS, "redis_tls_auth_clients": "sometimes"},
                                   "value of redis_tls_auth_clients must be one of"),
}


@pytest.fixture(scope="module")
def bad_input_runs() -> dict[str, subprocess.CompletedProcess[str]]:
    def run(case: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        role, extra_vars, _ = BAD_INPUTS[case]
        proc = subprocess.run(
            ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(SCENARIO_DIR / "invalid_input.yml"),
             "-e", json.dumps({"role_under_test": role, **extra_vars})],
            capture_output=True, text=True, timeout=300, check=False,
        )
        return case, proc

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, BAD_INPUTS))


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_rejected_with_a_clear_message(bad_input_runs, case):
    proc = bad_input_runs[case]
    output = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0, output
    assert BAD_INPUTS[case][2] in output, output
    # Nothing was installed on the client by a rejected run.
    assert "changed=0" in output, output


# --- Restores that cannot destroy data (issue 16, item 4) --------------------------------------

def playbook(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run a playbook against the scenario's inventory; the caller judges the outcome."""
    return subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(path), *extra],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )


def flat(proc: subprocess.CompletedProcess[str]) -> str:
    return " ".join((proc.stdout + proc.stderr).split())


def redis_state(host) -> tuple[int, str]:
    """Key count (DBSIZE, real redis-cli on the host) and a digest of every key with its value."""
    count = int(redis(host, "DBSIZE", user="grandmodel_admin").stdout.strip())
    keys = sorted(redis(host, "--scan", user="grandmodel_admin").stdout.split())
    values = redis(host, "MGET", *keys, user="grandmodel_admin").stdout if keys else ""
    fields = redis(host, "HGETALL", "gm:state:hash", user="grandmodel_admin").stdout
    return count, hashlib.sha256("\n".join([*keys, values, fields]).encode()).hexdigest()


TRADES_FINGERPRINT = ("SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY id)), '-') "
                      "FROM trading.trades t")


def write_redis_keys(host, prefix: str, count: int) -> None:
    pairs = " ".join(f"gm:{prefix}:{i} {prefix}-{i}" for i in range(count))
    assert redis(host, "MSET", pairs, user="grandmodel_admin").stdout.strip() == "OK"


@pytest.fixture(scope="module")
def restore_sources(host) -> dict[str, object]:
    """A known data set in a fresh backup (A), then a different live data set (B) with its digests."""
    redis(host, "FLUSHALL", user="grandmodel_admin")
    write_redis_keys(host, "state:a", 150)
    redis(host, "HSET", "gm:state:hash", "version", "a", "owner", "backup", user="grandmodel_admin")
    for unit in ("grandmodel-redis-backup", "grandmodel-postgresql-backup"):
        host.run_test(f"systemctl start {unit}.service")
    snapshot = host.check_output("ls -1 /var/backups/grandmodel/redis/redis-*.rdb | tail -n 1")
    dump = host.check_output(f"ls -1 /var/backups/grandmodel/postgresql/{DB}-*.dump | tail -n 1")
    redis_a, pg_a = redis_state(host), superuser(host, TRADES_FINGERPRINT)
    # B: more keys, a changed value, more rows.
    write_redis_keys(host, "state:b", 40)
    redis(host, "HSET", "gm:state:hash", "version", "b", user="grandmodel_admin")
    values = ",".join(f"('{uuid.uuid4()}', 'LIVE{i}', 'BUY', 1, 10.5, 'live', 'tactical', now())" for i in range(25))
    assert psql(host, "INSERT INTO trading.trades (trade_id, symbol, side, quantity, price, strategy, agent, "
                      f"executed_at) VALUES {values}").rc == 0
    aside = host.check_output("ls -1 /var/lib/redis/aside 2>/dev/null || true").split()
    safety = host.check_output("ls -1 /var/backups/grandmodel/postgresql-before-restore 2>/dev/null || true").split()
    # Hostile sources: a snapshot with one byte flipped in the middle, a text file, a directory.
    host.run_test(f"python3 -c \"import sys; b = bytearray(open('{snapshot}', 'rb').read()); "
                  "b[len(b) // 2] ^= 0xFF; open('/tmp/corrupt.rdb', 'wb').write(b)\"")
    host.run_test("printf 'these are my notes, not a snapshot\\n' > /tmp/notes.txt && chmod 0644 /tmp/notes.txt")
    return {"snapshot": snapshot, "dump": dump, "redis_a": redis_a, "pg_a": pg_a, "aside": aside, "safety": safety,
            "redis_b": redis_state(host), "pg_b": superuser(host, TRADES_FINGERPRINT)}


RESTORE = REPO / "playbooks" / "restore.yml"
CONFIRM = f"restore_confirm={DB_HOST}"
HOSTILE_RESTORES = {
    "redis-corrupt-snapshot": (["-e", "restore_targets=['redis']", "-e", CONFIRM,
                                "-e", "restore_redis_file=/tmp/corrupt.rdb"],
                               "redis-check-rdb rejects /tmp/corrupt.rdb"),
    "redis-text-file": (["-e", "restore_targets=['redis']", "-e", CONFIRM, "-e", "restore_redis_file=/tmp/notes.txt"],
                        "redis-check-rdb rejects /tmp/notes.txt"),
    "redis-directory": (["-e", "restore_targets=['redis']", "-e", CONFIRM, "-e", "restore_redis_file=/tmp"],
                        "/tmp is not a regular file"),
    "redis-missing-file": (["-e", "restore_targets=['redis']", "-e", CONFIRM,
                            "-e", "restore_redis_file=/tmp/no-such.rdb"], "/tmp/no-such.rdb does not exist"),
    "redis-unconfirmed": (["-e", "restore_targets=['redis']"],
                          f"Not confirmed: restoring Redis on {DB_HOST} replaces its live data set"),
    "redis-confirmed-for-another-host": (["-e", "restore_targets=['redis']", "-e", "restore_confirm=true"],
                                         f"To go ahead, pass -e restore_confirm={DB_HOST} (got 'true')"),
    "pg-text-file": (["-e", "restore_targets=['postgresql']", "-e", CONFIRM,
                      "-e", "restore_postgresql_file=/tmp/notes.txt"], "pg_restore --list rejects /tmp/notes.txt"),
    "pg-unconfirmed": (["-e", "restore_targets=['postgresql']"],
                       f"Not confirmed: restoring {DB} on {DB_HOST} replaces its live data"),
    "rollback-unconfirmed": (["-e", "restore_rollback=true"], f"Not confirmed: rolling back {DB} on {DB_HOST}"),
}


@pytest.fixture(scope="module")
def hostile_restores(host, restore_sources) -> dict[str, tuple[subprocess.CompletedProcess[str], int]]:
    """Every hostile restore, five at a time (each must fail before it touches anything), with the key count
    (DBSIZE) right after it; then the whole state once, since nothing else runs meanwhile."""
    started = host.check_output("systemctl show redis-server -p ExecMainStartTimestampMonotonic")

    def run(case: str) -> tuple[str, tuple[subprocess.CompletedProcess[str], int]]:
        proc = playbook(RESTORE, *HOSTILE_RESTORES[case][0])
        return case, (proc, int(redis(host, "DBSIZE", user="grandmodel_admin").stdout.strip()))

    with ThreadPoolExecutor(max_workers=5) as pool:
        results = dict(pool.map(run, HOSTILE_RESTORES))
    # Real redis-cli on the host: the same keys and values as before, PostgreSQL untouched, Redis never
    # stopped (the same process start), no aside directory.
    assert redis_state(host) == restore_sources["redis_b"]
    assert superuser(host, TRADES_FINGERPRINT) == restore_sources["pg_b"]
    assert host.check_output("systemctl show redis-server -p ExecMainStartTimestampMonotonic") == started
    assert host.check_output("ls -1 /var/lib/redis/aside 2>/dev/null || true").split() == restore_sources["aside"]
    return results


@pytest.mark.parametrize("case", list(HOSTILE_RESTORES))
def test_hostile_restore_fails_clearly_and_changes_nothing(restore_sources, hostile_restores, case):
    proc, keys_after = hostile_restores[case]
    output = flat(proc)
    assert proc.returncode != 0, output[-2000:]
    assert HOSTILE_RESTORES[case][1] in output, output[-2000:]
    assert "Nothing was changed" in output, output[-2000:]
    assert keys_after == restore_sources["redis_b"][0]


def test_restore_failing_after_the_stop_puts_the_old_data_back(host, restore_sources, hostile_restores):
    # A fault at the end: Redis comes up on the snapshot but never answers the restore's readiness check
    # (the inventory's admin password does not match the host's ACL file here).
    proc = playbook(RESTORE, "-e", "restore_targets=['redis']", "-e", CONFIRM,
                    "-e", f"restore_redis_file={restore_sources['snapshot']}",
                    "-e", "redis_admin_password=not-the-admin-password", "-e", "redis_restore_ready_timeout=1")
    output = flat(proc)
    assert proc.returncode != 0, output[-2000:]
    assert "The old data set was put back and Redis was started on it again" in output, output[-2000:]
    assert host.service("redis-server").is_running
    assert redis_state(host) == restore_sources["redis_b"]
    assert host.check_output("ls -1A /var/lib/redis/aside").split() == restore_sources["aside"], "nothing half-done"


def test_good_restore_keeps_the_old_data_aside_and_rolls_back(host, restore_sources, hostile_restores):
    proc = playbook(RESTORE, "-e", CONFIRM, "-e", f"restore_redis_file={restore_sources['snapshot']}",
                    "-e", f"restore_postgresql_file={restore_sources['dump']}")
    assert proc.returncode == 0, flat(proc)[-3000:]
    assert redis_state(host) == restore_sources["redis_a"]
    assert superuser(host, TRADES_FINGERPRINT) == restore_sources["pg_a"]
    aside = sorted(set(host.check_output("ls -1 /var/lib/redis/aside").split()) - set(restore_sources["aside"]))
    assert len(aside) == 1 and host.file(f"/var/lib/redis/aside/{aside[0]}/appendonlydir").is_directory
    safety = sorted(set(host.check_output("ls -1 /var/backups/grandmodel/postgresql-before-restore").split())
                    - set(restore_sources["safety"]))
    assert len(safety) == 1 and safety[0].startswith(f"{DB}-before-restore-") and safety[0].endswith(".dump")

    rollback = playbook(REPO / "playbooks" / "restore_rollback.yml", "-e", CONFIRM)
    assert rollback.returncode == 0, flat(rollback)[-3000:]
    # Exactly the data from before the restore, key for key and row for row.
    assert redis_state(host) == restore_sources["redis_b"]
    assert superuser(host, TRADES_FINGERPRINT) == restore_sources["pg_b"]
    # The restored data is kept in turn: running the rollback again would undo it.
    assert len(host.check_output("ls -1 /var/lib/redis/aside").split()) == len(restore_sources["aside"]) + 1
    assert len(host.check_output("ls -1 /var/backups/grandmodel/postgresql-before-restore").split()) == len(
        restore_sources["safety"]) + 2
    assert psql(host, "UPDATE trading.trades SET pnl = 0 WHERE strategy = 'live'").rc == 0


# --- No surprise restarts (issue 16, item 5) ---------------------------------------------------

SETTINGS = SCENARIO_DIR / "postgresql_settings.yml"


def converge_postgresql(extra_vars: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """The postgresql role's sizing, configuration and service steps (install, roles, schema and backups,
    which the memory does not touch, are skipped to save time; the idempotence step covers them)."""
    return playbook(SETTINGS, "--skip-tags", "postgresql_install,postgresql_access,postgresql_schema,postgresql_backup",
                    "-e", json.dumps(extra_vars))


def postmaster_start(host) -> str:
    return superuser(host, "SELECT pg_postmaster_start_time()")


def recap_changed(proc: subprocess.CompletedProcess[str]) -> int:
    line = next(line for line in proc.stdout.splitlines() if line.startswith(DB_HOST) and "changed=" in line)
    return int(line.split("changed=")[1].split()[0])


def pending_fact(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The fact postgresql_pending_restart, as postgresql_settings.yml prints it."""
    found = re.search(r"pending_restart=(\[[^\]]*\])", proc.stdout)
    assert found, proc.stdout[-3000:]
    return json.loads(found.group(1).replace('\\"', '"'))


def test_a_few_mib_less_memory_changes_nothing_and_restarts_nothing(host):
    started = postmaster_start(host)
    # 1024 MiB is the cgroup limit: 3 MiB less would round down to 960 without the kept basis.
    proc = converge_postgresql({"postgresql_memory_mb": 1021})
    assert proc.returncode == 0, flat(proc)[-3000:]
    assert recap_changed(proc) == 0, flat(proc)[-3000:]
    assert pending_fact(proc) == []
    assert "PostgreSQL sized for 1024 MiB (memory 1021 MiB, step 64 MiB)" in flat(proc)
    assert postmaster_start(host) == started
    assert superuser(host, "SHOW shared_buffers") == "256MB"


def test_a_change_that_needs_a_restart_waits_until_allowed(host):
    started = postmaster_start(host)
    proc = converge_postgresql({"postgresql_memory_mb": 2048})
    assert proc.returncode == 0, flat(proc)[-3000:]
    assert recap_changed(proc) >= 1
    assert "shared_buffers" in pending_fact(proc) and "wait for a restart" in flat(proc)
    # Written and reloaded, not restarted: reloadable sizes are live, shared_buffers waits.
    assert postmaster_start(host) == started
    assert superuser(host, "SHOW shared_buffers") == "256MB"
    assert superuser(host, "SHOW effective_cache_size") == "1536MB"
    assert "shared_buffers" in superuser(host, "SELECT string_agg(name, ',') FROM pg_settings WHERE pending_restart")

    allowed = converge_postgresql({"postgresql_memory_mb": 2048, "postgresql_allow_restart": True})
    assert allowed.returncode == 0, flat(allowed)[-3000:]
    assert pending_fact(allowed) == []
    assert postmaster_start(host) != started
    assert superuser(host, "SHOW shared_buffers") == "512MB"
    assert superuser(host, "SELECT count(*) FROM pg_settings WHERE pending_restart") == "0"


# --- Encrypted data paths (issue 17, item 3) ---------------------------------------------------

@pytest.fixture(scope="module")
def client_ip(client) -> str:
    return client.check_output("ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1")


@pytest.fixture(scope="module")
def client_cas(host, client) -> tuple[str, str]:
    """The run's CA certificate on the client (as any client is given it) and an impostor CA of the same name."""
    good, wrong = "/tmp/gm-ca.crt", "/tmp/gm-wrong-ca.crt"
    client.run_test(f"printf '%s\\n' '{host.file(CA).content_string.strip()}' > {good}")
    client.run_test("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 "
                    f"-subj '/CN=GrandModel internal CA' -keyout /tmp/gm-wrong-ca.key -out {wrong}")
    return good, wrong


def test_certificates_keys_stay_on_the_host_and_chain_to_the_ca(host, db_ip):
    assert sorted(host.check_output(f"ls -1 {PKI}").split()) == [
        "ca.crt", "pgbackrest.crt", "pgbackrest.key", "postgresql.crt", "postgresql.key", "redis.crt", "redis.key"]
    for name, owner in (("postgresql", "postgres"), ("redis", "redis"), ("pgbackrest", "postgres")):
        key, cert = host.file(f"{PKI}/{name}.key"), host.file(f"{PKI}/{name}.crt")
        assert (key.user, key.group, key.mode) == (owner, owner, 0o600), name
        assert (cert.user, cert.mode) == (owner, 0o644), name
        assert host.check_output(f"openssl verify -CAfile {CA} {PKI}/{name}.crt") == f"{PKI}/{name}.crt: OK"
        # The certificate is for the key made on the host.
        assert host.check_output(f"openssl x509 -noout -pubkey -in {PKI}/{name}.crt") == host.check_output(
            f"openssl pkey -pubout -in {PKI}/{name}.key")
        sans = host.check_output(f"openssl x509 -noout -ext subjectAltName -in {PKI}/{name}.crt")
        for san in ("DNS:gm-mol-data-db", "DNS:localhost", "IP Address:127.0.0.1", f"IP Address:{db_ip}"):
            assert san in sans, f"{name}: {san} not in {sans}"
    ca = host.file(CA)
    assert (ca.user, ca.mode) == ("root", 0o644)
    assert "CA:TRUE" in host.check_output(f"openssl x509 -noout -ext basicConstraints -in {CA}")
    # The controller holds the CA and nothing of the hosts' keys; the CA key is for root only.
    controller = SECRETS / "pki"
    assert sorted(p.name for p in controller.iterdir()) == ["ca.crt", "ca.key"]
    assert (controller / "ca.key").stat().st_mode & 0o777 == 0o600
    assert host.file(CA).content_string.strip() == (controller / "ca.crt").read_text().strip()


def test_postgresql_refuses_plaintext_from_the_client(client, db_ip, client_ip):
    plain = psql(client, "SELECT 1", user="grandmodel_ro", hostname=db_ip, ssl="sslmode=disable")
    assert plain.rc != 0
    assert (f'pg_hba.conf rejects connection for host "{client_ip}", user "grandmodel_ro", database "{DB}", '
            "no encryption") in plain.stderr, plain.stderr
    # The application role has no rule from the client's address, with or without TLS.
    app = psql(client, "SELECT 1", hostname=db_ip, ssl="sslmode=disable")
    assert app.rc != 0 and "rejects connection" in app.stderr and "no encryption" in app.stderr


def test_postgresql_accepts_verify_full_and_refuses_a_wrong_ca_or_name(client, client_cas, db_ip):
    good, wrong = client_cas
    ok = psql(client, "SELECT ssl || ':' || version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
              user="grandmodel_ro", hostname=db_ip, ssl=f"sslmode=verify-full sslrootcert={good}")
    assert ok.rc == 0, ok.stderr
    assert ok.stdout.strip() == "true:TLSv1.3"
    impostor = psql(client, "SELECT 1", user="grandmodel_ro", hostname=db_ip,
                    ssl=f"sslmode=verify-full sslrootcert={wrong}")
    assert impostor.rc != 0 and "certificate verify failed" in impostor.stderr, impostor.stderr
    # The right CA but a name the certificate does not carry.
    name = psql(client, "SELECT 1", user="grandmodel_ro", hostname=f"db.grandmodel.invalid hostaddr={db_ip}",
                ssl=f"sslmode=verify-full sslrootcert={good}")
    assert name.rc != 0 and 'does not match host name "db.grandmodel.invalid"' in name.stderr, name.stderr


def test_redis_refuses_plaintext_from_the_client_and_answers_over_tls(client, client_cas, db_ip):
    good, wrong = client_cas
    auth = (f"REDISCLI_AUTH={secret('redis_app')} timeout 10 redis-cli --no-auth-warning --user grandmodel_app "
            f"-h {db_ip}")
    # No plaintext port at all, and the TLS port does not speak plaintext.
    closed = client.run(f"{auth} -p 6379 PING")
    assert "Connection refused" in closed.stdout + closed.stderr, closed.stdout + closed.stderr
    plain = client.run(f"{auth} -p 6380 PING")
    assert "PONG" not in plain.stdout, plain.stdout
    # TLS verified against the CA, with the password: the application user reads and writes.
    tls = f"{auth} -p 6380 --tls --cacert {good}"
    assert client.run(f"{tls} SET gm:tls:probe over-tls").stdout.strip() == "OK"
    assert client.run(f"{tls} GET gm:tls:probe").stdout.strip() == "over-tls"
    anonymous = client.run(f"timeout 10 redis-cli -h {db_ip} -p 6380 --tls --cacert {good} PING")
    assert "NOAUTH" in anonymous.stdout + anonymous.stderr
    impostor = client.run(f"{auth} -p 6380 --tls --cacert {wrong} PING")
    assert "PONG" not in impostor.stdout and "certificate verify failed" in impostor.stdout + impostor.stderr, (
        impostor.stdout + impostor.stderr)


def test_certificate_renewal_reissues_on_new_names_and_in_the_window(host):
    proc = playbook(SCENARIO_DIR / "pki_renewal.yml")
    assert proc.returncode == 0, flat(proc)[-3000:]
    steps = json.loads(re.search(r"pki_steps=(\[.*?\])\"", proc.stdout).group(1).replace('\\"', '"'))
    assert [step["changed"] for step in steps] == [True, True, True], steps
    assert len({step["serial"] for step in steps}) == 3, steps
    assert len({step["key"] for step in steps}) == 1, "the host's key was kept through every re-issue"
    probe = f"openssl x509 -noout -in {PKI}/probe.crt"
    assert "DNS:probe.grandmodel.test" in host.check_output(f"{probe} -ext subjectAltName")
    # Renewed for a year: it does not end within the next 300 days; still for the key made at the start.
    assert host.run(f"{probe} -checkend {300 * 86400}").rc == 0
    assert host.check_output(f"{probe} -pubkey") == host.check_output(f"openssl pkey -pubout -in {PKI}/probe.key")
    host.run_test(f"rm -f {PKI}/probe.crt {PKI}/probe.key")


def test_exporters_read_the_servers_over_verified_tls(host):
    settings = host.file("/etc/default/prometheus-postgres-exporter").content_string
    assert f"sslmode=verify-full&sslrootcert={CA}" in settings
    assert "rediss://127.0.0.1:6380" in host.file("/etc/default/prometheus-redis-exporter").content_string
    # Both exporters are up: they reached their server, which takes TCP logins over TLS only.
    metrics = host.check_output("timeout 20 sh -c 'until curl -fsS http://127.0.0.1:9187/metrics | grep -qx "
                                "\"pg_up 1\"; do sleep 1; done; curl -fsS http://127.0.0.1:9121/metrics'")
    assert re.search(r"^redis_up 1$", metrics, re.M), "redis exporter is not up"
