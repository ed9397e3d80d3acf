# -*- coding: utf-8 -*-
# Copyright: (c) 2025, GrandModel Ops
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shadow comparison: the new colour against the live colour on the very same requests.

During a release's shadow phase the front door mirrors live predict requests to the idle colour with the
same `X-Request-ID` (nginx's `$request_id`). Each colour's service keeps a ring of what it answered
(`GET /admin/shadow`). `fetch_ring` reads one colour's rings (one per app host), `join` pairs the two
colours' records on the request id and `decide` is a pure function of the pairs and the tolerances:

- `inconclusive` when a ring could not be read (a hung, stopped or refusing colour) or when fewer than
  `min_joined` requests were answered by both colours: the comparison could not be made;
- otherwise `failed` when any tolerance is exceeded (the message names every such check);
- otherwise `successful`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ansible_collections.quantnova.grandmodel.plugins.module_utils.http_client import (
    HttpClient,
    HttpProbeError,
    join_url,
)

SUCCESSFUL, FAILED, INCONCLUSIVE = "successful", "failed", "inconclusive"
#: Tolerances, each optional; what each one bounds is in the module's documentation.
TOLERANCES = ("agreement_min", "probability_diff_max", "latency_ratio_p50_max", "latency_ratio_p99_max",
              "error_ratio_delta_max")


class ShadowCompareError(Exception):
    """Bad input: nothing was asked."""


class RingUnavailable(Exception):
    """A colour's ring could not be read; `reason` is a short machine word."""

    def __init__(self, msg: str, reason: str) -> None:
        super().__init__(msg)
        self.reason = reason


@dataclass(frozen=True)
class Tolerances:
    agreement_min: float | None = None
    probability_diff_max: float | None = None
    latency_ratio_p50_max: float | None = None
    latency_ratio_p99_max: float | None = None
    error_ratio_delta_max: float | None = None

    def configured(self) -> dict:
        return {name: getattr(self, name) for name in TOLERANCES if getattr(self, name) is not None}


def validate(tolerances: Tolerances, min_joined: int, limit: int) -> None:
    configured = tolerances.configured()
    if not configured:
        raise ShadowCompareError("no tolerance given: set at least one of %s" % ", ".join(TOLERANCES))
    for name, value in configured.items():
        if not math.isfinite(value) or value < 0:
            raise ShadowCompareError("tolerance %s=%r must be a finite number >= 0" % (name, value))
    if tolerances.agreement_min is not None and tolerances.agreement_min > 1:
        raise ShadowCompareError("tolerance agreement_min=%r is a share of samples: give it between 0 and 1"
                                 % tolerances.agreement_min)
    if min_joined < 1:
        raise ShadowCompareError("min_joined=%d must be at least 1" % min_joined)
    if limit < 1:
        raise ShadowCompareError("limit=%d must be at least 1" % limit)


def fetch_ring(client: HttpClient, url: str, token: str, limit: int, model: str | None) -> dict:
    """One service's ring. Raises RingUnavailable (unreachable, hung, refused, not a ring)."""
    query = "limit=%d" % limit + ("&model=%s" % model if model else "")
    address = join_url(url, "/admin/shadow?" + query)
    try:
        reply = client.get(address, headers={"Authorization": "Bearer " + token})
    except HttpProbeError as exc:
        raise RingUnavailable(str(exc), "ring_unreachable") from exc
    if reply.status in (401, 403):
        raise RingUnavailable("GET %s answered %d: the admin token was refused (%s)"
                              % (address, reply.status, reply.text()[:200]), "ring_refused")
    if reply.status != 200:
        raise RingUnavailable("GET %s answered %d: %s" % (address, reply.status, reply.text()[:200]), "ring_error")
    try:
        body = reply.json()
    except ValueError as exc:
        raise RingUnavailable(str(exc), "ring_error") from exc
    if not isinstance(body, dict) or not isinstance(body.get("records"), list):
        raise RingUnavailable("GET %s answered no list of records: %r" % (address, str(body)[:200]), "ring_error")
    return body


def merge(rings: list[dict], since: float | None) -> dict[str, dict]:
    """One colour's records by request id (its rings on every app host); records older than `since` dropped."""
    records: dict[str, dict] = {}
    for ring in rings:
        for record in ring["records"]:
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                continue
            if since is not None and float(record.get("at") or 0) < since:
                continue
            records[record["id"]] = record
    return records


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ratio(new: float | None, old: float | None) -> float | None:
    if new is None or old is None:
        return None
    if old <= 0:
        return math.inf if new > 0 else 1.0
    return new / old


def join(baseline: dict[str, dict], candidate: dict[str, dict]) -> dict:
    """Statistics over the requests both colours answered (a record on each side with the same id)."""
    ids = sorted(set(baseline) & set(candidate))
    samples = agreeing = 0
    largest_diff = 0.0
    base_latency: list[float] = []
    cand_latency: list[float] = []
    base_errors = cand_errors = both_ok = 0
    disagreements: list[dict] = []
    for request_id in ids:
        old, new = baseline[request_id], candidate[request_id]
        old_ok, new_ok = old.get("status") == 200, new.get("status") == 200
        base_errors += not old_ok
        cand_errors += not new_ok
        if not (old_ok and new_ok):
            continue
        both_ok += 1
        base_latency.append(float(old.get("latency_ms") or 0.0))
        cand_latency.append(float(new.get("latency_ms") or 0.0))
        old_actions, new_actions = old.get("actions") or [], new.get("actions") or []
        old_probs, new_probs = old.get("probabilities") or [], new.get("probabilities") or []
        if len(old_actions) != len(new_actions) or len(old_probs) != len(new_probs):
            # Both answered the same request with a different number of samples: nothing agrees.
            samples += max(len(old_actions), len(new_actions), 1)
            largest_diff = max(largest_diff, 1.0)
            disagreements.append({"id": request_id, "why": "different number of samples"})
            continue
        for index, (old_action, new_action) in enumerate(zip(old_actions, new_actions, strict=True)):
            samples += 1
            agreeing += old_action == new_action
            diff = max((abs(float(a) - float(b)) for a, b in zip(old_probs[index], new_probs[index], strict=False)),
                       default=0.0)
            largest_diff = max(largest_diff, diff)
            if old_action != new_action and len(disagreements) < 10:
                disagreements.append({"id": request_id, "sample": index, "baseline_action": old_action,
                                      "candidate_action": new_action, "probability_diff": round(diff, 6)})
    joined = len(ids)
    p50_old, p50_new = percentile(base_latency, 50), percentile(cand_latency, 50)
    p99_old, p99_new = percentile(base_latency, 99), percentile(cand_latency, 99)
    return {
        "baseline_records": len(baseline),
        "candidate_records": len(candidate),
        "joined": joined,
        "both_successful": both_ok,
        "samples_compared": samples,
        "agreement": (agreeing / samples) if samples else None,
        "probability_diff_max": largest_diff if samples else None,
        "baseline_latency_ms": {"p50": p50_old, "p99": p99_old},
        "candidate_latency_ms": {"p50": p50_new, "p99": p99_new},
        "latency_ratio_p50": _ratio(p50_new, p50_old),
        "latency_ratio_p99": _ratio(p99_new, p99_old),
        "baseline_error_ratio": (base_errors / joined) if joined else None,
        "candidate_error_ratio": (cand_errors / joined) if joined else None,
        "error_ratio_delta": ((cand_errors - base_errors) / joined) if joined else None,
        "candidate_errors": cand_errors,
        "baseline_errors": base_errors,
        "disagreements": disagreements,
    }


def _fmt(value: float | None) -> str:
    return "none" if value is None else ("%.6g" % value)


def decide(stats: dict, tolerances: Tolerances, min_joined: int) -> dict:
    """successful / failed / inconclusive, with one check entry per configured tolerance."""
    checks: dict[str, dict] = {}
    spec = {
        "agreement_min": ("agreement", lambda v, t: v >= t, ">="),
        "probability_diff_max": ("probability_diff_max", lambda v, t: v <= t, "<="),
        "latency_ratio_p50_max": ("latency_ratio_p50", lambda v, t: v <= t, "<="),
        "latency_ratio_p99_max": ("latency_ratio_p99", lambda v, t: v <= t, "<="),
        "error_ratio_delta_max": ("error_ratio_delta", lambda v, t: v <= t, "<="),
    }
    failed: list[str] = []
    for name, threshold in tolerances.configured().items():
        measure, passes, sign = spec[name]
        value = stats.get(measure)
        if value is None:
            checks[name] = {"status": INCONCLUSIVE, "value": None, "threshold": threshold,
                            "message": "%s: not measured (no request answered by both colours)" % name}
            continue
        ok = passes(value, threshold)
        checks[name] = {"status": "passed" if ok else FAILED, "value": value, "threshold": threshold,
                        "message": "%s: %s %s (must be %s %s)" % (name, measure, _fmt(value), sign, _fmt(threshold))}
        if not ok:
            failed.append(name)
    joined = stats["joined"]
    if joined < min_joined:
        return {"outcome": INCONCLUSIVE, "reason": "too_few_joined", "checks": checks, "failed_checks": failed,
                "message": "comparison inconclusive: %d requests answered by both colours (need %d; baseline "
                           "records %d, candidate records %d)" % (joined, min_joined, stats["baseline_records"],
                                                                  stats["candidate_records"])}
    if failed:
        return {"outcome": FAILED, "reason": "tolerance", "checks": checks, "failed_checks": failed,
                "message": "comparison failed on %d joined requests: %s"
                           % (joined, "; ".join(checks[name]["message"] for name in failed))}
    if any(check["status"] == INCONCLUSIVE for check in checks.values()):
        return {"outcome": INCONCLUSIVE, "reason": "not_measured", "checks": checks, "failed_checks": [],
                "message": "comparison inconclusive: %s" % "; ".join(
                    c["message"] for c in checks.values() if c["status"] == INCONCLUSIVE)}
    return {"outcome": SUCCESSFUL, "reason": "within_tolerances", "checks": checks, "failed_checks": [],
            "message": "comparison successful on %d joined requests: %s"
                       % (joined, "; ".join(c["message"] for c in checks.values()))}


def run_comparison(client: HttpClient, token: str, baseline: dict, candidate: dict, tolerances: Tolerances,
                   min_joined: int = 50, limit: int = 10000, model: str | None = None,
                   since: float | None = None) -> dict:
    """Read both colours' rings, join, decide. `baseline`/`candidate` are {color, urls}."""
    validate(tolerances, min_joined, limit)
    base = {"baseline": baseline["color"], "candidate": candidate["color"], "tolerances": tolerances.configured(),
            "min_joined": min_joined, "model": model, "since": since, "rings": []}
    merged = {}
    for role, colour in (("baseline", baseline), ("candidate", candidate)):
        if not colour["urls"]:
            raise ShadowCompareError("no URL given for the %s colour %s" % (role, colour["color"]))
        rings = []
        for url in colour["urls"]:
            try:
                ring = fetch_ring(client, url, token, limit, model)
            except RingUnavailable as exc:
                base["rings"].append({"color": colour["color"], "url": url, "error": str(exc)})
                return dict(base, outcome=INCONCLUSIVE, reason=exc.reason, checks={}, failed_checks=[],
                            statistics={}, message="comparison inconclusive: the %s colour %s could not be read: %s"
                                                   % (role, colour["color"], exc))
            if ring.get("color") not in (None, colour["color"]):
                raise ShadowCompareError("%s answers as colour %r, not the %s colour %r: check the URLs"
                                         % (url, ring.get("color"), role, colour["color"]))
            base["rings"].append({"color": colour["color"], "url": url, "size": ring.get("size"),
                                  "recorded": ring.get("recorded"), "capacity": ring.get("capacity"),
                                  "service_version": ring.get("service_version")})
            rings.append(ring)
        merged[role] = merge(rings, since)
    stats = join(merged["baseline"], merged["candidate"])
    return dict(base, statistics=stats, **decide(stats, tolerances, min_joined))
