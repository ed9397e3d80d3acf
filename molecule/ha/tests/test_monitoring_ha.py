"""The highly available data tier as Prometheus sees it (playbooks/monitoring.yml; Prometheus and Alertmanager on
the repository host): every member's exporters and Patroni's metrics are scraped, every metric the data tier's
alerts read exists, and real faults - a paused cluster, a replica whose replay hangs, WAL archiving that fails,
a repository pgBackRest cannot read - fire their alerts, which clear when the fault is gone. The scenario shortens
every alert's `for:` to 4 s (monitoring_alert_for_override); the monitoring role's rule unit tests prove the real
durations."""

from __future__ import annotations

import json
import re
import shlex
import time
from typing import Any

import yaml
from conftest import MEMBERS, REPO, REPO_HOST, cluster, leader, member, record, roles, secret, wait_for

RULES = REPO / "roles/monitoring/files/rules/grandmodel-datastores.yml"
PKI_CA = "/etc/grandmodel/pki/ca.crt"
PROMETHEUS = "https://127.0.0.1:9090"
# The data tier's alerts that depend on nothing but the data tier's state.
DATA_TIER_ALERTS = {"PostgresWalArchivingFailing", "PatroniClusterWithoutLeader", "PatroniPostgresNotRunning",
                    "PatroniReplicationLag", "PatroniPaused", "PatroniPendingRestart", "PgBackRestBackupTooOld",
                    "PgBackRestFullBackupTooOld", "PgBackRestRepositoryUnhealthy", "PgBackRestMetricsFailing",
                    "RedisWithoutMaster", "RedisMoreThanOneMaster", "RedisReplicaLinkDown"}


def api(path: str, **params: str) -> Any:
    """Prometheus' HTTP API on the repository host (https, basic auth), as its data."""
    query = " ".join(f"--data-urlencode {shlex.quote(f'{key}={value}')}" for key, value in params.items())
    login = shlex.quote("grandmodel:" + secret("monitoring_web_password"))
    out = member(REPO_HOST).check_output(
        f"curl -sS --fail --max-time 10 --cacert {PKI_CA} -u {login} -G {PROMETHEUS}{path} {query}")
    return json.loads(out)["data"]


def query(expression: str) -> list[dict[str, Any]]:
    return list(api("/api/v1/query", query=expression)["result"])


def active(name: str | None = None) -> list[dict[str, Any]]:
    """The alerts Prometheus holds now (pending or firing), of one name or of the data tier."""
    names = {name} if name else DATA_TIER_ALERTS
    return [a for a in api("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] in names]


def firing(name: str, **labels: str) -> list[dict[str, Any]]:
    return [a for a in active(name) if a["state"] == "firing"
            and all(a["labels"].get(key) == value for key, value in labels.items())]


def wait_firing(name: str, timeout: float, **labels: str) -> float:
    """Seconds until the alert fires (with those labels)."""
    start = time.monotonic()
    wait_for(f"{name} {labels} to fire", lambda: firing(name, **labels), timeout, interval=1)
    return round(time.monotonic() - start, 1)


def wait_cleared(name: str, timeout: float) -> float:
    start = time.monotonic()
    wait_for(f"{name} to clear", lambda: not active(name), timeout, interval=1)
    return round(time.monotonic() - start, 1)


def rule_metrics() -> set[str]:
    """Every metric name the data tier's rules read (the expressions of the data-ha group and of the archiving
    rule)."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    exprs = " ".join(rule["expr"] for group in groups for rule in group["rules"]
                     if group["name"] == "grandmodel-data-ha-alerts" or rule.get("alert") in DATA_TIER_ALERTS)
    return set(re.findall(r"\b((?:patroni|pg_stat_archiver|grandmodel_pgbackrest|redis_master|redis_instance)"
                          r"_[a-z_]+)\b", exprs))


def test_every_member_is_scraped_every_metric_the_alerts_read_exists_and_the_tier_is_quiet() -> None:
    def targets_up() -> bool:
        found: dict[str, list[str]] = {}
        for target in api("/api/v1/targets")["activeTargets"]:
            if target["health"] == "up":
                found.setdefault(target["labels"]["job"], []).append(target["labels"]["instance"])
        wanted = {"patroni": 3, "postgres_ha": 3, "redis_ha": 3, "node": 4}
        missing = {job: count for job, count in wanted.items() if len(found.get(job, [])) != count}
        assert not missing, f"jobs without all their targets up: {missing}; up: {found}"
        return True

    wait_for("every data-tier target up", targets_up, 90, interval=2)
    names = rule_metrics()
    assert {"patroni_primary", "patroni_xlog_replayed_location", "pg_stat_archiver_failed_count",
            "grandmodel_pgbackrest_repo_status_code", "redis_master_link_up"} <= names
    absent = sorted(name for name in names if not query(f"count({name})"))
    assert not absent, f"metrics the alert rules read that Prometheus does not have: {absent}"
    # The figures are the cluster's: one leader, two replicas, one Redis master.
    view = cluster()
    primaries = {r["metric"]["instance"].split(":")[0]: r["value"][1] for r in query("patroni_primary")}
    assert sorted(primaries.values()) == ["0", "0", "1"], primaries
    assert query('count(redis_instance_info{job="redis_ha", role="master"})')[0]["value"][1] == "1"
    # pgBackRest's metrics say what pgbackrest info says.
    info = json.loads(member(REPO_HOST).check_output(
        "runuser -u pgbackrest -- pgbackrest --output=json --log-level-file=off info"))
    newest_full = max(b["timestamp"]["stop"] for b in info[0]["backup"] if b["type"] == "full")
    metric = query('grandmodel_pgbackrest_backup_last_completed_timestamp_seconds{type="full", repo="1"}')
    assert int(float(metric[0]["value"][1])) == newest_full, (metric, newest_full)
    assert query("grandmodel_pgbackrest_info_success")[0]["value"][1] == "1"
    assert [r["value"][1] for r in query("grandmodel_pgbackrest_repo_status_code")] == ["0"]
    # Quiet: no data-tier alert (a leader change by an earlier test is news, not a fault).
    wait_for("no data-tier alert", lambda: not active() or AssertionError(active()), 60, interval=2)
    record(monitoring_leader=leader(view), monitoring_roles=roles(view))


def test_a_paused_cluster_and_a_replica_whose_replay_hangs_fire_their_alerts_and_clear() -> None:
    view = cluster()
    first = leader(view)
    assert first, view
    ctl = "runuser -u postgres -- patronictl -c /etc/patroni/config.yml"
    host = member(first)
    host.check_output(f"{ctl} pause --wait")
    try:
        paused = wait_firing("PatroniPaused", 60)
    finally:
        host.check_output(f"{ctl} resume --wait")
    wait_cleared("PatroniPaused", 60)

    # A replica whose recovery process hangs (SIGSTOP; Patroni resumes a replay paused with
    # pg_wal_replay_pause() within a loop, so that is no fault): WAL still arrives, nothing is replayed.
    replica = next(name for name in MEMBERS if name != first)
    local = "runuser -u postgres -- psql -X -At -v ON_ERROR_STOP=1 -c"
    startup = member(replica).check_output("pgrep -f '^postgres: .*: startup'").split()[0]
    member(replica).check_output(f"kill -STOP {startup}")
    try:
        # Eight WAL segments' switches (16 MiB each) with a write between: over the 64 MiB of the alert.
        for _ in range(8):
            member(first).check_output(local + " " + shlex.quote(
                "CREATE TABLE IF NOT EXISTS monitoring_lag_probe (at timestamptz); "
                "INSERT INTO monitoring_lag_probe VALUES (now()); SELECT pg_switch_wal()"))
        lagging = wait_firing("PatroniReplicationLag", 60, instance=f"{replica}:9547")
    finally:
        member(replica).check_output(f"kill -CONT {startup}")
    cleared = wait_cleared("PatroniReplicationLag", 60)
    member(first).check_output(f"{local} {shlex.quote('DROP TABLE IF EXISTS monitoring_lag_probe')}")
    record(monitoring_paused_fired_s=paused, monitoring_lag_fired_s=lagging, monitoring_lag_cleared_s=cleared)
    print(f"\nPatroniPaused fired {paused} s after the pause; PatroniReplicationLag fired {lagging} s after the "
          f"WAL switches and cleared {cleared} s after the hung replay went on")


def test_failing_wal_archiving_and_an_unreadable_repository_fire_their_alerts_and_clear() -> None:
    first = leader(cluster())
    assert first
    repo = member(REPO_HOST)
    local = "runuser -u postgres -- psql -X -At -v ON_ERROR_STOP=1 -c"
    # The repository's archive unwritable for pgBackRest's server (a full or read-only volume acts the same): every
    # archive-push fails at once. (A stopped server was tried first: pgBackRest then takes about two minutes to
    # give up on each attempt, and the alert fired only after 128 s.)
    archive_dir = "/var/lib/pgbackrest/archive/grandmodel"
    repo.check_output(f"chmod 000 {archive_dir}")
    try:
        member(first).check_output(local + " " + shlex.quote(
            "CREATE TABLE IF NOT EXISTS monitoring_archive_probe (at timestamptz); "
            "INSERT INTO monitoring_archive_probe VALUES (now()); SELECT pg_switch_wal()"))
        archiving = wait_firing("PostgresWalArchivingFailing", 180, instance=f"{first}:9187")
        failed = int(member(first).check_output(f"{local} 'SELECT failed_count FROM pg_stat_archiver'"))
        assert failed > 0
    finally:
        repo.check_output(f"chmod 750 {archive_dir}")
    archived = wait_cleared("PostgresWalArchivingFailing", 180)
    member(first).check_output(f"{local} {shlex.quote('DROP TABLE IF EXISTS monitoring_archive_probe')}")
    # The failures were this test's own: the archiver's counters are reset so that test_pgbackrest_ha's check that no
    # member failed to archive since the repository exists keeps meaning "no failure nobody caused".
    reset = "SELECT pg_stat_reset_shared('archiver')"
    member(first).check_output(f"{local} {shlex.quote(reset)}")

    # The repository's stanza directory unreadable for pgBackRest (a bad restore of the host, a wrong chmod).
    stanza_dir = "/var/lib/pgbackrest/backup/grandmodel"
    repo.check_output(f"chmod 000 {stanza_dir}")
    try:
        repo.check_output("systemctl start grandmodel-pgbackrest-metrics.service")
        text = repo.check_output("cat /var/lib/prometheus/node-exporter/grandmodel-pgbackrest.prom")
        assert re.search(r"^grandmodel_pgbackrest_(info_success 0|repo_status_code\{.*\} [1-9])", text, re.M), text
        alert = "PgBackRestMetricsFailing" if "info_success 0" in text else "PgBackRestRepositoryUnhealthy"
        blind = wait_firing(alert, 60)
    finally:
        repo.check_output(f"chmod 750 {stanza_dir}")
    repo.check_output("systemctl start grandmodel-pgbackrest-metrics.service")
    wait_for("the repository's alerts to clear",
             lambda: not active("PgBackRestMetricsFailing") and not active("PgBackRestRepositoryUnhealthy"), 60)
    record(monitoring_archiving_fired_s=archiving, monitoring_archiving_cleared_s=archived,
           monitoring_repository_fired_s=blind)
    print(f"\nPostgresWalArchivingFailing fired {archiving} s after the WAL switch with the repository's archive "
          f"unwritable ({failed} failed attempts) and cleared {archived} s after it was writable again; the "
          f"unreadable repository fired {alert} in {blind} s")

