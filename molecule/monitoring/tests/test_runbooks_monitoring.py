"""The daily_health runbook's monitoring checks and the daily_report runbook, run as an operator runs them
(ansible-playbook playbooks/runbooks/<name>.yml) against the scenario's real Prometheus and Alertmanager (TLS with
the run's CA, basic auth with the generated password).

One schedule, about a minute: the stub colours' counters grow at known rates (the analysis test's writer); daily_health
runs healthy, with a wrong password and an unreachable Prometheus, and without a monitoring group, all at once; then
the node exporter of the monitored host is stopped until TargetDown fires for real and daily_health runs again; then
daily_report covers the whole schedule and its numbers must be what the writer wrote.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import testinfra
from test_monitoring import wait_for
from test_prometheus_analysis import BUCKETS, MIX, PLAN, WRITE, WRITER

REPO = Path(__file__).resolve().parents[3]
MONITORED = "gm-mol-monitoring-2"
NODE_TARGET = f"{MONITORED}:9100"
# Shares of the requests per latency: p50 in the (3, 5] ms bucket, p95 and p99 in (10, 25] ms.
LATENCIES = [[0.004, 0.6], [0.008, 0.3], [0.02, 0.1]]
# Half a percent of 5xx: under the error-rate alert's 1 %, so the healthy run meets no alert of this file's making.
BLUE = {"color": "blue", "rps": 30.0, "error_share": 0.005, "latencies": LATENCIES, "mix": MIX}
GREEN = {"color": "green", "rps": 10.0, "error_share": 0.005, "latencies": LATENCIES, "mix": MIX}
BACKUPS = ["/var/backups/grandmodel/postgresql/gm-runbook-test.dump", "/var/backups/grandmodel/redis/redis-gm-test.rdb"]
DEPLOYMENTS = "/var/lib/grandmodel/deployments.jsonl"
PLOT = (320, 160)
# Calls Alertmanager's API v2 on the monitoring host, logged in with the role's password file (never on a command
# line): argv method, path, JSON body; prints [status, body].
ALERTMANAGER = r"""
import base64, json, ssl, sys, urllib.error, urllib.request
context = ssl.create_default_context(cafile="/etc/grandmodel/pki/ca.crt")
token = base64.b64encode(b"grandmodel:" + open("/etc/prometheus/web-login", "rb").read()).decode()
body = sys.argv[3].encode() if len(sys.argv) > 3 else None
request = urllib.request.Request("https://127.0.0.1:9093" + sys.argv[2], data=body, method=sys.argv[1],
                                 headers={"Authorization": "Basic " + token, "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=5, context=context) as answer:
        print(json.dumps([answer.status, answer.read().decode()]))
except urllib.error.HTTPError as error:
    print(json.dumps([error.code, error.read().decode()]))
"""


def inventory() -> str:
    return os.environ["MOLECULE_INVENTORY_FILE"]


def alertmanager(host, method: str, path: str, body: Any = None) -> Any:
    script = base64.b64encode(ALERTMANAGER.encode()).decode()
    args = [method, path] + ([json.dumps(body)] if body is not None else [])
    out = host.check_output(f"echo {script} | base64 -d > /tmp/gm-am.py && python3 /tmp/gm-am.py"
                            + "".join(" %s" for _ in args), *args)
    status, text = json.loads(out)
    assert 200 <= status < 300, (method, path, status, text)
    return json.loads(text) if text.strip() else None


def start_runbook(name: str, reports: Path, *extra: str) -> subprocess.Popen:
    """playbooks/runbooks/<name>.yml against the scenario's hosts, not waited for."""
    command = [str(REPO / ".venv" / "bin" / "ansible-playbook"), str(REPO / "playbooks" / "runbooks" / f"{name}.yml"),
               "-i", inventory(), "-e", f"runbook_reports_dir={reports}", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def finish(proc: subprocess.Popen, reports: Path, runbook: str) -> dict[str, Any]:
    """rc, output and the report the run wrote (the newest of its kind in its own reports folder)."""
    out, _ = proc.communicate(timeout=240)
    written = sorted(reports.glob(f"{runbook}-*/report.json"))
    report = json.loads(written[-1].read_text()) if written else {}
    return {"rc": proc.returncode, "out": out, "report": report,
            "dir": written[-1].parent if written else None}


def utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict[str, Any]]:
    started = time.monotonic()
    monitoring = testinfra.get_host("ansible://gm-mol-monitoring", ansible_inventory=inventory())
    monitored = testinfra.get_host(f"ansible://{MONITORED}", ansible_inventory=inventory())
    reports = tmp_path_factory.mktemp("runbook-reports")
    marks: dict[str, float] = {}
    silences: list[str] = []
    # Alerts the earlier test files leave behind are silenced for this run (the analysis test's 11 % of errors stay
    # in the error-rate alert's 5-minute window): a silenced alert is reported, and is not a problem.
    active = alertmanager(monitoring, "GET", "/api/v2/alerts?active=true&silenced=false&inhibited=false")
    leftovers = [dict(a["labels"]) for a in active]
    # The hosts are containers: their node exporters read the CI machine's CPU and memory counters, so the host
    # pressure alerts describe the machine running the suite (a CI run at load 2 fired HostCpuPressure here and
    # failed the healthy run). They are silenced for the whole run, including when they start firing mid-run.
    machine = {"alertname": "HostCpuPressure|HostMemoryPressure"}
    for labels in [*leftovers, {"alertname": "GrandModelHighErrorRate"}, machine]:
        answer = alertmanager(monitoring, "POST", "/api/v2/silences", {
            "matchers": [{"name": k, "value": v, "isRegex": labels is machine, "isEqual": True}
                         for k, v in labels.items()],
            "startsAt": utc(time.time() - 5), "endsAt": utc(time.time() + 600),
            "createdBy": "test_runbooks_monitoring", "comment": "left by an earlier test file"})
        silences.append(answer["silenceID"])
    originals = monitored.check_output("base64 -w0 /srv/stub-8001/metrics; echo; base64 -w0 /srv/stub-8002/metrics")
    had_deployments = monitored.run(f"test -e {DEPLOYMENTS}").rc == 0
    writer_start = time.time()
    plan = {"start": writer_start, "buckets": BUCKETS, "lead": {"8001": BLUE, "8002": GREEN}, "phases": []}
    today = {"id": "gm-test-today", "kind": "release", "host": MONITORED, "finished": utc(writer_start + 5),
             "from_color": "blue", "to_color": "green", "from_version": "1.0.0", "to_version": "1.1.0",
             "outcome": "promoted", "evidence": {"big": "not in the report"}}
    yesterday = dict(today, id="gm-test-yesterday", finished=utc(writer_start - 86400 - 600))
    records = "\n".join(json.dumps(r) for r in (yesterday, today))
    # Emergency stops as the runbook records them, in the reports folder daily_report is given: one in the window,
    # one the day before.
    for since in (writer_start + 5, writer_start - 86400):
        folder = reports / "report" / f"emergency_stop-{utc(since).replace('-', '').replace(':', '')}"
        folder.mkdir(parents=True)
        (folder / "report.json").write_text(json.dumps({"halt": {"since": utc(since), "reason": f"test {since}",
                                                                 "halted_by": "tester"}}))
    monitored.check_output(
        f"echo {base64.b64encode(WRITE.encode()).decode()} | base64 -d > {WRITER} && chmod 0755 {WRITER}"
        f" && echo {base64.b64encode(json.dumps(plan).encode()).decode()} | base64 -d > {PLAN}"
        f" && (systemctl stop gm-analysis-writer 2>/dev/null; true)"
        f" && systemd-run --unit gm-analysis-writer --collect {WRITER} {PLAN}"
        f" && mkdir -p {' '.join(str(Path(b).parent) for b in BACKUPS)} /var/lib/grandmodel"
        f" && touch {' '.join(BACKUPS)}"
        f" && echo {base64.b64encode(records.encode()).decode()} | base64 -d >> {DEPLOYMENTS}")
    results: dict[str, Any] = {}
    try:
        procs = {
            "healthy": start_runbook("daily_health", reports / "healthy"),
            # Prometheus' port closed and the wrong password for Alertmanager: both named, neither a traceback.
            "unusable": start_runbook("daily_health", reports / "unusable", "-e", "monitoring_prometheus_port=9",
                                      "-e", "monitoring_web_password=not-the-password-0123456789"),
            "no-monitoring": start_runbook("daily_health", reports / "no-monitoring",
                                           "-e", "runbook_monitoring_group=no_such_group"),
            "report-unreachable": start_runbook("daily_report", reports / "report-unreachable",
                                                "-e", "monitoring_prometheus_port=9"),
        }
        for name, proc in procs.items():
            runbook = "daily_report" if name.startswith("report") else "daily_health"
            results[name] = finish(proc, reports / name, runbook)
        marks["healthy runs"] = time.monotonic() - started
        monitored.check_output("systemctl stop prometheus-node-exporter")
        try:
            wait_for(lambda: [a for a in alertmanager(monitoring, "GET", "/api/v2/alerts?active=true")
                              if a["labels"].get("alertname") == "TargetDown"
                              and a["labels"].get("instance") == NODE_TARGET], 60, "TargetDown in Alertmanager",
                     interval=1.0)
            marks["TargetDown fired"] = time.monotonic() - started
            down_runs = {"exporter-down": start_runbook("daily_health", reports / "exporter-down"),
                         # the same state with the alert's name in daily_health_ignore_alerts
                         "alert-ignored": start_runbook("daily_health", reports / "alert-ignored", "-e",
                                                        json.dumps({"daily_health_ignore_alerts": ["TargetDown"]}))}
            for name, proc in down_runs.items():
                results[name] = finish(proc, reports / name, "daily_health")
        finally:
            monitored.check_output("systemctl start prometheus-node-exporter")
        marks["exporter-down run"] = time.monotonic() - started
        # The window starts once the writer's first counters are scraped and ends a scrape before now.
        window = (round(writer_start + 3), round(time.time() - 2))
        results["window"] = window
        results["report"] = finish(start_runbook("daily_report", reports / "report",
                                                 "-e", f"daily_report_start={window[0]}",
                                                 "-e", f"daily_report_end={utc(window[1])}",
                                                 "-e", "daily_report_rate_window=6s",
                                                 "-e", f"daily_report_plot_width={PLOT[0]}",
                                                 "-e", f"daily_report_plot_height={PLOT[1]}"),
                                   reports / "report", "daily_report")
        results["reports"] = reports
        marks["daily_report"] = time.monotonic() - started
        print(f"\nrunbooks against the monitoring tier: {time.monotonic() - started:.1f}s ("
              + ", ".join(f"{mark} at {at:.1f}s" for mark, at in marks.items()) + ")")
        yield results
    finally:
        blue, green = originals.split()
        monitored.run(f"systemctl stop gm-analysis-writer; echo {blue} | base64 -d > /srv/stub-8001/metrics;"
                      f" echo {green} | base64 -d > /srv/stub-8002/metrics; rm -f {' '.join(BACKUPS)};"
                      f" systemctl start prometheus-node-exporter")
        if had_deployments:
            monitored.run(f"sed -i '/gm-test-to\\(day\\|yesterday\\)/d' {DEPLOYMENTS}")
        else:
            monitored.run(f"rm -f {DEPLOYMENTS}")
        for silence in silences:
            alertmanager(monitoring, "DELETE", f"/api/v2/silence/{silence}")


def test_healthy_tier_passes_with_every_target_and_exporter_up(runs):
    run = runs["healthy"]
    assert run["rc"] == 0, run["out"][-3000:]
    report = run["report"]
    assert report["healthy"] is True and report["problems"] == []
    mon = report["monitoring"]["gm-mol-monitoring"]
    assert (mon["prometheus_error"], mon["alertmanager_error"]) == ("", "")
    # Every job of the scenario, each exporter's target up: what Prometheus itself says.
    assert {"prometheus", "alertmanager", "node", "postgres", "redis", "grandmodel"} <= set(mon["jobs"])
    assert all(j["up"] == j["targets"] > 0 for j in mon["jobs"].values()), mon["jobs"]
    assert mon["jobs"]["node"] == {"up": 2, "targets": 2}
    assert {t["instance"] for t in mon["targets"] if t["job"] == "node"} == {"gm-mol-monitoring:9100", NODE_TARGET}
    # Alerts left by earlier test files are there, silenced: reported, not problems.
    assert all(a["state"] != "active" for a in mon["alerts"]), mon["alerts"]
    text = (run["dir"] / "report.md").read_text()
    assert "## Monitoring" in text and "| node | 2 / 2 |" in text


def test_unreachable_prometheus_and_a_refused_login_are_named_not_tracebacks(runs):
    run = runs["unusable"]
    assert run["rc"] != 0
    problems = run["report"]["problems"]
    assert any(p.startswith("gm-mol-monitoring: Prometheus at https://127.0.0.1:9") and "could not be reached" in p
               and "Connection refused" in p for p in problems), problems
    assert ("gm-mol-monitoring: Alertmanager at https://127.0.0.1:9093 refused the login (HTTP 401): check "
            "monitoring_web_username and monitoring_web_password") in problems, problems
    assert len(problems) == 2, problems
    assert "Traceback" not in run["out"] and "not-the-password" not in run["out"]


def test_no_monitoring_group_is_not_checked_and_not_a_failure(runs):
    run = runs["no-monitoring"]
    assert run["rc"] == 0, run["out"][-3000:]
    assert run["report"]["monitoring"] == "not checked: no monitoring host"
    assert "not checked: no monitoring host" in (run["dir"] / "report.md").read_text()


def test_daily_report_without_prometheus_fails_with_the_reason_after_writing_the_report(runs):
    run = runs["report-unreachable"]
    assert run["rc"] != 0 and "Traceback" not in run["out"]
    assert [e.split(": ", 1)[0] for e in run["report"]["errors"]] == [
        "Prometheus at https://127.0.0.1:9 could not be reached"], run["report"]["errors"]
    assert "Connection refused" in run["report"]["errors"][0] and run["report"]["colours"] == {}


def test_a_stopped_exporter_is_a_down_target_and_its_firing_alert_is_named(runs):
    run = runs["exporter-down"]
    assert run["rc"] != 0
    problems = run["report"]["problems"]
    prefix = f"gm-mol-monitoring: scrape target {NODE_TARGET} of job node is down: "
    down = [p for p in problems if p.startswith(prefix)]
    assert down and "connection refused" in down[0], problems
    firing = [p for p in problems
              if re.fullmatch(rf"gm-mol-monitoring: alert TargetDown \(critical\) firing on {NODE_TARGET} since \S+Z",
                              p)]
    assert firing, problems
    # Exactly these: nothing else on the healthy hosts is reported.
    assert len(problems) == 2, problems
    assert "daily health: 2 problem(s)" in run["out"]
    text = (run["dir"] / "report.md").read_text()
    assert f"| TargetDown | critical | {NODE_TARGET} |" in text and "| node | 1 / 2 |" in text


def test_an_ignored_alert_is_reported_and_not_a_problem(runs):
    """daily_health_ignore_alerts (the sandbox lists the clock alert its machine always fires): the alert stays in
    the report, only the problems leave it out; the down target it describes is still a problem."""
    run = runs["alert-ignored"]
    assert run["rc"] != 0
    problems = run["report"]["problems"]
    assert len(problems) == 1 and problems[0].startswith(f"gm-mol-monitoring: scrape target {NODE_TARGET} "), problems
    alerts = run["report"]["monitoring"]["gm-mol-monitoring"]["alerts"]
    assert any(a["name"] == "TargetDown" and a["instance"] == NODE_TARGET and a["state"] == "active"
               for a in alerts), alerts


def histogram_quantile(q: float) -> float:
    """What Prometheus computes from the writer's buckets: linear inside the bucket of rank q."""
    cumulative = [sum(share for seconds, share in LATENCIES if seconds <= le) for le in BUCKETS]
    for i, count in enumerate(cumulative):
        if count >= q:
            lower, below = (BUCKETS[i - 1], cumulative[i - 1]) if i else (0.0, 0.0)
            return lower + (BUCKETS[i] - lower) * (q - below) / (count - below)
    raise AssertionError(q)


def test_daily_report_numbers_are_what_the_colours_exported(runs):
    run = runs["report"]
    assert run["rc"] == 0, run["out"][-3000:]
    report = run["report"]
    start, end = runs["window"]
    assert (report["window"]["start"], report["window"]["end"]) == (start, end) and report["errors"] == []
    seconds = end - start
    for spec in (BLUE, GREEN):
        c = report["colours"][spec["color"]]
        # increase() over the window, the /health series excluded, within the jitter of the writer and the scrapes.
        assert abs(c["requests"] - spec["rps"] * seconds) <= 0.1 * spec["rps"] * seconds, (c, seconds)
        assert abs(c["error_ratio"] - spec["error_share"]) < 0.001, c
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            assert abs(c["latency_ms"][name] - 1000 * histogram_quantile(q)) < 0.02 * 1000 * histogram_quantile(q), c
        shares = c["prediction_mix"]["strategic"]
        assert all(abs(shares[action] - share) < 0.01 for action, share in MIX.items()), c
    assert round(1000 * histogram_quantile(0.5), 3) == 4.667 and round(1000 * histogram_quantile(0.99), 1) == 23.5


def test_daily_report_lists_the_days_incidents_deployments_and_backups(runs):
    report = runs["report"]["report"]
    fired = [a for a in report["incidents"]["alerts"] if a["name"] == "TargetDown" and a["instance"] == NODE_TARGET]
    assert fired and fired[0]["severity"] == "critical" and fired[0]["active_since"], report["incidents"]
    start, end = runs["window"]
    assert utc(start - 5) <= fired[0]["active_since"] <= utc(end), fired
    stops = report["incidents"]["emergency_stops"]
    assert [s["by"] for s in stops] == ["tester"] and utc(start - 3) <= stops[0]["since"] <= utc(end), stops
    deployments = report["deployments"][MONITORED]
    assert [d["id"] for d in deployments] == ["gm-test-today"] and "evidence" not in deployments[0], deployments
    backups = report["backups"][MONITORED]
    assert {k: Path(b["newest"]).name for k, b in backups.items()} == {"postgresql": "gm-runbook-test.dump",
                                                                      "redis": "redis-gm-test.rdb"}
    text = (runs["report"]["dir"] / "report.md").read_text()
    assert f"alert TargetDown (critical) on {NODE_TARGET} fired" in text and "gm-test-today" in text


def test_daily_report_plot_is_a_png_of_the_stated_size_with_both_colours(runs):
    data = (runs["report"]["dir"] / "plot.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == PLOT
    assert runs["report"]["report"]["plot"] == str(runs["report"]["dir"] / "plot.png")
    # Both colours were drawn (the picture decoded here, independently of the module).
    chunks, at = {}, 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        chunks.setdefault(data[at + 4:at + 8], b"")
        chunks[data[at + 4:at + 8]] += data[at + 8:at + 8 + length]
        at += 12 + length
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * PLOT[0]
    colours = {bytes(raw[r * stride + 1 + 3 * x:r * stride + 4 + 3 * x])
               for r in range(PLOT[1]) for x in range(PLOT[0])}
    assert bytes((31, 94, 204)) in colours and bytes((24, 150, 60)) in colours
