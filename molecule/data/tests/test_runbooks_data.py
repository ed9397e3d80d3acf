"""The degradation, security check and access review runbooks (playbooks/runbooks/) on the data hosts.

Each runbook runs against the scenario's inventory as an operator would run it; the tests make the
situation the runbook must see for real on gm-mol-data-db (a row lock another session waits on, a
world-readable secret, a stray listener, a certificate about to end, a new PostgreSQL role and Redis
ACL user) and read the runbook's JSON report, its exit code and its output.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

testinfra_hosts = ["ansible://gm-mol-data-db"]

REPO = Path(__file__).resolve().parents[3]
EPHEMERAL = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent"))
SECRETS = EPHEMERAL / "secrets"
OUT = EPHEMERAL / "runbooks-data"
DB_HOST = "gm-mol-data-db"
SOCKET = "/run/redis/redis-server.sock"
PROBE = "h9_lock_probe"


def secret(name: str) -> str:
    return (SECRETS / name).read_text().split()[0]


def runbook(name: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run a runbook; return the run and its JSON report (the newest report folder of that runbook)."""
    reports = OUT / "reports"
    before = set(reports.glob(f"{name}-*"))
    proc = subprocess.run(
        [str(REPO / ".venv/bin/ansible-playbook"), "-i", os.environ["MOLECULE_INVENTORY_FILE"],
         str(REPO / "playbooks" / "runbooks" / f"{name}.yml"),
         "-e", f"runbook_reports_dir={reports}", "-e", f"runbook_state_dir={OUT / 'state'}", *extra],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )
    new = sorted(set(reports.glob(f"{name}-*")) - before)
    assert new, f"{name} wrote no report: {flat(proc)[-3000:]}"
    return proc, json.loads((new[-1] / "report.json").read_text())


def flat(proc: subprocess.CompletedProcess[str]) -> str:
    return " ".join((proc.stdout + proc.stderr).split())


def superuser(host, sql: str) -> str:
    return host.check_output(f"runuser -u postgres -- psql -X -At -d grandmodel -c {shlex.quote(sql)}")


def admin_redis(host, *args: str) -> str:
    return host.check_output(f"REDISCLI_AUTH={secret('redis_admin')} redis-cli -s {SOCKET} --no-auth-warning "
                             f"--user grandmodel_admin {' '.join(shlex.quote(a) for a in args)}")


def podman_psql(sql: str) -> subprocess.Popen[bytes]:
    """A psql session of its own on the database host, left running (the caller ends it)."""
    return subprocess.Popen(["podman", "exec", DB_HOST, "runuser", "-u", "postgres", "--", "psql", "-X", "-q",
                             "-d", "grandmodel", "-c", sql], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module", autouse=True)
def fresh_output() -> None:
    subprocess.run(["rm", "-rf", str(OUT)], check=True)


# --- the runs ------------------------------------------------------------------------------------
# The runbooks only read, so the runs that can share a moment run side by side: first the degradation
# (during a lock wait), the clean security check and the access review's baseline; then the security check
# with the planted findings and the access review after the new role and user.

Run = tuple[subprocess.CompletedProcess[str], dict[str, Any]]


def side_by_side(*runs: tuple[str, tuple[str, ...]]) -> list[Run]:
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        return list(pool.map(lambda r: runbook(r[0], *r[1]), runs))


def wait_for(host, sql: str, what: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = superuser(host, sql)
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(what)


@pytest.fixture(scope="module")
def first_runs(host) -> Iterator[dict[str, Any]]:
    """A real row lock held by one session and another session waiting on it, and the first runs meanwhile."""
    superuser(host, f"DROP TABLE IF EXISTS {PROBE}; CREATE TABLE {PROBE} (id int PRIMARY KEY, v int); "
                    f"INSERT INTO {PROBE} VALUES (1, 0)")
    sessions = [podman_psql(f"BEGIN; UPDATE {PROBE} SET v = v + 1 WHERE id = 1; "
                            "SELECT pg_sleep(120) /* h9-holder */; COMMIT")]
    try:
        holder = wait_for(host, "SELECT string_agg(pid::text, ',') FROM pg_stat_activity "
                                "WHERE query LIKE '%h9-holder%' AND pid <> pg_backend_pid()",
                          "the lock holder never started")
        sessions.append(podman_psql(f"UPDATE {PROBE} SET v = v + 2 WHERE id = 1 /* h9-waiter */"))
        waiter = wait_for(host, "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                "AND query LIKE '%h9-waiter%' AND pid <> pg_backend_pid()",
                          "the second session never waited on the lock")
        degradation, clean, baseline = side_by_side(("degradation", ()), ("security_check", ()),
                                                    ("access_review", ()))
    finally:
        superuser(host, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE query LIKE '%h9-%' AND pid <> pg_backend_pid()")
        for proc in sessions:
            proc.wait(timeout=30)
        superuser(host, f"DROP TABLE IF EXISTS {PROBE}")
    yield {"holder": int(holder.split(",")[0]), "waiter": int(waiter), "degradation": degradation,
           "clean": clean, "baseline": baseline}


@pytest.fixture(scope="module")
def second_runs(host, first_runs) -> Iterator[dict[str, Any]]:
    """Planted on the db host: a world-readable secret, a stray listener, a certificate ending in two days, a
    new PostgreSQL role and Redis ACL user (generated passwords); the second runs meanwhile."""
    port, secret_file, cert_dir = "18765", "/etc/grandmodel/h9-planted.key", "/tmp/h9-certs"
    suffix = secrets.token_hex(4)
    role, user = f"h9_review_{suffix}", f"h9review{suffix}"
    pg_password, redis_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    try:
        host.check_output(f"umask 022; echo not-a-real-key > {secret_file}; chmod 0644 {secret_file}")
        host.check_output(f"mkdir -p {cert_dir} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
                          f"-nodes -days 2 -subj /CN=h9-short -keyout {cert_dir}/short.key "
                          f"-out {cert_dir}/short.crt 2>/dev/null")
        host.check_output(f"setsid -f sh -c 'exec python3 -m http.server {port} --bind 0.0.0.0 >/dev/null 2>&1'")
        # Not kept in pg_stat_statements (which keeps utility statements' text, passwords included).
        superuser(host, "SET pg_stat_statements.track_utility = off; "
                        f"CREATE ROLE {role} LOGIN PASSWORD '{pg_password}'")
        admin_redis(host, "ACL", "SETUSER", user, "on", f">{redis_password}", "~h9:*", "+get")
        deadline = time.monotonic() + 15
        while f":{port}" not in host.check_output(f"ss -Htln 'sport = :{port}'") and time.monotonic() < deadline:
            time.sleep(0.3)
        planted, review = side_by_side(
            ("security_check", ("-e", json.dumps({"security_check_extra_certs": [cert_dir]}))), ("access_review", ()))
    finally:
        listener = host.check_output(f"ss -Htlnp 'sport = :{port}'")
        for pid in {part.split(",")[0] for part in listener.split("pid=")[1:]}:
            host.run(f"kill {pid}")
        host.run(f"rm -rf {secret_file} {cert_dir}")
        superuser(host, f"DROP ROLE IF EXISTS {role}")
        admin_redis(host, "ACL", "DELUSER", user)
    yield {"port": port, "file": secret_file, "cert": f"{cert_dir}/short.crt", "role": role, "user": user,
           "passwords": [pg_password, redis_password], "planted": planted, "review": review}


# --- degradation ---------------------------------------------------------------------------------

def test_degradation_lists_a_real_lock_wait_and_redis_latency(first_runs):
    holder, waiter = first_runs["holder"], first_runs["waiter"]
    proc, report = first_runs["degradation"]
    assert proc.returncode == 0, flat(proc)[-3000:]
    db = report["databases"][DB_HOST]
    waits = [w for w in db["lock_waits"] if w["pid"] == waiter]
    assert waits, db["lock_waits"]
    assert "h9-waiter" in waits[0]["query"] and holder in waits[0]["blocked_by"], waits
    assert any("h9-holder" in b["query"] for b in waits[0]["blockers"]), waits
    # The scenario loads pg_stat_statements: the slowest statements come with real timings.
    assert db["pg_stat_statements"] == "in use", db
    assert db["slow_statements"] and all(s["calls"] >= 1 and s["mean_ms"] >= 0 for s in db["slow_statements"])
    redis = report["redis"][DB_HOST]
    assert redis["latency_ms"]["samples"] > 0 and 0 <= redis["latency_ms"]["min"] <= redis["latency_ms"]["max"], redis
    assert redis["busiest_commands"] and redis["busiest_commands"][0]["calls"] > 0, redis
    # Every host has its top consumers; the tiers this inventory lacks are said to be absent.
    assert set(report["hosts"]) == {DB_HOST, "gm-mol-data-client"}
    assert all(h["top_cpu"] and h["top_memory"] and len(h["load"]) == 3 for h in report["hosts"].values())
    assert report["p99"] == report["deployments"] == "not in this inventory"
    md = (Path(report["report_dir"]) / "report.md").read_text()
    assert f"| {waiter} |" in md and "h9-waiter" in md
    for name in ("redis_admin", "postgresql_app"):
        assert secret(name) not in proc.stdout + proc.stderr + json.dumps(report)


# --- security_check ------------------------------------------------------------------------------

def test_security_check_is_clean_on_the_converged_hosts(first_runs):
    proc, report = first_runs["clean"]
    assert proc.returncode == 0, flat(proc)[-3000:]
    assert report["findings"] == [] and report["clean"] is True
    db = report["hosts"][DB_HOST]
    # The real certificates of the pki role were read, and the real listeners matched the expected ports.
    assert any(c["path"].endswith("/postgresql.crt") and c["days_left"] > 300 for c in db["certificates"]), db
    assert {"5432", "6380"} <= {listener["port"] for listener in db["listeners"]}, db["listeners"]


def test_security_check_names_exactly_what_was_planted(second_runs):
    proc, report = second_runs["planted"]
    assert proc.returncode != 0, flat(proc)[-3000:]
    findings = report["findings"]
    assert len(findings) == 3, findings
    assert f"{DB_HOST}: world-readable secret file {second_runs['file']}" in findings
    assert any(f.startswith(f"{DB_HOST}: unexpected listener on port {second_runs['port']} ") and "python3" in f
               for f in findings), findings
    assert any(f.startswith(f"{DB_HOST}: certificate {second_runs['cert']} ends in 1.") for f in findings), findings
    # The failure names them too, and the report for people lists them.
    out = flat(proc)
    assert "3 finding(s)" in out and second_runs["file"] in out and f"port {second_runs['port']}" in out
    md = (Path(report["report_dir"]) / "report.md").read_text()
    assert all(f in md for f in findings)


# --- access_review -------------------------------------------------------------------------------

def test_access_review_first_run_is_the_baseline(first_runs):
    proc, baseline = first_runs["baseline"]
    assert proc.returncode == 0, flat(proc)[-3000:]
    assert baseline["baseline"] is True and baseline["changes"] == []
    roles = baseline["snapshot"]["hosts"][DB_HOST]["postgresql_roles"]
    assert roles["grandmodel_ro"]["login"] is True and roles["postgres"]["superuser"] is True, roles
    users = baseline["snapshot"]["hosts"][DB_HOST]["redis_users"]
    assert {"grandmodel_admin", "grandmodel_app"} <= set(users), users
    assert "root" in baseline["snapshot"]["hosts"]["gm-mol-data-client"]["accounts"]


def test_access_review_reports_exactly_the_new_role_and_user_and_never_a_secret(first_runs, second_runs):
    proc, report = second_runs["review"]
    assert proc.returncode == 0, flat(proc)[-3000:]
    assert report["baseline"] is False and report["compared_with"] == first_runs["baseline"][1]["checked_at"]
    assert [(c["host"], c["kind"], c["name"], c["change"]) for c in report["changes"]] == [
        (DB_HOST, "postgresql role", second_runs["role"], "added"),
        (DB_HOST, "redis user", second_runs["user"], "added"),
    ], report["changes"]
    added = {c["kind"]: c["now"] for c in report["changes"]}
    assert added["postgresql role"]["login"] is True
    assert added["redis user"]["password_set"] is True and "~h9:*" in added["redis user"]["rules"]
    # No password nor hash anywhere: every run's output, the snapshots and the reports.
    pg_password, redis_password = second_runs["passwords"]
    forbidden = [pg_password, redis_password, hashlib.sha256(redis_password.encode()).hexdigest(),
                 secret("redis_admin"), hashlib.sha256(secret("redis_app").encode()).hexdigest()]
    stored = "".join(p.read_text() for p in OUT.rglob("*") if p.is_file())
    assert (OUT / "state" / "access_review").is_dir() and stored
    runs = [first_runs[k] for k in ("degradation", "clean", "baseline")] + [second_runs["planted"], (proc, report)]
    outputs = "".join(run[0].stdout + run[0].stderr for run in runs)
    for text in (outputs, stored):
        assert not [s for s in forbidden if s in text]
