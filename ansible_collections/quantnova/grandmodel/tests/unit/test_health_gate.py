"""health_gate: decision tables for verdicts, metrics and golden comparisons, then real loopback services."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import LoopbackServer, free_port, run_module

from ansible_collections.quantnova.grandmodel.plugins.module_utils.health import (
    ERROR,
    FAILED,
    SUCCESSFUL,
    ErrorRateWindow,
    GateConfig,
    HealthGateError,
    compare_golden,
    decide,
    error_rate,
    load_manifest,
    parse_prometheus,
    quantile,
    request_counts,
)
from ansible_collections.quantnova.grandmodel.plugins.modules import health_gate

S, F, E = SUCCESSFUL, FAILED, ERROR


# -- verdicts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("outcomes", "count", "failure_limit", "error_limit", "verdict", "reason"), [
    # all good, run to the end
    ([S, S, S], 3, 0, 4, S, "completed"),
    ([S, S], 3, 0, 4, None, None),
    # failures: one over the limit stops at once, however many are left
    ([F], 5, 0, 4, F, "failure_limit"),
    ([S, F], 5, 1, 4, None, None),
    ([S, F, S, F], 5, 1, 4, F, "failure_limit"),
    ([F, F, S, S, S], 5, 2, 4, S, "completed"),
    # consecutive errors: only an unbroken run counts
    ([E, E], 5, 0, 1, F, "consecutive_error_limit"),
    ([E, S, E, S, S], 5, 0, 1, S, "completed"),
    ([S, E, E, E, E, E], 6, 0, 4, F, "consecutive_error_limit"),
    ([E, E, E], 3, 0, 4, F, "no_successful_measurement"),
    ([E], 1, 0, 0, F, "consecutive_error_limit"),
    # errors are not failures
    ([E, S, S], 3, 0, 4, S, "completed"),
    # a gate never passes early, whatever the limits: the window's end could still be an error
    ([S], 5, 4, 4, None, None),
    ([S, F], 3, 2, 4, None, None),
    ([S, S, S, S], 5, 9, 9, None, None),
])
def test_decide(outcomes: list[str], count: int, failure_limit: int, error_limit: int,
                verdict: str | None, reason: str | None) -> None:
    assert decide(outcomes, count, failure_limit, error_limit) == (verdict, reason)


# Where errors sit in a full window of 8 measurements, with the limits of the post-promotion gate
# (failure_limit 0, consecutive_error_limit 2) and with generous ones (4, 4) where the old verdict
# passed trailing errors: first, middle, last, the last two, all.
WINDOW = 8


def window(errors_at: set[int], kind: str = E) -> list[str]:
    return [kind if index in errors_at else S for index in range(WINDOW)]


@pytest.mark.parametrize(("where", "outcomes", "error_limit", "verdict", "reason"), [
    ("first", window({0}), 2, S, "completed"),
    ("first two", window({0, 1}), 2, S, "completed"),
    ("middle", window({3}), 2, S, "completed"),
    ("middle run at the limit", window({3, 4}), 2, S, "completed"),
    ("middle run over the limit", window({3, 4, 5}), 2, F, "consecutive_error_limit"),
    ("last", window({7}), 2, F, "last_measurement_error"),
    ("last two", window({6, 7}), 2, F, "last_measurement_error"),
    ("last, generous limit", window({7}), 4, F, "last_measurement_error"),
    ("last two, generous limit", window({6, 7}), 4, F, "last_measurement_error"),
    ("last four, generous limit", window({4, 5, 6, 7}), 4, F, "last_measurement_error"),
    ("first and last", window({0, 7}), 4, F, "last_measurement_error"),
    ("all", window(set(range(WINDOW))), 8, F, "no_successful_measurement"),
    ("all but the last", window(set(range(WINDOW - 1))), 8, S, "completed"),
])
def test_decide_errors_anywhere_in_the_window(where: str, outcomes: list[str], error_limit: int,
                                              verdict: str, reason: str) -> None:
    assert decide(outcomes, WINDOW, 0, error_limit) == (verdict, reason), where


@pytest.mark.parametrize(("where", "outcomes", "failure_limit", "verdict", "reason"), [
    ("first", window({0}, F), 1, S, "completed"),
    ("middle", window({4}, F), 1, S, "completed"),
    ("last", window({7}, F), 1, F, "last_measurement_failed"),
    ("last, generous limit", window({7}, F), 5, F, "last_measurement_failed"),
    ("first and last, over the limit", window({0, 7}, F), 1, F, "failure_limit"),
    ("all", window(set(range(WINDOW)), F), 8, F, "no_successful_measurement"),
])
def test_decide_failures_anywhere_in_the_window(where: str, outcomes: list[str], failure_limit: int,
                                                verdict: str, reason: str) -> None:
    assert decide(outcomes, WINDOW, failure_limit, 8) == (verdict, reason), where


def test_decide_stops_at_the_first_measurement_that_breaks_a_limit() -> None:
    """Walk a window measurement by measurement: the verdict comes only at the end or on a broken limit."""
    outcomes: list[str] = []
    verdicts = []
    for outcome in [S, E, S, E, E, E, S, S]:
        outcomes.append(outcome)
        verdicts.append(decide(outcomes, WINDOW, 0, 2))
    assert verdicts[:5] == [(None, None)] * 5
    assert verdicts[5] == (F, "consecutive_error_limit")


# -- metrics -----------------------------------------------------------------------------------------

METRICS = """\
# HELP grandmodel_http_requests_total HTTP requests by route, method and status
# TYPE grandmodel_http_requests_total counter
grandmodel_http_requests_total{route="/v1/models/strategic/predict",method="POST",status="200"} 990.0
grandmodel_http_requests_total{route="/v1/models/strategic/predict",method="POST",status="503"} 10.0
grandmodel_http_requests_total{method="GET",route="/metrics",status="200"} 7.0
grandmodel_http_requests_total{route="/a \\"quoted\\" path",method="GET",status="404"} 1 1717000000000
grandmodel_http_request_duration_seconds_bucket{route="/health",method="GET",le="0.005"} 3.0
grandmodel_ready 1.0
"""


def test_parse_prometheus_reads_labels_escapes_and_timestamps() -> None:
    samples = parse_prometheus(METRICS, "grandmodel_http_requests_total")
    assert len(samples) == 4
    labels = {"method": "GET", "route": "/metrics", "status": "200"}
    assert samples[2] == ("grandmodel_http_requests_total", labels, 7.0)
    assert samples[3][1]["route"] == '/a "quoted" path'
    assert samples[3][2] == 1.0
    assert parse_prometheus(METRICS, "grandmodel_ready") == [("grandmodel_ready", {}, 1.0)]


def test_request_counts_leave_out_excluded_routes() -> None:
    counts = request_counts(METRICS, ("/metrics",))
    assert ("/metrics", "GET", "200") not in counts
    assert counts[("/v1/models/strategic/predict", "POST", "503")] == 10.0


P = ("/p", "POST", "200")
P5 = ("/p", "POST", "500")
H5 = ("/health", "GET", "503")


@pytest.mark.parametrize(("first", "last", "expected"), [
    ({}, {}, (0.0, 0.0, 0.0)),                                     # no traffic at all
    ({P: 100.0}, {P: 100.0}, (0.0, 0.0, 0.0)),                     # no traffic in the window
    ({P: 100.0, P5: 5.0}, {P: 190.0, P5: 15.0}, (0.1, 10.0, 100.0)),  # old errors do not count
    ({P: 100.0}, {P: 199.0, P5: 1.0}, (0.01, 1.0, 100.0)),         # a series that appears mid-window
    ({P: 1000.0, P5: 50.0}, {P: 30.0, P5: 10.0}, (0.25, 10.0, 40.0)),  # counters reset: service restarted
    ({P: 10.0, H5: 0.0}, {P: 10.0, H5: 4.0}, (1.0, 4.0, 4.0)),
])
def test_error_rate_is_a_delta_over_the_window(first: dict[Any, float], last: dict[Any, float],
                                               expected: tuple[float, float, float]) -> None:
    rate, errors, total = error_rate(first, last)
    assert (round(rate, 6), errors, total) == expected


def exposition(counts: dict[tuple[str, str, str], float], started: float | None = 1_700_000_000.0) -> str:
    lines = ["# TYPE grandmodel_http_requests_total counter"]
    for (route, method, status), value in counts.items():
        lines.append(f'grandmodel_http_requests_total{{route="{route}",method="{method}",status="{status}"}} {value}')
    if started is not None:
        lines.append(f"process_start_time_seconds {started}")
    return "\n".join(lines) + "\n"


LIVE = ("/v1/models/strategic/predict", "POST", "200")
LIVE5 = ("/v1/models/strategic/predict", "POST", "500")
ALIAS5 = ("/api/tactical/process", "POST", "503")


def test_a_restart_is_counted_from_zero_for_every_series_even_one_that_passed_its_old_value() -> None:
    # The numbers: before {200: 100, 500: 50}; after a restart {200: 1000, 500: 60}. Per-series
    # reset detection saw no reset (both went up) and reported 10 of 910 (1.1%); the truth is 60 of 1060.
    window = ErrorRateWindow()
    window.add(exposition({LIVE: 100.0, LIVE5: 50.0}, started=1000.0), {})
    window.add(exposition({LIVE: 1000.0, LIVE5: 60.0}, started=2000.0), {})
    assert (window.errors, window.requests, window.restarts) == (60.0, 1060.0, 1)
    assert round(window.rate, 4) == 0.0566
    # The same scrapes from one process (same start time): only the increase counts.
    same = ErrorRateWindow()
    same.add(exposition({LIVE: 100.0, LIVE5: 50.0}, started=1000.0), {})
    same.add(exposition({LIVE: 1000.0, LIVE5: 60.0}, started=1000.0), {})
    assert (same.errors, same.requests, same.restarts) == (10.0, 910.0, 0)


def test_deltas_are_summed_scrape_by_scrape_across_a_restart_without_start_time() -> None:
    window = ErrorRateWindow()
    window.add(exposition({LIVE: 1000.0, LIVE5: 50.0}, started=None), {})
    window.add(exposition({LIVE: 1090.0, LIVE5: 60.0}, started=None), {})   # +90 ok, +10 errors
    window.add(exposition({LIVE: 30.0, LIVE5: 70.0}, started=None), {})     # restart: 200 went down
    window.add(exposition({LIVE: 60.0, LIVE5: 70.0}, started=None), {})     # +30 ok
    assert (window.errors, window.requests, window.restarts) == (80.0, 230.0, 1)


def test_probes_and_the_gates_own_requests_do_not_dilute_the_rate() -> None:
    probes = {("/health", "GET", "200"): 500.0, ("/ready", "GET", "200"): 500.0, ("/metrics", "GET", "200"): 9.0,
              ("/version", "GET", "200"): 500.0, ("/admin/drain", "POST", "500"): 3.0}
    window = ErrorRateWindow()
    window.add(exposition({**probes, LIVE: 0.0}), {})
    # Between the scrapes: 10 client requests (5 failed on the alias route) and the gate's own 6 golden 200s.
    later = {key: value + 100.0 for key, value in probes.items()}
    window.add(exposition({**later, LIVE: 11.0, ALIAS5: 5.0}), {"200": 6})
    assert (window.errors, window.requests, window.own_requests) == (5.0, 10.0, 6.0)
    assert window.rate == 0.5


def test_a_service_that_counts_probes_apart_is_not_subtracted_twice() -> None:
    # The service exports grandmodel_probe_requests_total: the gate's golden requests (header
    # X-GrandModel-Probe) are there, not in the client series, which hold the 10 client requests alone.
    def counted_apart(counts: dict[tuple[str, str, str], float], probes: float) -> str:
        return exposition(counts) + (
            "# TYPE grandmodel_probe_requests_total counter\n"
            f'grandmodel_probe_requests_total{{route="{LIVE[0]}",method="POST",status="200"}} {probes}\n')

    window = ErrorRateWindow()
    window.add(counted_apart({LIVE: 0.0}, 0.0), {})
    window.add(counted_apart({LIVE: 5.0, ALIAS5: 5.0}, 6.0), {"200": 6, "500": 1})
    assert (window.errors, window.requests, window.own_requests) == (5.0, 10.0, 6.0 + 1.0)
    assert window.rate == 0.5


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([], 0.99, None),
    ([5.0], 0.99, 5.0),
    ([1.0, 2.0, 3.0, 4.0], 0.5, 2.0),
    ([1.0, 2.0, 3.0, 4.0], 0.99, 4.0),
    (list(map(float, range(1, 101))), 0.99, 99.0),
    ([3.0, 1.0, 2.0], 1.0, 3.0),
])
def test_quantile_nearest_rank(values: list[float], q: float, expected: float | None) -> None:
    assert quantile(values, q) == expected


# -- golden comparisons ------------------------------------------------------------------------------

GOLDEN = {"probabilities": [0.2, 0.28, 0.52], "value": 0.75, "action": "long"}


def answer(probabilities: list[float], value: float = 0.75, action: str = "long") -> dict[str, Any]:
    return {"predictions": [{"probabilities": probabilities, "value": value, "action": action}]}


@pytest.mark.parametrize(("response", "atol", "problem"), [
    (answer([0.2, 0.28, 0.52]), 1e-4, None),
    (answer([0.20005, 0.27995, 0.52]), 1e-4, None),
    (answer([0.2, 0.28, 0.41]), 1e-4, "probability[2] 0.41 differs from 0.52 by more than atol 0.0001"),
    (answer([0.2, 0.28, 0.5202]), 1e-4, "probability[2]"),
    (answer([0.2, 0.28, 0.5202]), 1e-3, None),
    (answer([0.2, 0.28, 0.52], value=0.7), 1e-4, "value 0.7 differs from 0.75"),
    (answer([0.2, 0.28, 0.52], action="short"), 1e-4, "action 'short' instead of 'long'"),
    (answer([0.2, 0.8]), 1e-4, "2 probabilities instead of 3"),
    (answer([0.2, float("nan"), 0.52]), 1e-4, "probability[1] nan"),
    ({"predictions": []}, 1e-4, "answer has no predictions[0]"),
    ({"detail": "boom"}, 1e-4, "answer has no predictions[0]"),
])
def test_compare_golden(response: dict[str, Any], atol: float, problem: str | None) -> None:
    result = compare_golden(GOLDEN, response, atol)
    if problem is None:
        assert result is None
    else:
        assert result is not None and problem in result


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"checks": ["golden"]}, "golden needs manifests"),
    ({"checks": ["latency", "error_rate"]}, "latency needs latency_threshold_ms; check error_rate needs"),
    ({"checks": ["version"]}, "version needs expected_version"),
    ({"checks": ["bogus"]}, "unknown check(s) bogus"),
    ({"count": 0}, "count must be at least 1"),
    ({"latency_quantile": 1.5}, "latency_quantile must be in (0, 1]"),
    ({"interval": -1.0}, "interval must be a finite number of seconds, 0 or more (got -1.0)"),
    ({"initial_delay": float("nan")}, "initial_delay must be a finite number"),
    ({"measurement_timeout": 0}, "measurement_timeout must be a finite number of seconds above 0"),
    ({"timeout": float("inf")}, "timeout must be a finite number of seconds above 0 (got inf)"),
    ({"error_rate_threshold": 1.5}, "error_rate_threshold must be a fraction in [0, 1]"),
    ({"error_rate_threshold": 0.01, "error_rate_min_requests": -1}, "error_rate_min_requests must not be negative"),
    ({"error_rate_threshold": 0.01, "error_rate_inconclusive": "maybe"}, "error_rate_inconclusive must be one of"),
    ({"error_rate_routes": "(unclosed"}, "error_rate_routes '(unclosed' is not a regular expression"),
    ({"latency_threshold_ms": -5}, "latency_threshold_ms must be a finite number above 0"),
])
def test_gate_config_refuses_what_cannot_be_checked(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(HealthGateError) as info:
        GateConfig("http://127.0.0.1:1", **kwargs)
    assert problem in str(info.value)


def test_gate_config_selects_what_is_configured() -> None:
    assert GateConfig("http://x").checks == ["health", "ready"]
    config = GateConfig("http://x", expected_color="green", latency_threshold_ms=10, error_rate_threshold=0.01)
    assert config.checks == ["health", "ready", "version", "latency", "error_rate"]


# -- against a real service on loopback --------------------------------------------------------------

def manifest_dict(name: str = "strategic", atol: float = 1e-4) -> dict[str, Any]:
    return {
        "name": name, "version": "2025.06.01", "sha256": "ab" * 32,
        "input": {"shape": [2, 3], "dtype": "float32"}, "output": {"actions": ["short", "neutral", "long"]},
        "golden": {"atol": atol, "samples": [
            {"input": [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], "probabilities": [0.2, 0.28, 0.52], "value": 0.75,
             "action": "long"},
            {"input": [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], "probabilities": [0.6, 0.3, 0.1], "value": -0.5,
             "action": "short"},
        ]},
    }


class FakeService:
    """A GrandModel-shaped service on loopback whose answers, faults and counters a test controls."""

    def __init__(self, server: LoopbackServer, manifest: dict[str, Any]) -> None:
        self.server = server
        self.manifest = manifest
        self.version, self.color = "1.4.0", "green"
        self.health_status = 200
        self.predict_status = 200
        self.skew = 0.0  # added to probability[2] of every prediction
        self.started = 1_700_000_000.0  # process_start_time_seconds
        self.live_per_scrape = 0  # client predictions (200) the service serves between two scrapes
        self.counts: dict[tuple[str, str, str], int] = {}
        self.lock = threading.Lock()
        name = manifest["name"]
        routes = {
            ("GET", "/health"): lambda: (self.health_status, {"status": "alive"}),
            ("GET", "/ready"): lambda: (200, {"status": "ready"}),
            ("GET", "/version"): self.version_answer,
            ("GET", "/metrics"): lambda: (200, self.metrics().encode()),
            ("POST", f"/v1/models/{name}/predict"): None,
        }
        for key, func in routes.items():
            server.routes[key] = self.counted(key, func)

    def counted(self, key: tuple[str, str], func: Any) -> Any:
        def route(_handler: Any, body: bytes) -> tuple[int, Any]:
            status, payload = func() if func else self.predict(body)
            self.record(key[1], key[0], status)
            return status, payload
        return route

    def record(self, route: str, method: str, status: int, n: int = 1) -> None:
        with self.lock:
            key = (route, method, str(status))
            self.counts[key] = self.counts.get(key, 0) + n

    def restart(self) -> None:
        """The process restarted: every counter from zero, a new start time."""
        with self.lock:
            self.counts.clear()
            self.started += 60.0

    def metrics(self) -> str:
        if self.live_per_scrape:
            self.record(f"/v1/models/{self.manifest['name']}/predict", "POST", 200, self.live_per_scrape)
        lines = ["# TYPE grandmodel_http_requests_total counter", f"process_start_time_seconds {self.started}"]
        with self.lock:
            for (route, method, status), n in sorted(self.counts.items()):
                labels = f'route="{route}",method="{method}",status="{status}"'
                lines.append(f"grandmodel_http_requests_total{{{labels}}} {n}.0")
        return "\n".join(lines) + "\n"

    def version_answer(self) -> tuple[int, Any]:
        return 200, {"service_version": self.version, "color": self.color, "env": "test", "models": {
            self.manifest["name"]: {"version": self.manifest["version"], "sha256": self.manifest["sha256"],
                                    "ready": True}}}

    def predict(self, body: bytes) -> tuple[int, Any]:
        if self.predict_status != 200:
            return self.predict_status, {"error": "inference failed"}
        inputs = json.loads(body)["inputs"]
        sample = next(s for s in self.manifest["golden"]["samples"] if s["input"] == inputs)
        probabilities = list(sample["probabilities"])
        probabilities[2] += self.skew
        return 200, answer(probabilities, sample["value"], sample["action"])


@pytest.fixture
def service(loopback_server: LoopbackServer, tmp_path: Path) -> tuple[FakeService, Path]:
    manifest = manifest_dict()
    path = tmp_path / "strategic.json"
    path.write_text(json.dumps(manifest))
    return FakeService(loopback_server, manifest), path


def gate_args(svc: FakeService, manifest: Path, **extra: Any) -> dict[str, Any]:
    args = dict(url=svc.server.url, interval=0.05, count=3, timeout=2.0, manifests=[str(manifest)],
                expected_version="1.4.0", expected_color="green", latency_threshold_ms=1000.0,
                error_rate_threshold=0.01)
    args.update(extra)
    return args


def test_healthy_service_passes_every_check(service: tuple[FakeService, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    svc, manifest = service
    svc.live_per_scrape = 15
    result = run_module(health_gate.main, gate_args(svc, manifest), capsys, check_mode=True)
    assert not result.get("failed"), result
    assert result["changed"] is False
    assert result["passed"] is True
    summary = result["summary"]
    assert (summary["verdict"], summary["reason"], summary["measurements"], summary["successful"]) == (
        "passed", "completed", 3, 3)
    assert summary["checks"] == ["health", "ready", "version", "golden", "latency", "error_rate"]
    checks = result["measurements"][0]["checks"]
    assert all(c["ok"] for c in checks.values())
    assert checks["golden"]["value"] == 2
    assert checks["version"]["value"]["models"]["strategic"]["version"] == "2025.06.01"
    # Exactly the client requests count: the gate's own golden predictions (2 per measurement, counted by the
    # service on the same route) and its probes are left out. The first scrape is the baseline.
    assert summary["error_rate"]["error_rate"] == 0.0
    assert summary["error_rate"]["requests"] == 2 * 15
    assert summary["error_rate"]["gate_requests_excluded"] == 2 * 2
    assert summary["error_rate"]["inconclusive"] is False
    assert summary["latency_ms"]["samples"] == 6
    assert len([r for r in svc.server.requests if r[1] == "/v1/models/strategic/predict"]) == 6


def test_wrong_version_fails_at_once_naming_value_and_expectation(
        service: tuple[FakeService, Path], capsys: pytest.CaptureFixture[str]) -> None:
    svc, manifest = service
    svc.version = "1.3.0"
    result = run_module(health_gate.main, gate_args(svc, manifest, count=5), capsys)
    assert result["failed"] is True and result["passed"] is False
    assert result["msg"] == ("health gate failed: version check: service_version '1.3.0' instead of '1.4.0' "
                             "in 1 of 1 measurements (failure_limit 0)")
    assert result["summary"]["stopped_early"] is True


def test_wrong_golden_output_fails_over_the_failure_limit(
        service: tuple[FakeService, Path], capsys: pytest.CaptureFixture[str]) -> None:
    svc, manifest = service
    svc.skew = -0.11
    result = run_module(health_gate.main, gate_args(svc, manifest, count=5, failure_limit=1), capsys)
    assert result["failed"] is True
    assert result["msg"].startswith("health gate failed: golden check on strategic: probability[2] 0.41 differs "
                                    "from 0.52 by more than atol 0.0001")
    assert result["msg"].endswith("in 2 of 2 measurements (failure_limit 1)")
    assert [m["phase"] for m in result["measurements"]] == ["failed", "failed"]


def test_slow_service_fails_the_latency_check(service: tuple[FakeService, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    svc, manifest = service
    svc.server.delay = 0.08
    result = run_module(health_gate.main, gate_args(svc, manifest, count=2, latency_threshold_ms=40.0,
                                                    checks=["health", "golden", "latency"]), capsys)
    assert result["failed"] is True
    assert "latency check: p99" in result["msg"] and "exceeds 40.0 ms" in result["msg"]
    assert result["measurements"][0]["checks"]["latency"]["value"] >= 80.0


def test_service_slower_than_the_timeout_counts_as_errors(service: tuple[FakeService, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    svc, _manifest = service
    svc.server.delay = 0.5
    result = run_module(health_gate.main, dict(url=svc.server.url, interval=0.01, count=5, timeout=0.2,
                                               consecutive_error_limit=1, checks=["health"]), capsys)
    assert result["failed"] is True
    assert result["msg"].startswith("health gate failed: 2 consecutive measurements could not be made "
                                    "(consecutive_error_limit 1); last: health check: GET ")
    assert "timed out" in result["msg"]
    assert [m["phase"] for m in result["measurements"]] == ["error", "error"]


@pytest.mark.parametrize(("fault", "expected"), [
    ("health_500", "health check: GET /health answered 500"),
    ("predict_503", "golden check on strategic: POST http://"),
    ("live_5xx", "error_rate check: 0.5000 (10 of 20 live requests answered 5xx in the window) exceeds 0.01"),
])
def test_5xx_answers_fail_the_gate(service: tuple[FakeService, Path], capsys: pytest.CaptureFixture[str],
                                   fault: str, expected: str) -> None:
    svc, manifest = service
    args = gate_args(svc, manifest, count=2)
    if fault == "health_500":
        svc.health_status = 500
    elif fault == "predict_503":
        svc.predict_status = 503
    else:
        # Live traffic between the gate's scrapes: 10 of 20 client requests fail. Only the scrape decides here.
        args.update(checks=["error_rate"], count=2)
        original = svc.metrics

        def metrics_then_traffic() -> str:
            text = original()
            svc.record("/v1/models/tactical/predict", "POST", 200, 10)
            svc.record("/v1/models/tactical/predict", "POST", 502, 10)
            return text
        svc.metrics = metrics_then_traffic  # type: ignore[method-assign]
    result = run_module(health_gate.main, args, capsys)
    assert result["failed"] is True
    assert expected in result["msg"], result["msg"]


def test_unreachable_service_is_errors_not_failures(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_module(health_gate.main, dict(url=f"http://127.0.0.1:{free_port()}", interval=0.01, count=3,
                                               timeout=1.0), capsys)
    assert result["failed"] is True
    assert result["summary"]["reason"] == "no_successful_measurement"
    assert result["summary"]["errors"] == 3
    assert "connection refused" in result["msg"]


def test_manifest_problems_are_reported_with_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "m.json"
    bad.write_text('{"name": "strategic"}')
    with pytest.raises(HealthGateError, match=r"m.json lacks a usable name or golden section"):
        load_manifest(str(bad))
    result = run_module(health_gate.main, dict(url="http://127.0.0.1:1", manifests=[str(tmp_path / "none.json")]),
                        capsys)
    assert result["failed"] is True
    assert "cannot read model manifest" in result["msg"] and "none.json" in result["msg"]


# -- the promises under faults: dead or hung at the end, restarts, quiet windows, broken answers ----------

def test_no_live_traffic_is_inconclusive_and_fails_unless_told_otherwise(
        service: tuple[FakeService, Path], capsys: pytest.CaptureFixture[str]) -> None:
    svc, manifest = service
    result = run_module(health_gate.main, gate_args(svc, manifest), capsys)
    assert result["failed"] is True and result["summary"]["reason"] == "error_rate_inconclusive"
    assert result["msg"] == ("health gate failed: error rate inconclusive: only 0 live requests reached the service in "
                             "the window, fewer than error_rate_min_requests 20 (error_rate_inconclusive=fail)")
    # Every measurement was fine on its own: inconclusive is the window's verdict, not a failed check.
    assert [m["phase"] for m in result["measurements"]] == ["successful"] * 3
    assert "inconclusive so far" in result["measurements"][-1]["checks"]["error_rate"]["message"]
    relaxed = run_module(health_gate.main, gate_args(svc, manifest, error_rate_inconclusive="pass"), capsys)
    assert relaxed["passed"] is True and relaxed["summary"]["error_rate"]["inconclusive"] is True
    assert "error rate inconclusive (0 live requests, fewer than 20) and passed" in relaxed["summary"]["message"]


def test_a_burst_of_errors_fails_before_the_minimum_traffic_is_reached(
        service: tuple[FakeService, Path], capsys: pytest.CaptureFixture[str]) -> None:
    svc, manifest = service
    original = svc.metrics

    def metrics_then_failures() -> str:
        text = original()
        svc.record("/v1/models/strategic/predict", "POST", 503, 5)
        return text
    svc.metrics = metrics_then_failures  # type: ignore[method-assign]
    result = run_module(health_gate.main, gate_args(svc, manifest, checks=["error_rate"], count=4), capsys)
    assert result["failed"] is True and result["summary"]["reason"] == "failure_limit"
    # 5 of 5 live requests failed: judged as 5 of the 20 required, 0.25 > 0.01, at the second scrape.
    assert "error_rate check: 0.2500 (5 of 5 live requests answered 5xx in the window)" in result["msg"]
    assert result["summary"]["measurements"] == 2


def test_a_restart_in_the_window_does_not_hide_its_errors(
        service: tuple[FakeService, Path], capsys: pytest.CaptureFixture[str]) -> None:
    svc, manifest = service
    svc.record("/v1/models/strategic/predict", "POST", 200, 100)
    svc.record("/v1/models/strategic/predict", "POST", 500, 50)
    scrapes = {"n": 0}
    original = svc.metrics

    def restarting_metrics() -> str:
        scrapes["n"] += 1
        if scrapes["n"] == 2:  # between the first and second scrape the service restarted and served 1060
            svc.restart()
            svc.record("/v1/models/strategic/predict", "POST", 200, 1000)
            svc.record("/v1/models/strategic/predict", "POST", 500, 60)
        return original()
    svc.metrics = restarting_metrics  # type: ignore[method-assign]
    result = run_module(health_gate.main, gate_args(svc, manifest, checks=["error_rate"], count=2,
                                                    error_rate_threshold=0.05), capsys)
    assert result["failed"] is True
    assert "error_rate check: 0.0566 (60 of 1060 live requests answered 5xx in the window (1 restart(s) of the " \
           "service counted from zero)) exceeds 0.05" in result["msg"]
    assert result["summary"]["error_rate"]["restarts_detected"] == 1


def test_a_service_that_hangs_before_the_last_measurement_is_not_promoted(
        service: tuple[FakeService, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """The bug of the issue: errors at the end of the window stayed within consecutive_error_limit and passed."""
    svc, manifest = service
    svc.live_per_scrape = 15
    original = svc.server.routes[("GET", "/health")]
    calls = {"n": 0}

    def health_then_hang(handler: Any, body: bytes) -> tuple[int, Any]:
        calls["n"] += 1
        if calls["n"] >= 5:  # measurements 5 and 6 of 6: the service stopped answering
            svc.server.delay = 1.5
        return original(handler, body)
    svc.server.routes[("GET", "/health")] = health_then_hang
    args = gate_args(svc, manifest, count=6, consecutive_error_limit=4, timeout=0.3, measurement_timeout=0.5)
    started = time.monotonic()
    result = run_module(health_gate.main, args, capsys)
    elapsed = time.monotonic() - started
    assert result["failed"] is True, result["msg"]
    assert result["summary"]["reason"] == "last_measurement_error"
    assert [m["phase"] for m in result["measurements"]] == ["successful"] * 4 + ["error"] * 2
    assert result["msg"].startswith("health gate failed: the last of 6 measurements could not be made")
    assert "timed out" in result["msg"]
    # Each hung measurement cost about its budget, not one request timeout per check (6 checks).
    last = result["measurements"][-1]["checks"]
    assert "used up its budget of 0.5s" in last["error_rate"]["message"]
    assert elapsed < 4 * 0.3 + 2 * 0.5 + 2.0


class RawServer:
    """A TCP server on loopback that answers every connection with fixed raw bytes (or nothing at all)."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _peer = self.sock.accept()
            except OSError:
                return
            if self.answer is None:  # accept and never answer: a hung (SIGSTOPped) process looks the same
                self.held.append(conn)
                continue
            try:
                conn.recv(65536)
                conn.sendall(self.answer)
            finally:
                conn.close()

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone leaves the port listening.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize(("answer", "expected"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"status\": ", "IncompleteRead"),
    (b"garbage\r\n\r\n", "BadStatusLine"),
    (b"", "RemoteDisconnected"),
    (None, "timed out"),
])
def test_broken_answers_are_errors_with_a_reason_never_a_crash(
        capsys: pytest.CaptureFixture[str], answer: bytes | None, expected: str) -> None:
    server = RawServer(answer)
    try:
        started = time.monotonic()
        result = run_module(health_gate.main, dict(url=f"http://127.0.0.1:{server.port}", interval=0.01, count=3,
                                                   timeout=0.3, consecutive_error_limit=5), capsys)
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert result["failed"] is True
    assert result["summary"]["reason"] == "no_successful_measurement"
    assert [m["phase"] for m in result["measurements"]] == ["error"] * 3
    assert expected in result["msg"], result["msg"]
    assert elapsed < 3 * 0.6 + 1.5  # bounded by the measurement budgets (2 x timeout each)
