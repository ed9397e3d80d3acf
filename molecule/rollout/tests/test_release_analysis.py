"""Each weighted step judged by the environment's Prometheus against the old colour, and every release's record in
PostgreSQL (issue 14 items 3 and 5), through the scenario's real nginx front door under load.

The ops host runs the environment's Prometheus (the monitoring role: TLS, basic auth, both colours scraped every
2 s) and PostgreSQL (the postgresql role: monitoring.deployments and its release-record login). Here the releases
write their records to that PostgreSQL too (rollout_records_db_host; the scenario's other releases keep theirs in the
file only) and the steps' analysis is on as an environment would set it (rollout_step_prometheus: the median latency
at most 1.5 times the old colour's, at most 5 more points of errors), walking [10, 100] with 8 s step windows. An
independent client on this machine sends steady predictions through the front door and logs every answer's status
and serving colour; a watcher logs each split of the load balancer's upstream file (test_weighted_walk.py's). Runs
after test_market_runbooks.py (blue serves 2026.11.0, green stopped) and leaves that state for
test_rollback_version.py.

1. with PostgreSQL stopped, a slower model (2026.11.3-slow: the same inputs and outputs, 64 more trunk layers,
   two to four times blue's median latency per request: the issue's "2x worse" release) is released to the idle
   green: it passes the pre-promotion and step gates' absolute limits, and the Prometheus analysis of the 10% step
   fails on its latency against blue's: every load balancer serves blue alone again, 0 failed requests; the
   record is kept in the file (the database is down);
2. PostgreSQL started, a good release (2026.11.1) replaces it on green and walks 10%, 100%: the 10% step's
   Prometheus analysis is successful with its measurements in the record, 0 failed requests; its record is in
   PostgreSQL once, as in the file, and so is the one the database missed (back-filled by this release's write);
   then switch_back.yml returns to blue, kept warm as the backup.

The slower release is a bigger model, not a throttled process: a CFS quota on the colour (1 ms of CPU per 6 ms, this
test's first design) slowed a request only when it used up the quota, so its ratio to green fell with the machine's
load (2.0 to 2.2 alone; promoted in CI, and 1.27 when reproduced beside two busy processes: promoting is right
for that figure). More work per request slows every request by about the same factor whatever the load: the
analysis measured 2.61 (load 2.9) and 2.24 (load 7.8) with 40 extra layers, 2.71 and 2.82 with 48 (load 4.3 beside
two busy processes, and 3.1). With 40 layers the final rehearsal of 2026-12-04 measured 1.95, too close to
the 1.5 limit: since 22:45 the model has 64 (3.42 alone, 2.80 beside three busy processes at load 5.4).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
EPHEMERAL = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent"))
sys.path.insert(0, str(PROJECT / "scripts"))


# The scenario's hosts and helpers, as test_rollout.py and test_weighted_walk.py define them.
from test_rollout import (  # noqa: E402
    APP,
    LB,
    OPS,
    container_ip,
    front_color,
    playbook,
    records,
)
from test_weighted_walk import (  # noqa: E402
    case_figures,
    lb_upstream,
    report_cases,
    said_by,
    share,
    split_of,
    under_load,
)

CA_ON_LB = "/usr/local/share/gm-rollout-prometheus-ca.crt"
STEPS = [10, 100]
# The slower release (prepare.yml): 64 extra trunk layers of width 256, 2.5 to 4 times the live model's latency.
SLOW_RELEASE = "2026.11.3-slow"
THRESHOLDS = {"latency_ratio_max": 1.5, "error_ratio_delta_max": 0.05}
RESULTS: dict[str, dict[str, Any]] = {}
# The table's outcome for the file's (the rollout role's records_insert.sql).
DB_OUTCOME = {"success": "promoted", "aborted_step": "aborted", "rolled_back": "rolled_back"}

testinfra_hosts = [f"ansible://{APP}"]


def analysis_vars() -> Path:
    """The release's extra variables (with the web password, from a file of the run, not the command line)."""
    password = (EPHEMERAL / "secrets" / "monitoring_web_password").read_text().split()[0]
    path = EPHEMERAL / "release_analysis.json"
    path.write_text(json.dumps({
        "rollout_weight_steps": STEPS,
        "rollout_step_analysis_seconds": 8,
        "rollout_records_db_host": OPS,
        "rollout_step_prometheus": {
            "url": f"https://{OPS}:9090", "ca_path": CA_ON_LB, "username": "grandmodel", "password": password,
            "latency_quantile": 0.5, "min_requests": 20, "thresholds": THRESHOLDS,
        },
    }))
    path.chmod(0o600)
    return path


def colour_counts(port: int) -> tuple[float, float]:
    """(predict answers with status 200, predict probes) as the colour counted them on its own /metrics.

    A gate's requests carry X-GrandModel-Probe and are counted apart (grandmodel_probe_requests_total), so the
    client series hold exactly what clients were served: what Prometheus compares between the colours.
    """
    with urllib.request.urlopen(f"http://{container_ip(APP)}:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()

    def total(series: str) -> float:
        line = re.compile(rf'^{series}\{{[^}}]*route="/v1/models/[^"]+/predict"[^}}]*status="200"[^}}]*\}}\s+(\S+)',
                          re.MULTILINE)
        return sum(float(v) for v in line.findall(text))

    return total("grandmodel_http_requests_total"), total("grandmodel_probe_requests_total")


def on_ops(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", "exec", OPS, *argv], capture_output=True, text=True, check=check, timeout=120)


def db_records(ids: list[str]) -> list[tuple[str, str, str]]:
    """(id, outcome, to_version) of the rows of monitoring.deployments for these release ids, as the superuser reads
    them."""
    listed = ",".join(f"'{i}'" for i in ids)
    out = on_ops("runuser", "-u", "postgres", "--", "psql", "-X", "-At", "-F", "|", "-d", "grandmodel", "-c",
                 "SELECT gate_evidence->>'id', outcome, version FROM monitoring.deployments "
                 f"WHERE gate_evidence->>'id' IN ({listed}) ORDER BY id").stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line]  # type: ignore[misc]


def postgresql(action: str) -> None:
    on_ops("systemctl", action, "postgresql@15-main")
    if action == "start":
        on_ops("sh", "-c", "for i in $(seq 60); do pg_isready -q -h 127.0.0.1 && exit 0; sleep 0.5; done; exit 1")



def playbooks(*runs: tuple[str, list[str]]) -> Callable[[], list[subprocess.CompletedProcess[str]]]:
    return lambda: [playbook(name, *args) for name, args in runs]


@pytest.fixture(scope="module")
def vars_file() -> Iterator[Path]:
    subprocess.run(["podman", "cp", str(EPHEMERAL / "secrets" / "pki" / "ca.crt"), f"{LB}:{CA_ON_LB}"], check=True)
    path = analysis_vars()
    yield path
    path.unlink(missing_ok=True)


def test_a_slower_release_is_aborted_at_the_first_step_by_its_latency_and_its_record_waits_for_the_database(
        host, vars_file):
    assert front_color() == "blue"
    before = records(host)
    postgresql("stop")
    try:
        runs, report, watcher, elapsed = under_load(playbooks(
            ("rollout.yml", ["-e", f"release_version={SLOW_RELEASE}", "-e", f"@{vars_file}"])), read_version=True)
        case = case_figures(RESULTS, "slower_release", report, watcher, elapsed, runs, database="stopped")
    finally:
        postgresql("start")
    assert runs[0].returncode != 0, said_by(runs[0])[-4000:]
    assert "aborted at weighted step 1 of 2 (10% to green)" in said_by(runs[0]), said_by(runs[0])[-4000:]
    assert split_of(lb_upstream()) == "blue=100"
    assert front_color() == "blue"
    splits = [s["split"] for s in case["splits"]]
    assert "green=100 +backup blue" not in splits and "green=100" not in splits, case["splits"]
    assert share(case["splits"][-1], "blue") == 100.0, case["splits"]
    assert report.failed == [], case
    # The slower model served its 10% share (the client saw its version), then none.
    served = {r.version for r in report.requests if r.ok and r.color == "green"}
    assert served == {SLOW_RELEASE}, served
    (record,) = records(host)[len(before):]
    assert record["outcome"] == "aborted_step", record
    failed_step = record["evidence"]["failed_step"]
    assert int(failed_step["step"]["weight"]) == 10, failed_step
    analysis = failed_step["prometheus"]
    case["analysis"] = analysis
    assert analysis["outcome"] == "failed" and "latency_ratio_max" in analysis["message"], failed_step
    green, blue = analysis["measurements"]["green"], analysis["measurements"]["blue"]
    case["latency_ratio"] = round(green["latency_ms"] / blue["latency_ms"], 2)
    assert case["latency_ratio"] > THRESHOLDS["latency_ratio_max"], analysis
    # Two to four times as slow, not ten: what is proven is the threshold's side of a "2x worse" release.
    assert case["latency_ratio"] < 6.0, analysis
    # The absolute limits passed (the step gate's p99 under 1000 ms): only the comparison with blue caught it.
    (gate,) = failed_step["gate"].values()
    assert gate["verdict"] == "passed", failed_step

    # The database was down: the release went on and kept its record in the file only.
    RESULTS["records"] = {"missed": record["id"], "missed_row": (record["id"], "aborted", SLOW_RELEASE)}
    assert db_records([record["id"]]) == []


def test_a_good_release_replaces_it_passes_every_steps_analysis_and_back_fills_the_missed_record(host, vars_file):
    assert front_color() == "blue"
    before = len(records(host))
    runs, report, watcher, elapsed = under_load(playbooks(("rollout.yml", ["-e", "release_version=2026.11.1",
                                                                           "-e", f"@{vars_file}"])))
    case = case_figures(RESULTS, "good_release", report, watcher, elapsed, runs)
    assert runs[0].returncode == 0, said_by(runs[0])[-4000:]
    assert front_color() == "green"
    assert report.failed == [], case
    splits = [s["split"] for s in case["splits"]]
    assert "blue=90 green=10" in splits and "green=100 +backup blue" in splits, case["splits"]
    (record,) = records(host)[before:]
    assert record["outcome"] == "success", record
    walked = record["evidence"]["steps"]
    assert [int(s["weight"]) for s in walked] == [10], walked
    analyses = [s["prometheus"] for s in walked]
    case["analyses"] = analyses
    for analysis in analyses:
        assert analysis["outcome"] == "successful", analyses
    # Green started with this release (the slower one it replaces is gone): its client series count exactly the
    # answers this client got from it, and the gates' golden predictions (pre-promotion and each step) only in its
    # probe series.
    served, probes = colour_counts(8002)
    by_client = sum(1 for r in report.requests if r.ok and r.color == "green")
    case["green_counted"] = {"client_series": served, "client_answers": by_client, "probe_series": probes}
    assert served == by_client, case["green_counted"]
    assert probes > 0, case["green_counted"]
    # In PostgreSQL once (the table names a success "promoted"), and the record the database missed while it was
    # down (the slower release's, written to the file only) back-filled by this one, once.
    expected = [(record["id"], "promoted", "2026.11.1")]
    missed = RESULTS.get("records", {}).get("missed_row")
    if missed:
        expected.append(tuple(missed))
    in_db = db_records([row[0] for row in expected])
    RESULTS.setdefault("records", {})["in_postgresql"] = in_db
    assert sorted(in_db) == sorted(expected), (in_db, expected)

    # Back to blue (2026.11.0, kept warm as the backup) for test_rollback_version.py: the plain rollback.
    back = playbook("switch_back.yml", "-e", "rollback_to=blue")
    assert back.returncode == 0, said_by(back)[-4000:]
    assert front_color() == "blue"


@pytest.fixture(scope="module", autouse=True)
def back_to_blue() -> Iterator[None]:
    """test_rollback_version.py starts from blue live with 2026.11.0 and green stopped."""
    yield
    with contextlib.suppress(Exception):
        postgresql("start")
        if front_color() != "blue":
            playbook("switch_back.yml", "-e", "rollback_to=blue")
        subprocess.run(["podman", "exec", APP, "systemctl", "disable", "--now", "grandmodel-model@green"],
                       check=False)
    report_cases(RESULTS, "rollout-analysis", "steps judged by Prometheus")
    print(f"  records: {RESULTS.get('records')}")
    print(f"  slower release: median latency {RESULTS.get('slower_release', {}).get('latency_ratio')} times blue's")
