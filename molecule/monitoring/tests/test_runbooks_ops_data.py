"""security_incident's Redis and PostgreSQL rotation and maintenance's database part, against the scenario's real
PostgreSQL 15 and Redis 7 on gm-mol-monitoring-2, run as an operator runs them (ansible-playbook
playbooks/runbooks/<name>.yml).

Fixtures made here: a Redis ACL user and a PostgreSQL login role named as the application's (grandmodel_app) with a
password generated for this run, and a database with one table that has dead rows and one index never scanned.
Every verdict is read from the servers: a login with the old and the new password, pg_stat_activity,
pg_stat_user_tables.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import pytest
import testinfra
from test_runbooks_monitoring import finish, inventory, start_runbook

MONITORED = "gm-mol-monitoring-2"
USER = "grandmodel_app"
DB = "gm_ops_test"


def ephemeral(name: str) -> str:
    return (Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / name).read_text().strip()


@pytest.fixture(scope="module")
def monitored() -> Any:
    return testinfra.get_host(f"ansible://{MONITORED}", ansible_inventory=inventory())


def redis_login(monitored: Any, password: str) -> bool:
    out = monitored.run("redis-cli --no-auth-warning --user %s --pass %s PING", USER, password)
    return out.stdout.strip() == "PONG"


def pg_login(monitored: Any, password: str) -> bool:
    return monitored.run("PGPASSWORD=%s psql -X -h 127.0.0.1 -U %s -d postgres -Atc 'SELECT 1'", password, USER).rc == 0


def sql(monitored: Any, query: str, db: str = "postgres") -> str:
    return monitored.check_output("runuser -u postgres -- psql -X -q -A -t -v ON_ERROR_STOP=1 -d %s -c %s", db, query)


@pytest.fixture(scope="module")
def setup(monitored: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("ops-data")
    old = {"redis": "R" + secrets.token_hex(16), "postgresql": "P" + secrets.token_hex(16)}
    admin = ephemeral("redis_monitoring_password")
    # The ACL rules are arguments of their own: a bare > or ~* would be read by the shell.
    monitored.check_output("redis-cli --no-auth-warning -a %s ACL SETUSER %s reset on %s %s %s", admin, USER,
                           ">" + old["redis"], "~*", "+@all")
    sql(monitored, f"DROP DATABASE IF EXISTS {DB}")
    sql(monitored, f"DROP ROLE IF EXISTS {USER}")
    sql(monitored, f"CREATE ROLE {USER} LOGIN PASSWORD '{old['postgresql']}'")
    sql(monitored, f"CREATE DATABASE {DB}")
    sql(monitored, "CREATE TABLE quotes (id serial PRIMARY KEY, symbol text);"
                   " CREATE INDEX quotes_symbol ON quotes (symbol);"
                   " INSERT INTO quotes (symbol) SELECT 'S' || g FROM generate_series(1, 2000) g;"
                   " DELETE FROM quotes WHERE id % 2 = 0; SELECT pg_stat_force_next_flush()", DB)
    extra = work / "vars.json"
    extra.write_text(json.dumps({"redis_admin_user": "default", "redis_admin_password": admin, "redis_tls": False,
                                 "runbook_db_name": DB, "runbook_app_group": "nothing", "runbook_lb_group": "nothing"}))
    extra.chmod(0o600)
    return {"work": work, "old": old, "extra": ["-e", f"@{extra}"]}


def test_refusals_and_check_mode_change_nothing(monitored: Any, setup: dict[str, Any]) -> None:
    work: Path = setup["work"]
    vaulted = work / "vaulted.yml"
    vaulted.write_text("$ANSIBLE_VAULT;1.1;AES256\n6638\n")
    runs = {
        "vaulted": start_runbook("security_incident", work / "r1", *setup["extra"], "-e",
                                 json.dumps({"security_incident_rotate": ["redis", "postgresql"],
                                             "security_incident_vars_file": str(vaulted)})),
        "nowhere": start_runbook("security_incident", work / "r2", *setup["extra"], "-e",
                                 json.dumps({"security_incident_rotate": ["redis", "postgresql", "ssh"]})),
        "check": start_runbook("security_incident", work / "r3", "--check", *setup["extra"], "-e",
                               json.dumps({"security_incident_rotate": ["redis", "postgresql"],
                                           "security_incident_files": {"redis": str(work / "c-redis"),
                                                                              "postgresql": str(work / "c-pg")}})),
    }
    done = {name: finish(proc, work / name, "security_incident") for name, proc in runs.items()}
    flat = {name: " ".join(r["out"].split()) for name, r in done.items()}
    assert done["vaulted"]["rc"] != 0 and f"{vaulted} is vault-encrypted: decrypt it first" in flat["vaulted"], \
        flat["vaulted"][-1500:]
    refused = "security_incident_rotate must be a list of service_admin, redis, postgresql"
    assert done["nowhere"]["rc"] != 0 and refused in flat["nowhere"], flat["nowhere"][-1500:]
    assert done["check"]["rc"] == 0, done["check"]["out"][-3000:]
    assert "check mode: would generate new values for redis, postgresql" in flat["check"]
    assert vaulted.read_text().startswith("$ANSIBLE_VAULT") and not (work / "c-redis").exists()
    assert redis_login(monitored, setup["old"]["redis"]) and pg_login(monitored, setup["old"]["postgresql"])


def test_redis_and_postgresql_passwords_are_rotated(monitored: Any, setup: dict[str, Any]) -> None:
    work: Path = setup["work"]
    old = setup["old"]
    # A session opened with the old PostgreSQL password, which the rotation must close.
    monitored.run("PGPASSWORD=%s setsid nohup psql -X -h 127.0.0.1 -U %s -d postgres -c 'SELECT pg_sleep(120)' "
                  ">/dev/null 2>&1 &", old["postgresql"], USER)
    monitored.run(f"for i in $(seq 50); do [ \"$(runuser -u postgres -- psql -XAtc "
                  f"\"SELECT count(*) FROM pg_stat_activity WHERE usename = '{USER}'\")\" = 1 ] && break; "
                  "sleep 0.1; done")
    vars_file = work / "rotated.yml"
    vars_file.write_text("---\n# kept\nother_setting: 1\nredis_app_password: old-value\n")
    proc = start_runbook("security_incident", work / "reports", *setup["extra"], "-e", json.dumps({
        "security_incident_rotate": ["redis", "postgresql"], "security_incident_vars_file": str(vars_file),
        "security_incident_files": {"postgresql": str(work / "postgresql_app_password")}}))
    run = finish(proc, work / "reports", "security_incident")
    assert run["rc"] == 0, run["out"][-4000:]
    values = {k: v for k, v in (line.split(": ", 1) for line in vars_file.read_text().splitlines()[2:])}
    new = {"redis": values["redis_app_password"], "postgresql": values["postgresql_app_password"]}
    assert values["other_setting"] == "1" and vars_file.read_text().startswith("---\n# kept\n")
    assert (work / "postgresql_app_password").read_text().strip() == new["postgresql"]
    assert oct(vars_file.stat().st_mode & 0o777) == "0o600"
    assert all(len(v) == 40 and v not in old.values() for v in new.values()) and new["redis"] != new["postgresql"]
    # The servers: the old passwords are refused, the new ones accepted.
    assert not redis_login(monitored, old["redis"]) and redis_login(monitored, new["redis"])
    assert not pg_login(monitored, old["postgresql"]) and pg_login(monitored, new["postgresql"])
    sessions = f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{USER}' AND query LIKE '%pg_sleep%'"
    assert sql(monitored, sessions).strip() == "0"
    # Nothing prints a secret; the report says what to re-encrypt.
    report = run["report"]
    for text in (run["out"], json.dumps(report), (run["dir"] / "report.md").read_text()):
        assert not any(v in text for v in [*new.values(), *old.values()])
    assert report["re_encrypt"] == [f"ansible-vault encrypt {vars_file}"]
    assert report["plaintext_files"] == [str(work / "postgresql_app_password")]
    assert report["postgresql"][MONITORED]["sessions_closed"] == 1
    assert report["redis"][MONITORED]["persisted_in"] == "redis.conf (CONFIG REWRITE)"
    # Persisted: Redis restarted reads the new password from its configuration.
    monitored.check_output("systemctl restart redis-server")
    assert monitored.run("for i in $(seq 50); do redis-cli --no-auth-warning --user %s --pass %s PING | grep -q PONG "
                    "&& exit 0; sleep 0.1; done; exit 1", USER, new["redis"]).rc == 0


def test_maintenance_vacuums_and_analyses_and_reports_bloat_and_index_usage(monitored: Any,
                                                                           setup: dict[str, Any]) -> None:
    work: Path = setup["work"]
    stats = "SELECT coalesce(last_vacuum::text, '') || '|' || coalesce(last_analyze::text, '') FROM pg_stat_user_tables"
    assert sql(monitored, stats, DB).strip() == "|"
    check = finish(start_runbook("maintenance", work / "m-check", "--check", *setup["extra"]), work / "m-check",
                   "maintenance")
    assert check["rc"] == 0, check["out"][-3000:]
    assert "check mode: would" in " ".join(check["out"].split()) and sql(monitored, stats, DB).strip() == "|"
    run = finish(start_runbook("maintenance", work / "m", *setup["extra"]), work / "m", "maintenance")
    assert run["rc"] == 0, run["out"][-3000:]
    vacuum, analyze = sql(monitored, stats, DB).strip().split("|")
    assert vacuum and analyze, "last_vacuum / last_analyze were not set"
    db = run["report"]["databases"][MONITORED]
    (table,) = db["tables"]
    assert table["table_name"] == "public.quotes" and table["live_rows"] == 1000 and table["last_vacuum"]
    assert "public.quotes_symbol" in db["unused_indexes"]
    assert "public.quotes" in (run["dir"] / "report.md").read_text()


def test_cleanup(monitored: Any) -> None:
    sql(monitored, f"DROP DATABASE IF EXISTS {DB}")
    sql(monitored, f"DROP ROLE IF EXISTS {USER}")
    admin = ephemeral("redis_monitoring_password")
    monitored.check_output("redis-cli --no-auth-warning -a %s ACL DELUSER %s", admin, USER)
    monitored.check_output("redis-cli --no-auth-warning -a %s CONFIG REWRITE", admin)
