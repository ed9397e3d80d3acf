# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Release analysis from Prometheus: the candidate colour against the baseline colour, same window.

Every measurement is an instant PromQL query evaluated at one timestamp for both colours at once
(`sum by (color)`), so the two colours are always compared over the very same window. The decision
(`decide`) is a pure function of the measurements and the thresholds:

- `inconclusive` when a compared colour has no data or fewer than `min_requests` requests in the
  window, when a check lacks an input (a latency with no observation), or when Prometheus could not
  be asked (unreachable, refused, untrusted certificate, query error): the analysis could not be made,
  and the caller decides what that means.
- otherwise `failed` when any check is beyond its threshold (the message names every such check),
- otherwise `successful`.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
from dataclasses import dataclass, field

from ansible.module_utils.urls import ConnectionError as UrlsConnectionError
from ansible.module_utils.urls import open_url

SUCCESSFUL, FAILED, INCONCLUSIVE = "successful", "failed", "inconclusive"
PASSED = "passed"
REQUESTS_METRIC = "grandmodel_http_requests_total"
DURATION_METRIC = "grandmodel_http_request_duration_seconds_bucket"
PREDICTIONS_METRIC = "grandmodel_predictions_total"
#: The routes clients use (the predict API and its alias); a PromQL regex, anchored by Prometheus.
LIVE_ROUTES = "/v1/models/[^/]+/predict|/api/[^/]+/process"
#: Thresholds compared with the candidate alone, and those compared with the baseline (need one).
ABSOLUTE_THRESHOLDS = ("error_ratio_max", "latency_max_ms")
RELATIVE_THRESHOLDS = ("error_ratio_delta_max", "latency_ratio_max", "throughput_ratio_min",
                       "prediction_mix_delta_max")
THRESHOLDS = ABSOLUTE_THRESHOLDS + RELATIVE_THRESHOLDS
_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")
_DURATION_UNITS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)


class AnalysisError(Exception):
    """The analysis was configured wrongly (bad input): nothing was asked."""


class PrometheusUnavailable(Exception):
    """Prometheus could not be asked or did not answer a query; `reason` is a short machine word."""

    def __init__(self, msg: str, reason: str) -> None:
        super().__init__(msg)
        self.reason = reason


@dataclass(frozen=True)
class Colour:
    color: str
    weight: float | None = None


@dataclass(frozen=True)
class Thresholds:
    error_ratio_max: float | None = None
    error_ratio_delta_max: float | None = None
    latency_max_ms: float | None = None
    latency_ratio_max: float | None = None
    throughput_ratio_min: float | None = None
    prediction_mix_delta_max: float | None = None

    def configured(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in THRESHOLDS if getattr(self, name) is not None}


@dataclass(frozen=True)
class AnalysisConfig:
    url: str
    candidate: Colour
    baseline: Colour | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    window: str = "5m"
    at: float | None = None
    job: str = "grandmodel"
    color_label: str = "color"
    routes: str = LIVE_ROUTES
    latency_quantile: float = 0.99
    min_requests: int = 20


@dataclass(frozen=True)
class Measurement:
    """One colour over the window; None where Prometheus had no data."""

    color: str
    window_s: float
    weight: float | None = None
    request_rate: float | None = None
    error_rate: float | None = None
    latency_s: float | None = None
    prediction_mix: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def requests(self) -> float | None:
        return None if self.request_rate is None else self.request_rate * self.window_s

    @property
    def error_ratio(self) -> float | None:
        if not self.request_rate:
            return None
        return (self.error_rate or 0.0) / self.request_rate

    @property
    def throughput_per_weight(self) -> float | None:
        if self.request_rate is None or not self.weight:
            return None
        return self.request_rate / self.weight

    def evidence(self) -> dict:
        latency_ms = None if self.latency_s is None else round(self.latency_s * 1000, 6)
        return {"color": self.color, "weight": self.weight, "window_s": self.window_s,
                "request_rate": self.request_rate, "requests": self.requests, "error_rate": self.error_rate,
                "error_ratio": self.error_ratio, "latency_ms": latency_ms,
                "throughput_per_weight": self.throughput_per_weight, "prediction_mix": self.prediction_mix}


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # passed, failed or inconclusive
    value: float | None
    threshold: float
    message: str

    def evidence(self) -> dict:
        return {"status": self.status, "value": self.value, "threshold": self.threshold, "message": self.message}


def window_seconds(window: str) -> float:
    """Seconds of a PromQL duration (`5m`, `1h30m`, `90s`); AnalysisError if it is not one."""
    match = _DURATION.match(window or "")
    if not window or not match:
        raise AnalysisError("window %r is not a Prometheus duration such as 30s, 5m or 1h30m" % (window,))
    seconds = sum(int(n) * _DURATION_UNITS[i] for i, n in enumerate(match.groups()) if n)
    if seconds <= 0:
        raise AnalysisError("window %r is empty: give a positive duration such as 5m" % (window,))
    return float(seconds)


def validate(config: AnalysisConfig) -> None:
    """Refuse an analysis that cannot mean anything, saying what to fix (AnalysisError)."""
    problems = []
    try:
        window_seconds(config.window)
    except AnalysisError as exc:
        problems.append(str(exc))
    configured = config.thresholds.configured()
    if not configured:
        problems.append("no threshold is set: give at least one of " + ", ".join(THRESHOLDS))
    relative = [name for name in RELATIVE_THRESHOLDS if name in configured]
    if relative and config.baseline is None:
        problems.append("%s compare with the baseline colour, so baseline is required" % ", ".join(relative))
    if config.baseline is not None and config.baseline.color == config.candidate.color:
        problems.append("baseline and candidate are the same colour (%s)" % config.candidate.color)
    if not 0 < config.latency_quantile < 1:
        problems.append("latency_quantile %s is not between 0 and 1 (exclusive)" % config.latency_quantile)
    if config.min_requests < 0:
        problems.append("min_requests %s is negative" % config.min_requests)
    negative = [name for name, value in configured.items() if value < 0]
    if negative:
        problems.append("thresholds cannot be negative: " + ", ".join(negative))
    if "throughput_ratio_min" in configured:
        unweighted = [c.color for c in (config.candidate, config.baseline) if c is not None and not c.weight]
        if unweighted:
            problems.append("throughput_ratio_min needs each colour's traffic weight (> 0); missing for "
                            + ", ".join(unweighted))
    if problems:
        raise AnalysisError("; ".join(problems))


def _label(value: str) -> str:
    """A PromQL double-quoted string literal."""
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def build_queries(config: AnalysisConfig) -> dict[str, str]:
    """The PromQL of every measurement, each grouped by the colour label (both colours in one query)."""
    colours = [config.candidate.color] + ([config.baseline.color] if config.baseline else [])
    by = config.color_label
    select = "job=%s, %s=~%s" % (_label(config.job), by, _label("|".join(re.escape(c) for c in colours)))
    live = "%s, route=~%s" % (select, _label(config.routes))
    w = config.window
    return {
        "request_rate": "sum by (%s) (rate(%s{%s}[%s]))" % (by, REQUESTS_METRIC, live, w),
        "error_rate": 'sum by (%s) (rate(%s{%s, status=~"5.."}[%s]))' % (by, REQUESTS_METRIC, live, w),
        "latency": "histogram_quantile(%s, sum by (%s, le) (rate(%s{%s}[%s])))"
                   % (config.latency_quantile, by, DURATION_METRIC, live, w),
        "prediction_mix": "sum by (%s, model, action) (rate(%s{%s}[%s]))" % (by, PREDICTIONS_METRIC, select, w),
    }


def _number(text) -> float | None:
    value = float(text)
    return None if math.isnan(value) else value


def measurements_from(config: AnalysisConfig, answers: dict[str, list[dict]]) -> dict[str, Measurement]:
    """Per colour, the measurements from the query answers (Prometheus' `result` vectors)."""
    by = config.color_label
    per_colour: dict[str, dict] = {}
    for name in ("request_rate", "error_rate", "latency"):
        for sample in answers.get(name, []):
            per_colour.setdefault(sample["metric"].get(by), {})[name] = _number(sample["value"][1])
    mixes: dict[str, dict[str, dict[str, float]]] = {}
    for sample in answers.get("prediction_mix", []):
        metric = sample["metric"]
        rate = _number(sample["value"][1]) or 0.0
        model = mixes.setdefault(metric.get(by), {}).setdefault(metric.get("model", ""), {})
        model[metric.get("action", "")] = rate
    window = window_seconds(config.window)
    result = {}
    for colour in (config.candidate, config.baseline):
        if colour is None:
            continue
        found = per_colour.get(colour.color, {})
        mix = {}
        for model, rates in sorted(mixes.get(colour.color, {}).items()):
            total = sum(rates.values())
            if total > 0:
                mix[model] = {action: round(rate / total, 6) for action, rate in sorted(rates.items())}
        latency = found.get("latency")
        result[colour.color] = Measurement(
            color=colour.color, window_s=window, weight=colour.weight,
            request_rate=found.get("request_rate"),
            # No 5xx series at all in the window means no 5xx: 0 when the colour had requests.
            error_rate=found.get("error_rate", 0.0 if found.get("request_rate") is not None else None),
            latency_s=latency if latency is None or math.isfinite(latency) else None,
            prediction_mix=mix)
    return result


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return 1.0 if numerator == 0 else math.inf
    return numerator / denominator


def _fmt(value: float | None, unit: str = "") -> str:
    return "no data" if value is None else "%.4g%s" % (value, unit)


def evaluate_checks(config: AnalysisConfig, measured: dict[str, Measurement]) -> list[Check]:
    """Every configured threshold against the measurements, in THRESHOLDS order."""
    cand = measured[config.candidate.color]
    base = measured[config.baseline.color] if config.baseline else None
    checks = []
    for name, threshold in config.thresholds.configured().items():
        value: float | None = None
        detail = ""
        if name == "error_ratio_max":
            value = cand.error_ratio
            detail = "%s error ratio (5xx / all) %s" % (cand.color, _fmt(value))
        elif name == "latency_max_ms":
            value = None if cand.latency_s is None else cand.latency_s * 1000
            detail = "%s latency p%g %s" % (cand.color, config.latency_quantile * 100, _fmt(value, " ms"))
        elif base is not None and name == "error_ratio_delta_max":
            if cand.error_ratio is not None and base.error_ratio is not None:
                value = cand.error_ratio - base.error_ratio
            detail = "error ratio (5xx / all) %s %s vs %s %s, delta %s" % (
                cand.color, _fmt(cand.error_ratio), base.color, _fmt(base.error_ratio), _fmt(value))
        elif base is not None and name == "latency_ratio_max":
            if cand.latency_s is not None and base.latency_s is not None:
                value = _ratio(cand.latency_s, base.latency_s)
            ms = [None if m.latency_s is None else m.latency_s * 1000 for m in (cand, base)]
            detail = "latency p%g %s %s vs %s %s, ratio %s" % (
                config.latency_quantile * 100, cand.color, _fmt(ms[0], " ms"), base.color, _fmt(ms[1], " ms"),
                _fmt(value))
        elif base is not None and name == "throughput_ratio_min":
            if cand.throughput_per_weight is not None and base.throughput_per_weight is not None:
                value = _ratio(cand.throughput_per_weight, base.throughput_per_weight)
            detail = "throughput per unit of weight %s %s vs %s %s, ratio %s" % (
                cand.color, _fmt(cand.throughput_per_weight, " req/s"), base.color,
                _fmt(base.throughput_per_weight, " req/s"), _fmt(value))
        elif base is not None and name == "prediction_mix_delta_max":
            if cand.prediction_mix and base.prediction_mix:
                keys = {(m, a) for mix in (cand.prediction_mix, base.prediction_mix) for m in mix for a in mix[m]}
                value = max(abs(cand.prediction_mix.get(m, {}).get(a, 0.0) - base.prediction_mix.get(m, {}).get(a, 0.0))
                            for m, a in keys)
            detail = "prediction mix: largest difference of an action's share %s vs %s %s" % (
                cand.color, base.color, _fmt(value))
        if value is None:
            status = INCONCLUSIVE
        elif name == "throughput_ratio_min":
            status = PASSED if value >= threshold else FAILED
        else:
            status = PASSED if value <= threshold else FAILED
        bound = ">=" if name == "throughput_ratio_min" else "<="
        message = "%s: %s (must be %s %g)" % (name, detail, bound, threshold)
        checks.append(Check(name, status, None if value is None else round(value, 6), threshold, message))
    return checks


def decide(config: AnalysisConfig, measured: dict[str, Measurement]) -> dict:
    """The outcome from the measurements: pure, so a table of cases tests it."""
    checks = evaluate_checks(config, measured)
    compared = [config.candidate] + ([config.baseline] if config.baseline else [])
    starved = []
    for colour in compared:
        m = measured[colour.color]
        if m.requests is None:
            starved.append("%s has no data (no %s series on the analysed routes in the window)"
                           % (colour.color, REQUESTS_METRIC))
        elif m.requests < config.min_requests:
            starved.append("%s served %.1f requests in %s, fewer than min_requests %d"
                           % (colour.color, m.requests, config.window, config.min_requests))
    failed = [c for c in checks if c.status == FAILED]
    unknown = [c for c in checks if c.status == INCONCLUSIVE]
    if starved:
        no_data = all("no data" in s for s in starved)
        outcome, reason = INCONCLUSIVE, "no_data" if no_data else "too_few_requests"
        message = "analysis inconclusive: " + "; ".join(starved)
    elif failed:
        outcome, reason = FAILED, "threshold"
        message = "analysis failed: " + "; ".join(c.message for c in failed)
    elif unknown:
        outcome, reason = INCONCLUSIVE, "no_data"
        message = "analysis inconclusive: " + "; ".join(c.message for c in unknown)
    else:
        outcome, reason = SUCCESSFUL, "within_thresholds"
        message = "analysis successful: " + "; ".join(c.message for c in checks)
    return {"outcome": outcome, "reason": reason, "message": message,
            "failed_checks": [c.name for c in failed] if outcome == FAILED else [],
            "checks": {c.name: c.evidence() for c in checks}}


class Prometheus:
    """Instant queries over https with a CA file and basic auth, through Ansible's open_url."""

    def __init__(self, url: str, *, username: str | None = None, password: str | None = None,
                 ca_path: str | None = None, validate_certs: bool = True, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.username = username
        self.password = password
        self.ca_path = ca_path
        self.validate_certs = validate_certs
        self.timeout = timeout

    def query(self, promql: str, at: float) -> list[dict]:
        """The `result` vector of one instant query; PrometheusUnavailable says why there is none."""
        url = "%s/api/v1/query?%s" % (self.url, urllib.parse.urlencode({"query": promql, "time": "%.3f" % at}))
        where = "GET %s/api/v1/query" % self.url
        try:
            try:
                with open_url(url, method="GET", timeout=self.timeout, validate_certs=self.validate_certs,
                              ca_path=self.ca_path, url_username=self.username, url_password=self.password,
                              force_basic_auth=bool(self.username), use_proxy=False, use_netrc=False,
                              headers={"Accept": "application/json"}, http_agent="quantnova.grandmodel") as resp:
                    status, body = resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                status, body = exc.code, exc.read() if exc.fp is not None else b""
        except urllib.error.URLError as exc:
            raise PrometheusUnavailable("%s failed: %s" % (where, _reason(exc.reason)),
                                        "prometheus_unreachable") from exc
        except (socket.timeout, TimeoutError) as exc:
            raise PrometheusUnavailable("%s timed out after %gs" % (where, self.timeout),
                                        "prometheus_unreachable") from exc
        except (UrlsConnectionError, http.client.HTTPException, OSError, ValueError) as exc:
            raise PrometheusUnavailable("%s failed: %s" % (where, _reason(exc)), "prometheus_unreachable") from exc
        snippet = body[:200].decode("utf-8", errors="replace").strip()
        if status in (401, 403):
            raise PrometheusUnavailable("%s was refused with HTTP %d (check the user and password): %s"
                                        % (where, status, snippet), "prometheus_refused")
        try:
            answer = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise PrometheusUnavailable("%s answered HTTP %d with a body that is not JSON: %r"
                                        % (where, status, snippet), "prometheus_error") from exc
        if status != 200 or not isinstance(answer, dict) or answer.get("status") != "success":
            error = answer.get("error") if isinstance(answer, dict) else None
            raise PrometheusUnavailable("%s answered HTTP %d for %s: %s" % (where, status, promql, error or snippet),
                                        "prometheus_error")
        data = answer.get("data") or {}
        if data.get("resultType") != "vector":
            raise PrometheusUnavailable("%s answered a %s, not a vector, for %s"
                                        % (where, data.get("resultType"), promql), "prometheus_error")
        return list(data.get("result") or [])


def _reason(reason) -> str:
    if isinstance(reason, ssl.SSLCertVerificationError):
        return "the certificate was not trusted (%s)" % (reason.verify_message or reason)
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason) or reason.__class__.__name__


def run_analysis(config: AnalysisConfig, prometheus: Prometheus, now: float | None = None) -> dict:
    """Validate, query, measure and decide; every query and its answer are returned as evidence.

    Prometheus being unreachable, refusing the login or failing a query is an inconclusive outcome,
    not an exception; bad input raises AnalysisError before anything is asked.
    """
    validate(config)
    at = config.at if config.at is not None else (time.time() if now is None else now)
    queries = build_queries(config)
    evidence = []
    answers: dict[str, list[dict]] = {}
    base = {"evaluated_at": at, "window": config.window, "candidate": config.candidate.color,
            "baseline": config.baseline.color if config.baseline else None,
            "thresholds": config.thresholds.configured(), "queries": evidence}
    for name, promql in queries.items():
        try:
            answers[name] = prometheus.query(promql, at)
        except PrometheusUnavailable as exc:
            evidence.append({"name": name, "promql": promql, "error": str(exc)})
            return dict(base, outcome=INCONCLUSIVE, reason=exc.reason, failed_checks=[], checks={},
                        measurements={}, message="analysis inconclusive: could not query Prometheus: %s" % exc)
        evidence.append({"name": name, "promql": promql, "result": answers[name]})
    measured = measurements_from(config, answers)
    verdict = decide(config, measured)
    return dict(base, measurements={c: m.evidence() for c, m in measured.items()}, **verdict)
