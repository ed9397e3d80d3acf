"""Unit tests of the shadow comparison: the join and its statistics, the decision table, and the module end to end
against loopback servers that answer like the services' GET /admin/shadow."""

from __future__ import annotations

import math
from typing import Any

import pytest
from conftest import LoopbackServer, free_port, run_module

from ansible_collections.quantnova.grandmodel.plugins.module_utils.shadow_compare import (
    ShadowCompareError,
    Tolerances,
    decide,
    join,
    merge,
    percentile,
    validate,
)
from ansible_collections.quantnova.grandmodel.plugins.modules import shadow_compare

TOKEN = "unit-admin-token-0123456789"
TOL = Tolerances(agreement_min=0.99, probability_diff_max=0.05, latency_ratio_p50_max=1.5,
                 latency_ratio_p99_max=2.0, error_ratio_delta_max=0.0)


def record(rid: str, probs: list[list[float]] | None, latency: float = 1.0, status: int = 200,
           at: float = 100.0) -> dict[str, Any]:
    actions = None if probs is None else [max(range(len(p)), key=p.__getitem__) for p in probs]
    return {"id": rid, "model": "strategic", "status": status, "latency_ms": latency, "at": at,
            "actions": actions, "probabilities": probs}


def ring(*records: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in records}


SAME = [[0.2, 0.5, 0.3]]
OTHER = [[0.6, 0.3, 0.1]]


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(v) for v in range(1, 101)], 99) == pytest.approx(99.01)


def test_join_pairs_only_requests_both_colours_answered() -> None:
    base = ring(record("a", SAME, 1.0), record("b", SAME, 2.0), record("only-old", SAME))
    cand = ring(record("a", SAME, 1.5), record("b", [[0.21, 0.49, 0.3]], 3.0), record("only-new", SAME))
    stats = join(base, cand)
    assert (stats["baseline_records"], stats["candidate_records"], stats["joined"]) == (3, 3, 2)
    assert stats["samples_compared"] == 2
    assert stats["agreement"] == 1.0
    assert stats["probability_diff_max"] == pytest.approx(0.01)
    assert stats["baseline_latency_ms"]["p50"] == 1.5
    assert stats["candidate_latency_ms"]["p50"] == 2.25
    assert stats["latency_ratio_p50"] == pytest.approx(1.5)
    assert stats["error_ratio_delta"] == 0.0
    assert decide(stats, TOL, min_joined=2)["outcome"] == "successful"


def test_a_disagreeing_model_fails_on_agreement_and_probabilities() -> None:
    base = ring(*(record(str(n), SAME) for n in range(100)))
    cand = ring(*(record(str(n), OTHER if n % 4 == 0 else SAME) for n in range(100)))
    stats = join(base, cand)
    assert stats["agreement"] == 0.75
    assert stats["probability_diff_max"] == pytest.approx(0.4)
    assert len(stats["disagreements"]) == 10
    verdict = decide(stats, TOL, min_joined=50)
    assert (verdict["outcome"], verdict["reason"]) == ("failed", "tolerance")
    assert verdict["failed_checks"] == ["agreement_min", "probability_diff_max"]
    assert "agreement 0.75 (must be >= 0.99)" in verdict["message"]


def test_multi_sample_requests_are_compared_per_sample() -> None:
    stats = join(ring(record("a", SAME + SAME + SAME)), ring(record("a", SAME + OTHER + SAME)))
    assert (stats["samples_compared"], stats["agreement"]) == (3, pytest.approx(2 / 3))


def test_a_different_number_of_samples_is_a_disagreement() -> None:
    stats = join(ring(record("a", SAME + SAME)), ring(record("a", SAME)))
    assert stats["agreement"] == 0.0
    assert stats["probability_diff_max"] == 1.0


def test_candidate_errors_fail_and_are_not_compared() -> None:
    base = ring(*(record(str(n), SAME) for n in range(60)))
    cand = ring(*(record(str(n), None, status=500 if n < 6 else 200) if n < 6 else record(str(n), SAME)
                  for n in range(60)))
    stats = join(base, cand)
    assert (stats["both_successful"], stats["candidate_errors"], stats["baseline_errors"]) == (54, 6, 0)
    assert stats["candidate_error_ratio"] == pytest.approx(0.1)
    assert stats["agreement"] == 1.0
    verdict = decide(stats, TOL, 50)
    assert verdict["failed_checks"] == ["error_ratio_delta_max"]


def test_errors_on_both_colours_cancel_out() -> None:
    base = ring(*(record(str(n), None, status=422) for n in range(5)), *(record(f"ok{n}", SAME) for n in range(50)))
    cand = ring(*(record(str(n), None, status=422) for n in range(5)), *(record(f"ok{n}", SAME) for n in range(50)))
    assert decide(join(base, cand), TOL, 50)["outcome"] == "successful"


def test_a_slow_candidate_fails_on_latency() -> None:
    base = ring(*(record(str(n), SAME, latency=1.0 + n / 100) for n in range(100)))
    cand = ring(*(record(str(n), SAME, latency=2 * (1.0 + n / 100)) for n in range(100)))
    verdict = decide(join(base, cand), TOL, 50)
    assert verdict["failed_checks"] == ["latency_ratio_p50_max"]
    assert verdict["checks"]["latency_ratio_p99_max"]["status"] == "passed"
    assert verdict["checks"]["latency_ratio_p50_max"]["value"] == pytest.approx(2.0)


def test_zero_baseline_latency_gives_an_infinite_ratio_not_a_crash() -> None:
    stats = join(ring(record("a", SAME, latency=0.0)), ring(record("a", SAME, latency=1.0)))
    assert stats["latency_ratio_p50"] == math.inf


def test_too_few_joined_requests_are_inconclusive_even_when_a_check_fails() -> None:
    stats = join(ring(record("a", SAME)), ring(record("a", OTHER)))
    verdict = decide(stats, TOL, min_joined=50)
    assert (verdict["outcome"], verdict["reason"]) == ("inconclusive", "too_few_joined")
    assert "1 requests answered by both colours (need 50" in verdict["message"]


def test_nothing_joined_is_inconclusive() -> None:
    verdict = decide(join(ring(record("a", SAME)), ring(record("b", SAME))), TOL, 1)
    assert verdict["outcome"] == "inconclusive"


def test_merge_unions_hosts_and_drops_old_and_malformed_records() -> None:
    merged = merge([{"records": [record("a", SAME, at=10.0), record("b", SAME, at=200.0), {"id": 5}, "junk"]},
                    {"records": [record("c", SAME, at=300.0)]}], since=100.0)
    assert sorted(merged) == ["b", "c"]


@pytest.mark.parametrize(("tolerances", "min_joined", "limit", "words"), [
    (Tolerances(), 50, 100, "no tolerance given"),
    (Tolerances(agreement_min=1.5), 50, 100, "between 0 and 1"),
    (Tolerances(probability_diff_max=-1), 50, 100, "finite number >= 0"),
    (Tolerances(latency_ratio_p99_max=math.nan), 50, 100, "finite number >= 0"),
    (TOL, 0, 100, "min_joined=0"),
    (TOL, 50, 0, "limit=0"),
])
def test_bad_input_is_refused(tolerances: Tolerances, min_joined: int, limit: int, words: str) -> None:
    with pytest.raises(ShadowCompareError, match=words):
        validate(tolerances, min_joined, limit)


# -- the module against loopback rings ------------------------------------------------------------------------

def ring_server(color: str, records: list[dict[str, Any]]) -> LoopbackServer:
    server = LoopbackServer()

    def answer(handler: Any, _body: bytes) -> tuple[int, Any]:
        if handler.headers.get("Authorization") != "Bearer " + TOKEN:
            return 401, {"error": "unauthorized"}
        return 200, {"color": color, "service_version": "1", "capacity": 10000, "recorded": len(records),
                     "size": len(records), "records": records}

    server.routes[("GET", "/admin/shadow")] = answer
    return server.start()


def args(base: LoopbackServer, cand: LoopbackServer | str, **extra: Any) -> dict[str, Any]:
    cand_url = cand if isinstance(cand, str) else cand.url
    values: dict[str, Any] = dict(baseline={"color": "blue", "urls": [base.url]},
                                  candidate={"color": "green", "urls": [cand_url]}, admin_token=TOKEN,
                                  min_joined=50, tolerances=TOL.configured(), timeout=2.0)
    values.update(extra)
    return values


@pytest.fixture
def blue() -> Any:
    server = ring_server("blue", [record(str(n), SAME, 1.0) for n in range(80)])
    yield server
    server.stop()


def test_module_successful_in_check_mode(blue: LoopbackServer, capsys: pytest.CaptureFixture[str]) -> None:
    green = ring_server("green", [record(str(n), SAME, 1.1) for n in range(80)])
    try:
        result = run_module(shadow_compare.main, args(blue, green), capsys, check_mode=True)
    finally:
        green.stop()
    assert not result.get("failed"), result
    assert (result["outcome"], result["changed"]) == ("successful", False)
    assert result["statistics"]["joined"] == 80
    assert result["statistics"]["agreement"] == 1.0
    assert [r["size"] for r in result["rings"]] == [80, 80]
    assert TOKEN not in str(result)


def test_module_fails_on_a_disagreeing_colour(blue: LoopbackServer, capsys: pytest.CaptureFixture[str]) -> None:
    green = ring_server("green", [record(str(n), OTHER, 1.0) for n in range(80)])
    try:
        result = run_module(shadow_compare.main, args(blue, green), capsys)
    finally:
        green.stop()
    assert result["failed"] and result["outcome"] == "failed"
    assert result["msg"].startswith(f"Shadow comparison of green ({green.url}) against the live colour blue")
    assert "agreement_min: agreement 0 (must be >= 0.99)" in result["msg"]


def test_module_unreachable_candidate_is_inconclusive(blue: LoopbackServer,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    result = run_module(shadow_compare.main, args(blue, f"http://127.0.0.1:{free_port()}"), capsys)
    assert result["failed"] and (result["outcome"], result["reason"]) == ("inconclusive", "ring_unreachable")
    assert "the candidate colour green could not be read" in result["msg"]
    assert "error" in result["rings"][-1]
    passed = run_module(shadow_compare.main, args(blue, f"http://127.0.0.1:{free_port()}", fail_on=["failed"]),
                        capsys)
    assert not passed.get("failed") and passed["outcome"] == "inconclusive"


def test_module_wrong_token_is_refused(blue: LoopbackServer, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_module(shadow_compare.main, dict(args(blue, blue), admin_token="wrong-token"), capsys)
    assert result["reason"] == "ring_refused"
    assert "admin token was refused" in result["msg"]


def test_module_url_of_the_wrong_colour_is_bad_input(blue: LoopbackServer,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    result = run_module(shadow_compare.main, args(blue, blue), capsys)
    assert result["failed"]
    assert "answers as colour 'blue', not the candidate colour 'green'" in result["msg"]
    assert "outcome" not in result


def test_module_without_tolerances_is_bad_input(blue: LoopbackServer, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_module(shadow_compare.main, args(blue, blue, tolerances={}), capsys)
    assert result["failed"] and "no tolerance given" in result["msg"]
    assert not blue.requests  # nothing was asked
