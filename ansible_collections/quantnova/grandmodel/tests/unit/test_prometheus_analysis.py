"""Unit tests of the Prometheus release analysis: the decision table, the queries, the client's failures and the
module end to end against a loopback server that answers like Prometheus' query API."""

from __future__ import annotations

import json
import math
import urllib.parse
from typing import Any

import pytest
from conftest import LoopbackServer, free_port, run_module

from ansible_collections.quantnova.grandmodel.plugins.module_utils.prometheus_analysis import (
    AnalysisConfig,
    AnalysisError,
    Colour,
    Measurement,
    Prometheus,
    PrometheusUnavailable,
    Thresholds,
    build_queries,
    decide,
    measurements_from,
    run_analysis,
    validate,
    window_seconds,
)
from ansible_collections.quantnova.grandmodel.plugins.modules import prometheus_analysis

SEEDS = Thresholds(latency_ratio_max=1.5, throughput_ratio_min=0.75, error_ratio_delta_max=0.05)
MIX = {"strategic": {"buy": 0.3, "hold": 0.5, "sell": 0.2}}


def config(**kw: Any) -> AnalysisConfig:
    base = dict(url="https://p:9090", candidate=Colour("green", 25), baseline=Colour("blue", 75), thresholds=SEEDS,
                window="60s", min_requests=20, latency_quantile=0.95)
    base.update(kw)
    return AnalysisConfig(**base)


def colour(name: str, weight: float, rate: float | None, errors: float = 0.0, latency: float | None = 0.02,
           mix: dict | None = None) -> Measurement:
    return Measurement(color=name, window_s=60.0, weight=weight, request_rate=rate, error_rate=errors,
                       latency_s=latency, prediction_mix=MIX if mix is None else mix)


BLUE = colour("blue", 75, 3.0, errors=0.03)  # 1% errors, 20 ms, 0.04 req/s per unit of weight
# (id, candidate, thresholds override, outcome, reason, failed checks)
DECISIONS = [
    ("equal", colour("green", 25, 1.0, 0.01), None, "successful", "within_thresholds", []),
    ("latency-2x", colour("green", 25, 1.0, 0.01, latency=0.04), None, "failed", "threshold",
     ["latency_ratio_max"]),
    ("latency-at-the-limit", colour("green", 25, 1.0, 0.01, latency=0.03), None, "successful", "within_thresholds",
     []),
    ("errors-plus-10-points", colour("green", 25, 1.0, 0.11), None, "failed", "threshold",
     ["error_ratio_delta_max"]),
    ("throughput-halved", colour("green", 25, 0.5, 0.005), None, "failed", "threshold", ["throughput_ratio_min"]),
    ("latency-and-errors", colour("green", 25, 1.0, 0.2, latency=0.1), None, "failed", "threshold",
     ["error_ratio_delta_max", "latency_ratio_max"]),
    ("no-traffic", colour("green", 25, 0.0, 0.0, latency=None, mix={}), None, "inconclusive", "too_few_requests", []),
    ("too-few-even-if-bad", colour("green", 25, 0.2, 0.2, latency=1.0), None, "inconclusive", "too_few_requests",
     []),
    ("no-series", colour("green", 25, None, latency=None, mix={}), None, "inconclusive", "no_data", []),
    ("no-latency-observed", colour("green", 25, 1.0, 0.01, latency=None), None, "inconclusive", "no_data", []),
    ("absolute-latency", colour("green", 25, 1.0, 0.01, latency=0.03), Thresholds(latency_max_ms=25), "failed",
     "threshold", ["latency_max_ms"]),
    ("absolute-errors", colour("green", 25, 1.0, 0.03), Thresholds(error_ratio_max=0.02), "failed", "threshold",
     ["error_ratio_max"]),
    ("mix-shifted", colour("green", 25, 1.0, 0.01, mix={"strategic": {"buy": 0.6, "hold": 0.3, "sell": 0.1}}),
     Thresholds(prediction_mix_delta_max=0.1), "failed", "threshold", ["prediction_mix_delta_max"]),
    ("mix-equal", colour("green", 25, 1.0, 0.01), Thresholds(prediction_mix_delta_max=0.1), "successful",
     "within_thresholds", []),
    ("mix-missing", colour("green", 25, 1.0, 0.01, mix={}), Thresholds(prediction_mix_delta_max=0.1),
     "inconclusive", "no_data", []),
]


@pytest.mark.parametrize(("candidate", "thresholds", "outcome", "reason", "failed"),
                         [pytest.param(*case[1:], id=case[0]) for case in DECISIONS])
def test_decision_table(candidate, thresholds, outcome, reason, failed):
    cfg = config(thresholds=thresholds or SEEDS)
    verdict = decide(cfg, {"green": candidate, "blue": BLUE})
    assert (verdict["outcome"], verdict["reason"], verdict["failed_checks"]) == (outcome, reason, failed), verdict
    for name in failed:  # the message names each failed check with its values
        assert name in verdict["message"], verdict["message"]


def test_failure_messages_name_latency_and_errors_with_both_colours_values():
    verdict = decide(config(), {"green": colour("green", 25, 1.0, 0.2, latency=0.1), "blue": BLUE})
    assert "latency p95 green 100 ms vs blue 20 ms, ratio 5 (must be <= 1.5)" in verdict["message"]
    assert "error ratio (5xx / all) green 0.2 vs blue 0.01, delta 0.19 (must be <= 0.05)" in verdict["message"]
    assert verdict["checks"]["throughput_ratio_min"]["status"] == "passed"


@pytest.mark.parametrize(("window", "seconds"), [("30s", 30), ("5m", 300), ("1h30m", 5400), ("1500ms", 1.5)])
def test_window_seconds(window, seconds):
    assert window_seconds(window) == seconds


BAD_CONFIGS = [
    ("no-threshold", dict(thresholds=Thresholds()), "no threshold is set"),
    ("relative-without-baseline", dict(baseline=None), "compare with the baseline colour, so baseline is required"),
    ("same-colour", dict(baseline=Colour("green", 25)), "baseline and candidate are the same colour (green)"),
    ("bad-window", dict(window="five minutes"), "window 'five minutes' is not a Prometheus duration"),
    ("empty-window", dict(window="0s"), "window '0s' is empty"),
    ("quantile", dict(latency_quantile=99.0), "latency_quantile 99.0 is not between 0 and 1"),
    ("no-weight", dict(candidate=Colour("green")), "needs each colour's traffic weight (> 0); missing for green"),
    ("negative", dict(thresholds=Thresholds(latency_ratio_max=-1)), "thresholds cannot be negative"),
]


@pytest.mark.parametrize(("override", "message"), [pytest.param(*c[1:], id=c[0]) for c in BAD_CONFIGS])
def test_bad_input_is_refused_before_anything_is_asked(override, message):
    with pytest.raises(AnalysisError, match=None) as caught:
        validate(config(**override))
    assert message in str(caught.value)


def test_queries_select_both_colours_in_one_query_and_escape_labels():
    queries = build_queries(config(routes='/a"b', job="grand\\model"))
    assert set(queries) == {"request_rate", "error_rate", "latency", "prediction_mix"}
    assert queries["request_rate"] == ('sum by (color) (rate(grandmodel_http_requests_total{job="grand\\\\model", '
                                       'color=~"green|blue", route=~"/a\\"b"}[60s]))')
    assert 'status=~"5.."' in queries["error_rate"]
    assert queries["latency"].startswith("histogram_quantile(0.95, sum by (color, le) (rate(")
    assert "route" not in queries["prediction_mix"]


def sample(color: str, value: str, **labels: str) -> dict:
    return {"metric": {"color": color, **labels}, "value": [1700000000.0, value]}


def test_measurements_from_answers():
    answers = {
        "request_rate": [sample("green", "1"), sample("blue", "3")],
        "error_rate": [sample("blue", "0.03")],  # green has no 5xx series: 0
        "latency": [sample("green", "NaN"), sample("blue", "0.0175")],
        "prediction_mix": [sample("blue", "0.9", model="strategic", action="buy"),
                           sample("blue", "2.1", model="strategic", action="hold")],
    }
    measured = measurements_from(config(), answers)
    green, blue = measured["green"], measured["blue"]
    assert (green.requests, green.error_ratio, green.latency_s, green.prediction_mix) == (60.0, 0.0, None, {})
    assert math.isclose(blue.error_ratio, 0.01) and blue.latency_s == 0.0175
    assert blue.prediction_mix == {"strategic": {"buy": 0.3, "hold": 0.7}}
    assert math.isclose(blue.throughput_per_weight, 0.04) and math.isclose(green.throughput_per_weight, 0.04)


def prometheus_route(answers: dict[str, list[dict]], seen: list[str]):
    """Answers /api/v1/query like Prometheus: the vector for the measurement whose metric the query names."""
    def route(handler, _body):
        params = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        promql = params["query"][0]
        seen.append(promql)
        if "histogram_quantile" in promql:
            key = "latency"
        elif "predictions" in promql:
            key = "prediction_mix"
        elif "5.." in promql:
            key = "error_rate"
        else:
            key = "request_rate"
        return 200, {"status": "success", "data": {"resultType": "vector", "result": answers.get(key, [])}}
    return route


@pytest.fixture
def fake_prometheus():
    server = LoopbackServer().start()
    yield server
    server.stop()


MODULE_ARGS = dict(candidate={"color": "green", "weight": 25}, baseline={"color": "blue", "weight": 75},
                   window="60s", latency_quantile=0.95, username="grandmodel", password="secret-password-1234",
                   thresholds={"latency_ratio_max": 1.5, "throughput_ratio_min": 0.75, "error_ratio_delta_max": 0.05})


def answers_for(green_latency: str) -> dict[str, list[dict]]:
    return {"request_rate": [sample("green", "1"), sample("blue", "3")],
            "error_rate": [sample("green", "0.01"), sample("blue", "0.03")],
            "latency": [sample("green", green_latency), sample("blue", "0.02")]}


@pytest.mark.parametrize(("latency", "outcome", "fails"), [("0.02", "successful", False), ("0.05", "failed", True)])
def test_module_end_to_end(fake_prometheus, capsys, latency, outcome, fails):
    seen: list[str] = []
    fake_prometheus.routes[("GET", "/api/v1/query")] = prometheus_route(answers_for(latency), seen)
    result = run_module(prometheus_analysis.main, dict(MODULE_ARGS, url=fake_prometheus.url, at=1700000000.5),
                        capsys, check_mode=True)
    verdict = (result["outcome"], bool(result.get("failed")), result.get("changed", False))
    assert verdict == (outcome, fails, False), result
    assert len(seen) == 4 and all("time=1700000000.500" in request[1] for request in fake_prometheus.requests)
    assert [q["name"] for q in result["queries"]] == ["request_rate", "error_rate", "latency", "prediction_mix"]
    assert result["measurements"]["green"]["latency_ms"] == float(latency) * 1000
    assert "secret-password-1234" not in json.dumps(result)
    if fails:
        assert result["msg"].startswith("Release analysis of green against blue from Prometheus at http://127.0.0.1:")
        assert "latency_ratio_max" in result["msg"]


def test_module_sends_basic_auth(fake_prometheus, capsys):
    headers: list[str] = []

    def route(handler, body):
        headers.append(handler.headers.get("Authorization", ""))
        return prometheus_route(answers_for("0.02"), [])(handler, body)

    fake_prometheus.routes[("GET", "/api/v1/query")] = route
    run_module(prometheus_analysis.main, dict(MODULE_ARGS, url=fake_prometheus.url), capsys)
    assert headers and set(headers) == {"Basic Z3JhbmRtb2RlbDpzZWNyZXQtcGFzc3dvcmQtMTIzNA=="}


FAULTS = [
    ("refused-login", lambda h, b: (401, b"Unauthorized\n"), "prometheus_refused", "refused with HTTP 401"),
    ("bad-query", lambda h, b: (400, {"status": "error", "errorType": "bad_data", "error": "parse error"}),
     "prometheus_error", "answered HTTP 400"),
    ("not-json", lambda h, b: (200, b"<html>proxy</html>"), "prometheus_error", "body that is not JSON"),
    ("matrix", lambda h, b: (200, {"status": "success", "data": {"resultType": "matrix", "result": []}}),
     "prometheus_error", "not a vector"),
]


@pytest.mark.parametrize(("answer", "reason", "message"), [pytest.param(*f[1:], id=f[0]) for f in FAULTS])
def test_prometheus_faults_are_inconclusive_with_the_reason(fake_prometheus, capsys, answer, reason, message):
    fake_prometheus.routes[("GET", "/api/v1/query")] = answer
    result = run_module(prometheus_analysis.main, dict(MODULE_ARGS, url=fake_prometheus.url), capsys)
    assert (result["failed"], result["outcome"], result["reason"]) == (True, "inconclusive", reason), result
    assert message in result["msg"] and "Traceback" not in json.dumps(result)
    # fail_on [failed]: inconclusive is the caller's to decide, the module does not fail.
    result = run_module(prometheus_analysis.main, dict(MODULE_ARGS, url=fake_prometheus.url, fail_on=["failed"]),
                        capsys)
    assert not result.get("failed") and result["outcome"] == "inconclusive", result


def test_unreachable_prometheus_is_inconclusive(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PrometheusUnavailable) as caught:
        Prometheus(url).query("up", 0)
    assert caught.value.reason == "prometheus_unreachable" and "connection refused" in str(caught.value)
    result = run_analysis(config(url=url), Prometheus(url, timeout=2))
    assert (result["outcome"], result["reason"], result["measurements"]) == ("inconclusive",
                                                                             "prometheus_unreachable", {})
    assert result["queries"][0]["error"].startswith(f"GET {url}/api/v1/query failed")


def test_module_refuses_bad_input_with_what_to_fix(capsys):
    result = run_module(prometheus_analysis.main, dict(MODULE_ARGS, url="http://127.0.0.1:1", baseline=None),
                        capsys)
    assert result["failed"] and result["msg"].startswith(
        "Cannot analyse green against no baseline with Prometheus at http://127.0.0.1:1: error_ratio_delta_max,"
        " latency_ratio_max, throughput_ratio_min compare with the baseline colour, so baseline is required")
