"""quantnova.grandmodel.prometheus_analysis against the scenario's real Prometheus (TLS, basic auth, 2 s scrapes).

The two stub colours on gm-mol-monitoring-2 serve what a writer on that host puts in their metrics files: counters and
a latency histogram that grow every 0.1 s at known rates, phase after phase on one schedule (equal colours, the
candidate twice as slow, the candidate with 10 more points of errors, the candidate without traffic). Each phase is
then analysed afterwards over its own window (the module's `at`), from the monitored host across the network, and the
measurements must match what was written and the outcomes what the thresholds say.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import testinfra

MONITORED = "gm-mol-monitoring-2"
PROMETHEUS = "https://gm-mol-monitoring:9090"
CA = "/usr/local/share/gm-analysis-ca.crt"
PLAN = "/var/tmp/gm-analysis-plan.json"
WRITER = "/usr/local/bin/gm-analysis-writer"
PHASE_S = 7.0  # each phase; analysed over the window that ends 0.5 s before its end
WINDOW = "5s"  # 2 or 3 scrapes of the phase only (none from the switch between phases)
PREDICT = "/v1/models/strategic/predict"
BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCIES = [[0.004, 0.5], [0.008, 0.4], [0.02, 0.1]]  # seconds, share: true p95 is 20 ms
SLOW = [[2 * s, share] for s, share in LATENCIES]  # every request twice as slow: true p95 40 ms
MIX = {"buy": 0.3, "hold": 0.5, "sell": 0.2}
# blue takes 75 % of the traffic and green 25 %: equal throughput per unit of weight at 30 and 10 req/s.
BLUE = {"color": "blue", "rps": 30.0, "error_share": 0.01, "latencies": LATENCIES, "mix": MIX}
GREEN = {"color": "green", "rps": 10.0, "error_share": 0.01, "latencies": LATENCIES, "mix": MIX}
PHASES = [
    ("equal", GREEN),
    ("slow", dict(GREEN, latencies=SLOW)),
    ("errors", dict(GREEN, error_share=0.11)),
    ("idle", dict(GREEN, rps=0.0)),
]
ANALYSIS = {
    "url": PROMETHEUS, "ca_path": CA, "username": "grandmodel", "password": "{{ gm_analysis_password }}",
    "candidate": {"color": "green", "weight": 25}, "baseline": {"color": "blue", "weight": 75},
    "window": WINDOW, "latency_quantile": 0.95, "min_requests": 20,
    "thresholds": {"latency_ratio_max": 1.5, "throughput_ratio_min": 0.75, "error_ratio_delta_max": 0.05,
                   "prediction_mix_delta_max": 0.1},
}

# Grows the stub colours' counters from the plan: {"start": t0, "buckets": [...], "lead": ports,
# "phases": [{"seconds", "ports"}]}. Besides the predict route, /health gets 5 req/s of which 2 answer 500: the
# analysis must not count them.
WRITE = r"""#!/usr/bin/python3
import json, os, sys, time
HEADER = ["# TYPE grandmodel_ready gauge", "grandmodel_ready 1", "# TYPE grandmodel_draining gauge",
          "grandmodel_draining 0", "# TYPE grandmodel_model_info gauge",
          'grandmodel_model_info{model="strategic",version="1.0.0",sha256="0",service_version="1.0.0"} 1']
ROUTE = "/v1/models/strategic/predict"
plan = json.load(open(sys.argv[1]))
buckets = plan["buckets"]
state = {}
last = time.time()


def series(name, value, **labels):
    return "%s{%s} %r" % (name, ",".join('%s="%s"' % item for item in labels.items()), value)


while True:
    time.sleep(0.1)
    now = time.time()
    dt, last = now - last, now
    spec, at = plan["lead"], plan["start"]
    for phase in plan["phases"]:
        if now >= at:
            spec = phase["ports"]
        at += phase["seconds"]
    for port, p in spec.items():
        s = state.setdefault(port, {"ok": 10.0, "err": 0.0, "hok": 0.0, "herr": 0.0, "sum": 0.0,
                                    "buckets": [0.0] * len(buckets), "count": 0.0, "mix": {}})
        n = p["rps"] * dt
        s["ok"] += n * (1 - p["error_share"])
        s["err"] += n * p["error_share"]
        s["hok"] += 3 * dt
        s["herr"] += 2 * dt
        s["count"] += n
        for seconds, share in p["latencies"]:
            s["sum"] += n * share * seconds
            for i, le in enumerate(buckets):
                if seconds <= le:
                    s["buckets"][i] += n * share
        for action, share in p["mix"].items():
            s["mix"][action] = s["mix"].get(action, 0.0) + n * (1 - p["error_share"]) * share
        lines = HEADER + ["# TYPE grandmodel_http_requests_total counter"]
        for status, key, route in (("200", "ok", ROUTE), ("500", "err", ROUTE), ("200", "hok", "/health"),
                                   ("500", "herr", "/health")):
            lines.append(series("grandmodel_http_requests_total", s[key], route=route, method="POST", status=status))
        lines.append("# TYPE grandmodel_http_request_duration_seconds histogram")
        name = "grandmodel_http_request_duration_seconds"
        for le, count in list(zip(buckets, s["buckets"])) + [("+Inf", s["count"])]:
            lines.append(series(name + "_bucket", count, route=ROUTE, method="POST", le=le))
        lines.append(series(name + "_sum", s["sum"], route=ROUTE, method="POST"))
        lines.append(series(name + "_count", s["count"], route=ROUTE, method="POST"))
        lines.append("# TYPE grandmodel_predictions_total counter")
        for action, count in sorted(s["mix"].items()):
            lines.append(series("grandmodel_predictions_total", count, model="strategic", color=p["color"],
                                action=action))
        path = "/srv/stub-%s/metrics" % port
        with open(path + ".tmp", "w") as out:
            out.write("\n".join(lines) + "\n")
        os.chmod(path + ".tmp", 0o644)
        os.replace(path + ".tmp", path)
"""
# Exits 0 once Prometheus answers /-/ready, logged in with the role's password file (never on a command line).
READY = r"""
import base64, ssl, sys, urllib.request
context = ssl.create_default_context(cafile="/etc/grandmodel/pki/ca.crt")
token = base64.b64encode(b"grandmodel:" + open("/etc/prometheus/web-login", "rb").read()).decode()
request = urllib.request.Request("https://127.0.0.1:9090/-/ready", headers={"Authorization": "Basic " + token})
sys.exit(urllib.request.urlopen(request, timeout=2, context=context).status != 200)
"""


def inventory() -> str:
    return os.environ["MOLECULE_INVENTORY_FILE"]


def start_analysis(extra: dict, check: bool = False) -> subprocess.Popen:
    """The module on the monitored host through an ad-hoc ansible run (JSON output), not waited for."""
    args = dict(ANALYSIS, **extra)
    secrets = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "gm_analysis_vars.json"
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json", ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
    command = ["ansible", MONITORED, "-i", inventory(), "-m", "quantnova.grandmodel.prometheus_analysis",
               "-a", json.dumps(args), "-e", f"@{secrets}"] + (["--check"] if check else [])
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def result_of(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    try:
        # The JSON callback's document, between the lines the scenario's profiling callback prints around it.
        document, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])
        return document["plays"][0]["tasks"][0]["hosts"][MONITORED]
    except (ValueError, KeyError, IndexError) as exc:
        raise AssertionError(f"no module result ({exc}): {out[-2000:]} {err[-2000:]}") from exc


def start_and_wait_ready(host) -> None:
    """Start Prometheus and wait (in one round trip) until it answers /-/ready again."""
    ready = base64.b64encode(READY.encode()).decode()
    host.check_output("systemctl start prometheus && for i in $(seq 120); do"
                      f" echo {ready} | base64 -d | python3 - 2>/dev/null && exit 0; sleep 0.5; done; exit 1")


@pytest.fixture(scope="module")
def runs():
    """Runs the whole schedule once; returns every analysis result by name and the seconds it took."""
    started = time.monotonic()
    ephemeral = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
    monitoring = testinfra.get_host("ansible://gm-mol-monitoring", ansible_inventory=inventory())
    monitored = testinfra.get_host(f"ansible://{MONITORED}", ansible_inventory=inventory())
    password = (ephemeral / "monitoring_web_password").read_text().split()[0]
    secrets = ephemeral / "gm_analysis_vars.json"
    secrets.touch(mode=0o600)
    secrets.write_text(json.dumps({"gm_analysis_password": password}))
    originals = monitored.check_output("base64 -w0 /srv/stub-8001/metrics; echo; base64 -w0 /srv/stub-8002/metrics")
    start = time.time() + 4  # the lead-in (equal colours) gives every series a first scrape
    plan = {"start": start, "buckets": BUCKETS, "lead": {"8001": BLUE, "8002": GREEN},
            "phases": [{"name": name, "seconds": PHASE_S, "ports": {"8001": BLUE, "8002": green}}
                       for name, green in PHASES]}
    ca = base64.b64encode((ephemeral / "pki" / "ca.crt").read_bytes()).decode()
    writer = base64.b64encode(WRITE.encode()).decode()
    encoded_plan = base64.b64encode(json.dumps(plan).encode()).decode()
    monitored.check_output(
        f"echo {ca} | base64 -d > {CA} && echo {writer} | base64 -d > {WRITER} && chmod 0755 {WRITER}"
        f" && echo {encoded_plan} | base64 -d > {PLAN}"
        f" && (systemctl stop gm-analysis-writer 2>/dev/null; true)"
        f" && systemd-run --unit gm-analysis-writer --collect {WRITER} {PLAN}")
    results: dict[str, dict] = {}
    marks: dict[str, float] = {}
    try:
        procs = {
            # While the phases run: a wrong password and a CA that did not sign Prometheus' certificate.
            "wrong-password": start_analysis({"password": "not-the-password-0123456789"}),
            "untrusted-ca": start_analysis({"ca_path": "/etc/ssl/certs/ca-certificates.crt"}),
        }
        for index, (name, _) in enumerate(PHASES):
            end = start + (index + 1) * PHASE_S
            time.sleep(max(0.0, end + 2.5 - time.time()))  # the phase's last scrape is in
            at = {"at": round(end - 0.5, 3)}
            if name == "equal":
                procs["equal"] = start_analysis(at)
                procs["equal-check-mode"] = start_analysis(at, check=True)
            elif name == "idle":
                procs["idle"] = start_analysis(dict(at, fail_on=["failed"]))  # inconclusive: the caller decides
            else:
                procs[name] = start_analysis(at)
        marks = {"phases": time.monotonic() - started}
        results = {name: result_of(proc) for name, proc in procs.items()}
        marks["analyses"] = time.monotonic() - started
        monitoring.check_output("systemctl stop prometheus")
        try:
            results["stopped"] = result_of(start_analysis({}))
        finally:
            start_and_wait_ready(monitoring)
            marks["prometheus back"] = time.monotonic() - started
    finally:
        secrets.unlink(missing_ok=True)
        blue, green = originals.split()
        monitored.run(f"systemctl stop gm-analysis-writer; echo {blue} | base64 -d > /srv/stub-8001/metrics;"
                      f" echo {green} | base64 -d > /srv/stub-8002/metrics")
    seconds = time.monotonic() - started
    print(f"\nprometheus_analysis: {len(results)} analyses on the real Prometheus in {seconds:.1f}s ("
          + ", ".join(f"{mark} at {at:.1f}s" for mark, at in marks.items()) + ")")
    for name, result in results.items():
        shown = {c: f"{m['request_rate']:.2f} req/s, {m['error_ratio'] or 0:.4f} 5xx, p95 {m['latency_ms'] or 0:.2f} ms"
                 for c, m in result["measurements"].items()}
        print(f"  {name}: {result['outcome']} ({result['reason']}) {shown} {result.get('failed_checks', [])}"
              f" {result.get('msg', '')}")
    return results


def close(value: float, expected: float, tolerance: float) -> bool:
    return abs(value - expected) <= tolerance * expected


def bucket_of(seconds: float) -> tuple[float, float]:
    upper = min(b for b in BUCKETS if b >= seconds)
    lower = max([b for b in BUCKETS if b < upper] or [0.0])
    return lower, upper


def test_measurements_match_what_the_colours_exported(runs):
    result = runs["equal"]
    assert result["outcome"] == "successful" and not result.get("failed"), result["message"]
    for name, spec in (("blue", BLUE), ("green", GREEN)):
        m = result["measurements"][name]
        # The rate of the predict route only (the /health series, 500s included, are not counted), within the
        # jitter of a writer ticking every 0.1 s against scrapes every 2 s.
        assert close(m["request_rate"], spec["rps"], 0.1), m
        assert close(m["requests"], spec["rps"] * 5, 0.1), m
        assert abs(m["error_ratio"] - spec["error_share"]) < 0.001, m
        # histogram_quantile: in the bucket of the true p95 (20 ms), at the linear interpolation 10 + 0.5 * 15 ms.
        lower, upper = bucket_of(0.02)
        assert lower * 1000 < m["latency_ms"] <= upper * 1000 and close(m["latency_ms"], 17.5, 0.01), m
        assert close(m["throughput_per_weight"], 0.4, 0.1), m
        assert m["prediction_mix"].keys() == {"strategic"}
        assert all(abs(m["prediction_mix"]["strategic"][a] - share) < 0.01 for a, share in MIX.items()), m
    assert set(result["checks"]) == {"error_ratio_delta_max", "latency_ratio_max", "throughput_ratio_min",
                                     "prediction_mix_delta_max"}
    assert {c["status"] for c in result["checks"].values()} == {"passed"}, result["checks"]
    # Every query is returned with Prometheus' own answer, both colours from one query, at the asked time.
    assert [q["name"] for q in result["queries"]] == ["request_rate", "error_rate", "latency", "prediction_mix"]
    assert all({s["metric"]["color"] for s in q["result"]} == {"blue", "green"} for q in result["queries"])
    assert result["evaluated_at"] == result["queries"][0]["result"][0]["value"][0]


def test_check_mode_measures_and_decides_the_same(runs):
    check, real = runs["equal-check-mode"], runs["equal"]
    assert (check["outcome"], check["changed"]) == ("successful", False)
    assert check["measurements"] == real["measurements"]


def test_a_candidate_twice_as_slow_fails_naming_latency(runs):
    result = runs["slow"]
    assert (result["failed"], result["outcome"], result["failed_checks"]) == (True, "failed", ["latency_ratio_max"])
    green, blue = result["measurements"]["green"], result["measurements"]["blue"]
    lower, upper = bucket_of(0.04)
    assert lower * 1000 < green["latency_ms"] <= upper * 1000 and close(green["latency_ms"], 37.5, 0.01), green
    assert close(blue["latency_ms"], 17.5, 0.01), blue
    assert "latency p95 green 37.5 ms vs blue 17.5 ms" in result["msg"], result["msg"]
    assert result["msg"].startswith("Release analysis of green against blue from Prometheus at " + PROMETHEUS)


def test_a_candidate_with_ten_more_points_of_errors_fails_naming_errors(runs):
    result = runs["errors"]
    assert (result["failed"], result["outcome"], result["failed_checks"]) == (True, "failed",
                                                                              ["error_ratio_delta_max"])
    green, blue = result["measurements"]["green"], result["measurements"]["blue"]
    assert abs(green["error_ratio"] - 0.11) < 0.001 and abs(blue["error_ratio"] - 0.01) < 0.001
    assert "error ratio (5xx / all) green 0.11 vs blue 0.01" in result["msg"], result["msg"]


def test_a_candidate_without_traffic_is_inconclusive(runs):
    result = runs["idle"]
    assert not result.get("failed") and (result["outcome"], result["reason"]) == ("inconclusive", "too_few_requests")
    assert result["measurements"]["green"]["requests"] == 0
    assert "green served 0.0 requests in 5s, fewer than min_requests 20" in result["message"]


# Prometheus could not be asked: inconclusive (the analysis says nothing about the release) with the reason, and
# with the default fail_on a module failure whose message says what was attempted, on what and why.
@pytest.mark.parametrize(("case", "reason", "why"), [
    ("wrong-password", "prometheus_refused", "was refused with HTTP 401 (check the user and password)"),
    ("untrusted-ca", "prometheus_unreachable", "certificate"),
    ("stopped", "prometheus_unreachable", "connection refused"),
])
def test_prometheus_unusable_is_inconclusive_with_the_reason(runs, case, reason, why):
    result = runs[case]
    assert (result["failed"], result["outcome"], result["reason"]) == (True, "inconclusive", reason), result
    assert f"GET {PROMETHEUS}/api/v1/query" in result["msg"] and why in result["msg"], result["msg"]
    assert "Traceback" not in json.dumps(result) and result["measurements"] == {}
