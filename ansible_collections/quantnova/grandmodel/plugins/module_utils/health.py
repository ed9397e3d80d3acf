# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The health gate engine: Argo-Rollouts-style analysis of one inference service, read-only.

A gate takes `count` measurements `interval` seconds apart (after `initial_delay`). Each measurement
runs the selected checks; a check either passes, fails (the service answered wrongly) or errors (no
answer could be had, including an answer that did not come within the gate's own time budget). A
measurement is `failed` if any check failed, else `error` if any errored, else `successful`.

The gate fails as soon as failed measurements exceed `failure_limit` or consecutive errored
measurements exceed `consecutive_error_limit`. Otherwise it takes every measurement and passes only
if the LAST one is successful: errors or failures tolerated earlier in the window are forgiven when
the service answers correctly afterwards, never when they are the window's final word (a colour that
died or hung a moment before the end must not be promoted). A gate never passes early.

Every measurement is bounded: its requests share `measurement_timeout` seconds, so a colour that
accepts connections but never answers costs at most that long per measurement, and a whole gate at
most initial_delay + count * (interval + measurement_timeout).
"""

from __future__ import annotations

import datetime
import json
import math
import re
import time

from ansible_collections.quantnova.grandmodel.plugins.module_utils.http_client import (
    HttpClient,
    HttpProbeError,
    join_url,
)

CHECKS = ("health", "ready", "version", "golden", "latency", "error_rate")
REQUESTS_METRIC = "grandmodel_http_requests_total"
SUCCESSFUL, FAILED, ERROR = "successful", "failed", "error"


class HealthGateError(Exception):
    """The gate could not be configured or did not pass; `result` carries the evidence."""

    def __init__(self, msg, **result):
        super().__init__(msg)
        self.result = result


class CheckError(Exception):
    """A check could not be made (no answer): counts towards consecutive_error_limit."""


class CheckFailed(Exception):
    """The service answered, wrongly: counts towards failure_limit."""

    def __init__(self, msg, value=None):
        super().__init__(msg)
        self.value = value


# -- verdicts ------------------------------------------------------------------------------------

def decide(outcomes, count, failure_limit, consecutive_error_limit):
    """Return (verdict, reason) for the measurement outcomes so far; verdict None while more are needed.

    Limits can fail a gate early; only the full window can pass it, and only when its last
    measurement is successful.
    """
    failed = outcomes.count(FAILED)
    successful = outcomes.count(SUCCESSFUL)
    if failed > failure_limit:
        return FAILED, "failure_limit"
    if max_consecutive(outcomes) > consecutive_error_limit:
        return FAILED, "consecutive_error_limit"
    if len(outcomes) < count:
        return None, None
    if not successful:
        return FAILED, "no_successful_measurement"
    if outcomes[-1] == ERROR:
        return FAILED, "last_measurement_error"
    if outcomes[-1] == FAILED:
        return FAILED, "last_measurement_failed"
    return SUCCESSFUL, "completed"


def trailing_errors(outcomes):
    streak = 0
    for outcome in reversed(outcomes):
        if outcome != ERROR:
            break
        streak += 1
    return streak


def max_consecutive(outcomes, kind=ERROR):
    best = run = 0
    for outcome in outcomes:
        run = run + 1 if outcome == kind else 0
        best = max(best, run)
    return best


# -- Prometheus text and error rate ----------------------------------------------------------------

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def parse_prometheus(text, name=None):
    """Samples of the Prometheus text format as [(name, {label: value}, float)], optionally one metric only."""
    samples = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if not match or (name is not None and match.group(1) != name):
            continue
        labels = {}
        body = match.group(3) or ""
        position = 0
        while position < len(body):
            label = _LABEL_RE.match(body, position)
            if not label:
                break
            labels[label.group(1)] = _unescape(label.group(2))
            position = label.end()
        try:
            value = float(match.group(4))
        except ValueError:
            continue
        samples.append((match.group(1), labels, value))
    return samples


def _unescape(value):
    return value.replace("\\\\", "\0").replace('\\"', '"').replace("\\n", "\n").replace("\0", "\\")


LIVE_ROUTES = r"^/v1/models/[^/]+/predict$|^/api/[^/]+/process$"
PROBE_ROUTES = ("/metrics", "/health", "/ready", "/version")
START_TIME_METRIC = "process_start_time_seconds"


def request_counts(text, exclude_routes=(), include=None):
    """{(route, method, status): count} of grandmodel_http_requests_total for the live routes.

    `include` is a compiled pattern the route must match (None: every route); `exclude_routes` are
    left out whatever the pattern says.
    """
    counts = {}
    for _name, labels, value in parse_prometheus(text, REQUESTS_METRIC):
        route = labels.get("route", "")
        if route in exclude_routes or (include is not None and not include.search(route)):
            continue
        key = (route, labels.get("method", ""), labels.get("status", ""))
        counts[key] = counts.get(key, 0.0) + value
    return counts


#: Exported by a service that counts requests marked X-GrandModel-Probe (the gates') apart from clients.
PROBE_METRIC = "grandmodel_probe_requests_total"


def start_time(text):
    """The service process's start time (process_start_time_seconds), or None when it is not exported."""
    samples = parse_prometheus(text, START_TIME_METRIC)
    return samples[0][2] if samples else None


def scrape_delta(before, now, restarted):
    """(5xx, total) requests counted between two scrapes of one process (or since a restart).

    After a restart every counter starts again from zero, so the new value is the whole delta, for
    every series at once (one series passing its old value must not hide another's reset). A counter
    that went down without a known restart is a reset too.
    """
    errors = total = 0.0
    for key, value in now.items():
        previous = 0.0 if restarted else before.get(key, 0.0)
        delta = value - previous if value >= previous else value
        total += delta
        if key[2].startswith("5"):
            errors += delta
    return errors, total


class ErrorRateWindow:
    """The share of 5xx among live requests over a gate window, summed scrape by scrape.

    Live requests are those of routes matching `routes` (the predict API) and not in `exclude_routes`.
    The gate marks its requests (X-GrandModel-Probe); a service that exports PROBE_METRIC counts them
    apart, so its request series are client traffic only. A service that does not (releases before it)
    counts the gate's golden requests like any other: they are taken out using the gate's own tally of
    what it sent between two scrapes.
    """

    def __init__(self, routes=LIVE_ROUTES, exclude_routes=PROBE_ROUTES):
        self.include = re.compile(routes) if routes else None
        self.exclude_routes = tuple(exclude_routes or ())
        self.previous = None
        self.previous_start = None
        self.errors = self.requests = 0.0
        self.own_requests = self.own_errors = 0.0
        self.restarts = 0
        self.scrapes = 0

    def add(self, text, own):
        """Account for one scrape; `own` is {status: count} of the gate's own live requests since the last."""
        counts = request_counts(text, self.exclude_routes, self.include)
        started = start_time(text)
        self.scrapes += 1
        if self.previous is not None:
            restarted = (started is not None and self.previous_start is not None
                         and abs(started - self.previous_start) > 0.5)
            restarted = restarted or any(value < self.previous.get(key, 0.0) for key, value in counts.items())
            self.restarts += int(restarted)
            errors, total = scrape_delta(self.previous, counts, restarted)
            own_total = float(sum(own.values()))
            own_errors = float(sum(n for status, n in own.items() if str(status).startswith("5")))
            counted_apart = PROBE_METRIC in text
            # After a restart the service may have lost some of the gate's requests: never below zero.
            self.requests += total if counted_apart else max(0.0, total - own_total)
            self.errors += errors if counted_apart else max(0.0, errors - own_errors)
            self.own_requests += own_total
            self.own_errors += own_errors
        self.previous, self.previous_start = counts, started
        return self

    @property
    def rate(self):
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self, min_requests=None):
        result = {"error_rate": round(self.rate, 6), "errors": self.errors, "requests": self.requests,
                  "gate_requests_excluded": self.own_requests, "restarts_detected": self.restarts,
                  "scrapes": self.scrapes}
        if min_requests is not None:
            result["min_requests"] = min_requests
            result["inconclusive"] = self.requests < min_requests
        return result


def error_rate(first, last):
    """(rate, 5xx delta, total delta) between two scrapes of the same process (see ErrorRateWindow)."""
    errors, total = scrape_delta(first, last, False)
    return (errors / total if total else 0.0), errors, total


def quantile(values, q):
    """Nearest-rank quantile (no interpolation: with few probes the answer is a latency really seen)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# -- manifests and golden comparison -----------------------------------------------------------------

def load_manifest(path):
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise HealthGateError("cannot read model manifest %s: %s" % (path, getattr(exc, "strerror", None) or exc)) \
            from exc
    try:
        golden = data["golden"]
        manifest = {
            "path": path,
            "name": str(data["name"]),
            "version": str(data["version"]) if data.get("version") is not None else None,
            "sha256": str(data["sha256"]).lower() if data.get("sha256") else None,
            "atol": float(golden["atol"]),
            "samples": [{"input": s["input"], "probabilities": [float(p) for p in s["probabilities"]],
                         "value": float(s["value"]), "action": str(s["action"])} for s in golden["samples"]],
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise HealthGateError("model manifest %s lacks a usable name or golden section: %r" % (path, exc)) from exc
    if not manifest["samples"]:
        raise HealthGateError("model manifest %s has no golden samples to check" % path)
    return manifest


def compare_golden(expected, answer, atol):
    """Return None when the prediction matches the golden sample within atol, else what differs."""
    try:
        prediction = answer["predictions"][0]
        probabilities = [float(p) for p in prediction["probabilities"]]
        value = float(prediction["value"])
        action = prediction["action"]
    except (KeyError, IndexError, TypeError, ValueError):
        return "answer has no predictions[0] with probabilities, value and action"
    if len(probabilities) != len(expected["probabilities"]):
        return "%d probabilities instead of %d" % (len(probabilities), len(expected["probabilities"]))
    for index, want in enumerate(expected["probabilities"]):
        got = probabilities[index]
        if not abs(got - want) <= atol:
            return "probability[%d] %.6g differs from %.6g by more than atol %g" % (index, got, want, atol)
    if not abs(value - expected["value"]) <= atol:
        return "value %.6g differs from %.6g by more than atol %g" % (value, expected["value"], atol)
    if action != expected["action"]:
        return "action %r instead of %r" % (action, expected["action"])
    return None


# -- the gate ------------------------------------------------------------------------------------

def _now_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


INCONCLUSIVE_POLICIES = ("fail", "pass")


class GateConfig:
    def __init__(self, url, *, interval=5.0, count=5, initial_delay=0.0, failure_limit=0, consecutive_error_limit=4,
                 checks=None, expected_version=None, expected_color=None, expected_models=None, manifests=(),
                 latency_quantile=0.99, latency_threshold_ms=None, error_rate_threshold=None,
                 error_rate_routes=LIVE_ROUTES, error_rate_exclude_routes=PROBE_ROUTES, error_rate_min_requests=20,
                 error_rate_inconclusive="fail", measurement_timeout=None, timeout=5.0):
        self.url = url
        self.interval = float(interval)
        self.count = int(count)
        self.initial_delay = float(initial_delay)
        self.failure_limit = int(failure_limit)
        self.consecutive_error_limit = int(consecutive_error_limit)
        self.expected_version = expected_version
        self.expected_color = expected_color
        self.manifests = list(manifests)
        self.expected_models = dict(expected_models or {})
        for manifest in self.manifests:  # a manifest also says which artifact must be loaded
            self.expected_models.setdefault(manifest["name"], {"version": manifest["version"],
                                                               "sha256": manifest["sha256"]})
        self.latency_quantile = float(latency_quantile)
        self.latency_threshold_ms = None if latency_threshold_ms is None else float(latency_threshold_ms)
        self.error_rate_threshold = None if error_rate_threshold is None else float(error_rate_threshold)
        self.error_rate_routes = error_rate_routes or ""
        self.error_rate_exclude_routes = tuple(error_rate_exclude_routes or ())
        self.error_rate_min_requests = int(error_rate_min_requests)
        self.error_rate_inconclusive = error_rate_inconclusive
        self.timeout = float(timeout)
        # A measurement's requests share this budget; by default two request timeouts.
        self.measurement_timeout = 2 * self.timeout if measurement_timeout is None else float(measurement_timeout)
        self.checks = self._select(checks)
        self._validate()

    def configured(self):
        available = ["health", "ready"]
        if self.expected_version or self.expected_color or self.expected_models:
            available.append("version")
        if self.manifests:
            available.append("golden")
        if self.latency_threshold_ms is not None:
            available.append("latency")
        if self.error_rate_threshold is not None:
            available.append("error_rate")
        return available

    def _select(self, checks):
        if not checks:
            return self.configured()
        unknown = [c for c in checks if c not in CHECKS]
        if unknown:
            raise HealthGateError("unknown check(s) %s: choose from %s" % (", ".join(unknown), ", ".join(CHECKS)))
        needs = {"version": "expected_version, expected_color, expected_models or manifests",
                 "golden": "manifests", "latency": "latency_threshold_ms", "error_rate": "error_rate_threshold"}
        missing = ["check %s needs %s" % (c, needs[c]) for c in checks if c in needs and c not in self.configured()]
        if missing:
            raise HealthGateError("cannot run the health gate: %s" % "; ".join(missing))
        return [c for c in CHECKS if c in checks]

    def _validate(self):
        problems = []
        if self.count < 1:
            problems.append("count must be at least 1 (got %d)" % self.count)
        for name in ("interval", "initial_delay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                problems.append("%s must be a finite number of seconds, 0 or more (got %s)" % (name, value))
        for name in ("timeout", "measurement_timeout"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                problems.append("%s must be a finite number of seconds above 0 (got %s)" % (name, value))
        if self.failure_limit < 0 or self.consecutive_error_limit < 0:
            problems.append("failure_limit and consecutive_error_limit must not be negative")
        if not 0 < self.latency_quantile <= 1:
            problems.append("latency_quantile must be in (0, 1] (got %s)" % self.latency_quantile)
        if self.latency_threshold_ms is not None and not (math.isfinite(self.latency_threshold_ms)
                                                          and self.latency_threshold_ms > 0):
            problems.append("latency_threshold_ms must be a finite number above 0 (got %s)" % self.latency_threshold_ms)
        if self.error_rate_threshold is not None and not 0 <= self.error_rate_threshold <= 1:
            problems.append("error_rate_threshold must be a fraction in [0, 1], e.g. 0.01 (got %s)"
                            % self.error_rate_threshold)
        if self.error_rate_min_requests < 0:
            problems.append("error_rate_min_requests must not be negative (got %d)" % self.error_rate_min_requests)
        if self.error_rate_inconclusive not in INCONCLUSIVE_POLICIES:
            problems.append("error_rate_inconclusive must be one of %s (got %r)"
                            % (", ".join(INCONCLUSIVE_POLICIES), self.error_rate_inconclusive))
        try:
            re.compile(self.error_rate_routes)
        except re.error as exc:
            problems.append("error_rate_routes %r is not a regular expression: %s" % (self.error_rate_routes, exc))
        if not self.url.startswith(("http://", "https://")):
            problems.append("url must start with http:// or https:// (got %r)" % self.url)
        if problems:
            raise HealthGateError("cannot run the health gate: %s" % "; ".join(problems))


class HealthGate:
    def __init__(self, config, client=None, sleep=time.sleep, clock=time.monotonic):
        self.config = config
        self.client = client or HttpClient(timeout=config.timeout)
        self.sleep = sleep
        self.clock = clock
        self.window = ErrorRateWindow(config.error_rate_routes, config.error_rate_exclude_routes)
        self.own_since_scrape = {}
        self.last_window = None
        self.latencies_ms = []

    # every request of a measurement shares the measurement's budget
    def _budget(self, state, what):
        remaining = state["deadline"] - self.clock()
        if remaining <= 0:
            raise CheckError("%s not attempted: the measurement used up its budget of %gs (measurement_timeout)"
                             % (what, self.config.measurement_timeout))
        return min(self.client.timeout, remaining)

    def _get(self, path, state):
        what = "GET %s" % path
        try:
            return self.client.get(join_url(self.config.url, path), timeout=self._budget(state, what))
        except HttpProbeError as exc:
            raise CheckError(str(exc)) from exc

    def _json(self, response):
        try:
            return response.json()
        except ValueError as exc:
            raise CheckFailed(str(exc)) from exc

    # checks: each returns (value, threshold, message) or raises CheckFailed / CheckError
    def check_health(self, state):
        response = self._get("/health", state)
        state["health_ms"].append(response.elapsed * 1000.0)
        if response.status != 200:
            raise CheckFailed("GET /health answered %d: %s" % (response.status, response.text()[:200]),
                              value=response.status)
        return 200, 200, "alive"

    def check_ready(self, state):
        response = self._get("/ready", state)
        if response.status != 200:
            body = response.text()[:300]
            raise CheckFailed("GET /ready answered %d: %s" % (response.status, body), value=response.status)
        return 200, 200, "ready"

    def check_version(self, state):
        response = self._get("/version", state)
        if response.status != 200:
            raise CheckFailed("GET /version answered %d" % response.status, value=response.status)
        body = self._json(response)
        if not isinstance(body, dict):
            raise CheckFailed("GET /version answered %r, not an object" % (body,))
        cfg = self.config
        seen = {"service_version": body.get("service_version"), "color": body.get("color"), "models": {}}
        wanted = {"service_version": cfg.expected_version, "color": cfg.expected_color, "models": {}}
        problems = []
        if cfg.expected_version and body.get("service_version") != cfg.expected_version:
            problems.append("service_version %r instead of %r" % (body.get("service_version"), cfg.expected_version))
        if cfg.expected_color and body.get("color") != cfg.expected_color:
            problems.append("color %r instead of %r" % (body.get("color"), cfg.expected_color))
        models = body.get("models") if isinstance(body.get("models"), dict) else {}
        for name, model in sorted(cfg.expected_models.items()):
            want = model or {}
            got = models.get(name)
            seen["models"][name] = got
            wanted["models"][name] = want
            if not isinstance(got, dict):
                problems.append("model %s is not reported" % name)
                continue
            if want.get("version") and str(got.get("version")) != str(want["version"]):
                problems.append("model %s version %r instead of %r" % (name, got.get("version"), want["version"]))
            if want.get("sha256") and str(got.get("sha256") or "").lower() != str(want["sha256"]).lower():
                problems.append("model %s sha256 %s instead of %s" % (name, got.get("sha256"), want["sha256"]))
            if got.get("ready") is False:
                problems.append("model %s is not ready" % name)
        if problems:
            raise CheckFailed("version check: %s" % "; ".join(problems), value=seen)
        return seen, wanted, "service %s, colour %s" % (seen["service_version"], seen["color"])

    def check_golden(self, state):
        compared = 0
        for manifest in self.config.manifests:
            name = manifest["name"]
            url = join_url(self.config.url, "/v1/models/%s/predict" % name)
            for number, sample in enumerate(manifest["samples"]):
                timeout = self._budget(state, "POST %s" % url)
                try:
                    response = self.client.post_json(url, {"inputs": sample["input"]}, timeout=timeout)
                except HttpProbeError as exc:
                    raise CheckError(str(exc)) from exc
                # A service without a probe series counts these as traffic: the error rate takes them out.
                key = str(response.status)
                self.own_since_scrape[key] = self.own_since_scrape.get(key, 0) + 1
                state["predict_ms"].append(response.elapsed * 1000.0)
                if response.status != 200:
                    raise CheckFailed("golden check on %s: POST %s answered %d: %s"
                                      % (name, url, response.status, response.text()[:200]), value=response.status)
                difference = compare_golden(sample, self._json(response), manifest["atol"])
                if difference:
                    raise CheckFailed("golden check on %s: %s (sample %d)" % (name, difference, number),
                                      value=difference)
                compared += 1
        return compared, compared, "%d golden sample(s) matched" % compared

    def check_latency(self, state):
        cfg = self.config
        # The gate's own predict requests (golden samples) are the latency that matters; without them, /health's.
        if not state["predict_ms"] and not state["health_ms"]:
            self.check_health(state)
        probes = state["predict_ms"] or state["health_ms"]
        value = quantile(probes, cfg.latency_quantile)
        self.latencies_ms.extend(probes)
        label = "p%g" % (cfg.latency_quantile * 100)
        if value > cfg.latency_threshold_ms:
            raise CheckFailed("latency check: %s %.1f ms over %d probe request(s) exceeds %.1f ms"
                              % (label, value, len(probes), cfg.latency_threshold_ms), value=round(value, 3))
        return round(value, 3), cfg.latency_threshold_ms, "%s %.1f ms" % (label, value)

    def check_error_rate(self, state):
        cfg = self.config
        response = self._get("/metrics", state)
        if response.status != 200:
            raise CheckFailed("GET /metrics answered %d" % response.status, value=response.status)
        own, self.own_since_scrape = self.own_since_scrape, {}
        window = self.window.add(response.text(), own)
        self.last_window = window.as_dict(cfg.error_rate_min_requests)
        threshold = cfg.error_rate_threshold
        # Fewer live requests than the minimum: judge as if the missing ones had all succeeded, so a
        # burst of 5xx fails at once while a quiet window stays inconclusive rather than perfect.
        rate = window.errors / max(window.requests, cfg.error_rate_min_requests, 1)
        seen = "%d of %d live requests answered 5xx in the window" % (window.errors, window.requests)
        if window.restarts:
            seen += " (%d restart(s) of the service counted from zero)" % window.restarts
        if rate > threshold:
            raise CheckFailed("error_rate check: %.4f (%s) exceeds %g" % (rate, seen, threshold),
                              value=round(rate, 6))
        if window.requests < cfg.error_rate_min_requests:
            return None, threshold, "inconclusive so far: %s, fewer than error_rate_min_requests %d" % (
                seen, cfg.error_rate_min_requests)
        return round(window.rate, 6), threshold, seen

    # measurements
    def measure(self):
        state = {"predict_ms": [], "health_ms": [], "deadline": self.clock() + self.config.measurement_timeout}
        results = {}
        for name in self.config.checks:
            check = getattr(self, "check_" + name)
            try:
                value, threshold, message = check(state)
                results[name] = {"ok": True, "value": value, "threshold": threshold, "message": message}
            except CheckFailed as exc:
                results[name] = {"ok": False, "error": False, "value": exc.value, "message": str(exc)}
            except CheckError as exc:
                results[name] = {"ok": False, "error": True, "value": None, "message": "%s check: %s" % (name, exc)}
        failed = [n for n, r in results.items() if not r["ok"] and not r.get("error")]
        errored = [n for n, r in results.items() if r.get("error")]
        outcome = FAILED if failed else (ERROR if errored else SUCCESSFUL)
        return {"timestamp": _now_iso(), "phase": outcome, "checks": results}

    def run(self):
        cfg = self.config
        started = self.clock()
        if cfg.initial_delay:
            self.sleep(cfg.initial_delay)
        measurements, outcomes = [], []
        verdict = reason = None
        while verdict is None:
            if measurements:
                self.sleep(cfg.interval)
            measurement = self.measure()
            measurement["index"] = len(measurements) + 1
            measurements.append(measurement)
            outcomes.append(measurement["phase"])
            verdict, reason = decide(outcomes, cfg.count, cfg.failure_limit, cfg.consecutive_error_limit)
        if verdict == SUCCESSFUL and self.last_window is not None and self.last_window["inconclusive"] \
                and cfg.error_rate_inconclusive == "fail":
            verdict, reason = FAILED, "error_rate_inconclusive"
        summary = self.summarize(measurements, outcomes, verdict, reason, self.clock() - started)
        result = {"passed": verdict == SUCCESSFUL, "measurements": measurements, "summary": summary}
        if verdict != SUCCESSFUL:
            raise HealthGateError(summary["message"], **result)
        return result

    def summarize(self, measurements, outcomes, verdict, reason, seconds):
        cfg = self.config
        taken = len(measurements)
        summary = {
            "url": cfg.url, "checks": cfg.checks, "verdict": "passed" if verdict == SUCCESSFUL else "failed",
            "reason": reason, "measurements": taken, "count": cfg.count, "stopped_early": taken < cfg.count,
            "last_measurement": outcomes[-1] if outcomes else None,
            "measurement_timeout": cfg.measurement_timeout,
            "successful": outcomes.count(SUCCESSFUL), "failed": outcomes.count(FAILED),
            "errors": outcomes.count(ERROR), "consecutive_errors_max": max_consecutive(outcomes),
            "failure_limit": cfg.failure_limit, "consecutive_error_limit": cfg.consecutive_error_limit,
            "duration_s": round(seconds, 3),
        }
        if self.last_window is not None:
            summary["error_rate"] = self.last_window
        if self.latencies_ms:
            summary["latency_ms"] = {"quantile": cfg.latency_quantile, "samples": len(self.latencies_ms),
                                     "value": round(quantile(self.latencies_ms, cfg.latency_quantile), 3)}
        summary["message"] = self._message(measurements, reason, summary)
        return summary

    def _message(self, measurements, reason, summary):
        taken = summary["measurements"]
        if reason == "completed":
            message = "health gate passed: %d of %d measurements successful, the last one included (%d failed, " \
                      "failure_limit %d)" % (summary["successful"], taken, summary["failed"], summary["failure_limit"])
            window = summary.get("error_rate")
            if window and window.get("inconclusive"):
                message += "; error rate inconclusive (%d live requests, fewer than %d) and passed because " \
                           "error_rate_inconclusive=pass" % (window["requests"], window["min_requests"])
            return message
        if reason == "error_rate_inconclusive":
            window = summary["error_rate"]
            return "health gate failed: error rate inconclusive: only %d live requests reached the service in the " \
                   "window, fewer than error_rate_min_requests %d (error_rate_inconclusive=fail)" % (
                       window["requests"], window["min_requests"])
        if reason == "consecutive_error_limit":
            last = _first_problem(measurements[-1], errors=True)
            return "health gate failed: %d consecutive measurements could not be made (consecutive_error_limit %d); " \
                   "last: %s" % (summary["consecutive_errors_max"], summary["consecutive_error_limit"], last)
        if reason == "no_successful_measurement":
            last = _first_problem(measurements[-1], errors=True) or _first_problem(measurements[-1])
            return "health gate failed: none of %d measurements was successful; last: %s" % (taken, last)
        if reason == "last_measurement_error":
            return "health gate failed: the last of %d measurements could not be made, so the service is not known " \
                   "to answer at the end of the window: %s" % (taken, _first_problem(measurements[-1], errors=True))
        if reason == "last_measurement_failed":
            return "health gate failed: the last of %d measurements failed: %s" % (
                taken, _first_problem(measurements[-1]))
        # failure_limit: name the check that failed most often, with its latest message
        per_check = {}
        for measurement in measurements:
            for name, check in measurement["checks"].items():
                if not check["ok"] and not check.get("error"):
                    per_check.setdefault(name, []).append(check["message"])
        name = max(per_check, key=lambda n: (len(per_check[n]), -CHECKS.index(n)))
        message = per_check[name][-1]
        if not message.startswith(name.replace("_", " ")) and not message.startswith(name):
            message = "%s check: %s" % (name, message)
        return "health gate failed: %s in %d of %d measurements (failure_limit %d)" % (
            message, len(per_check[name]), taken, summary["failure_limit"])


def _first_problem(measurement, errors=False):
    for check in measurement["checks"].values():
        if not check["ok"] and bool(check.get("error")) == errors:
            return check["message"]
    return None
