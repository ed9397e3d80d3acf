"""Every class of bad input gets a 4xx with a reason: never a 500, never a crash, no leak."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from grandmodel_service.app import create_app
from grandmodel_service.settings import Settings

from .conftest import matrix

URL = "/v1/models/strategic/predict"
JSON = {"content-type": "application/json"}
BINARY = {"content-type": "application/octet-stream"}
NUMPY = orjson.OPT_SERIALIZE_NUMPY


def _rows(shape: tuple[int, ...] = (48, 13)) -> list[Any]:
    return matrix(shape).tolist()  # type: ignore[no-any-return]


def _ragged() -> list[Any]:
    rows = _rows()
    rows[0], rows[1] = rows[0] + [0.5], rows[1][:-1]
    return rows


def _nan_bytes() -> bytes:
    x = matrix((2, 48, 13))
    x[1, 5, 5] = np.nan
    return x.tobytes()


def _with(row: int, col: int, value: Any) -> list[Any]:
    rows = _rows()
    rows[row][col] = value
    return rows


# (name, method, path, body, headers, expected status, expected reason)
CASES: list[tuple[str, str, str, bytes, dict[str, str], int, str | None]] = [
    (
        "wrong shape",
        "POST",
        URL,
        json.dumps({"inputs": [[1, 2]]}).encode(),
        JSON,
        422,
        "invalid_shape",
    ),
    (
        "wrong inner shape",
        "POST",
        URL,
        json.dumps({"inputs": _rows((2, 48, 12))}).encode(),
        JSON,
        422,
        "invalid_shape",
    ),
    (
        "tactical shape on strategic",
        "POST",
        URL,
        json.dumps({"inputs": _rows((60, 7))}).encode(),
        JSON,
        422,
        "invalid_shape",
    ),
    (
        "4-d input",
        "POST",
        URL,
        json.dumps({"inputs": [_rows((1, 48, 13))]}).encode(),
        JSON,
        422,
        "invalid_shape",
    ),
    (
        "ragged rows",
        "POST",
        URL,
        json.dumps({"inputs": _ragged()}).encode(),
        JSON,
        422,
        "invalid_shape",
    ),
    (
        "string value",
        "POST",
        URL,
        json.dumps({"inputs": _with(3, 3, "1.5")}).encode(),
        JSON,
        422,
        "invalid_type",
    ),
    (
        "boolean value",
        "POST",
        URL,
        json.dumps({"inputs": _with(3, 3, True)}).encode(),
        JSON,
        422,
        "invalid_type",
    ),
    (
        "null value",
        "POST",
        URL,
        json.dumps({"inputs": _with(3, 3, None)}).encode(),
        JSON,
        422,
        "invalid_type",
    ),
    (
        "object value",
        "POST",
        URL,
        json.dumps({"inputs": _with(3, 3, {"a": 1})}).encode(),
        JSON,
        422,
        "invalid_type",
    ),
    ("inputs not a list", "POST", URL, b'{"inputs": "abc"}', JSON, 422, "invalid_type"),
    (
        "NaN literal",
        "POST",
        URL,
        json.dumps({"inputs": _with(0, 0, float("nan"))}).encode(),
        JSON,
        422,
        "non_finite",
    ),
    (
        "Infinity literal",
        "POST",
        URL,
        json.dumps({"inputs": _with(0, 0, float("inf"))}).encode(),
        JSON,
        422,
        "non_finite",
    ),
    (
        "float32 overflow",
        "POST",
        URL,
        json.dumps({"inputs": _with(0, 0, 1e39)}).encode(),
        JSON,
        422,
        "non_finite",
    ),
    (
        "double overflow",
        "POST",
        URL,
        json.dumps({"inputs": _rows()}).replace("[[", "[[1e999,", 1).encode(),
        JSON,
        422,
        "non_finite",
    ),
    (
        "huge integer",
        "POST",
        URL,
        json.dumps({"inputs": _with(0, 0, 10**40)}).encode(),
        JSON,
        422,
        "non_finite",
    ),
    ("empty batch", "POST", URL, b'{"inputs": []}', JSON, 422, "empty_batch"),
    ("empty rows", "POST", URL, b'{"inputs": [[]]}', JSON, 422, "invalid_shape"),
    (
        "oversize batch",
        "POST",
        URL,
        orjson.dumps({"inputs": matrix((65, 48, 13))}, option=NUMPY),
        JSON,
        413,
        "batch_too_large",
    ),
    ("malformed JSON", "POST", URL, b'{"inputs": [[1, 2', JSON, 400, "malformed_json"),
    ("trailing garbage", "POST", URL, b'{"inputs": []} xyz', JSON, 400, "malformed_json"),
    ("not UTF-8", "POST", URL, b'{"inputs": "\xff\xfe"}', JSON, 400, "malformed_json"),
    ("array body", "POST", URL, b"[1, 2, 3]", JSON, 422, "invalid_body"),
    ("missing inputs", "POST", URL, b"{}", JSON, 422, "missing_inputs"),
    (
        "unknown field",
        "POST",
        URL,
        json.dumps({"inputs": _rows(), "x": 1}).encode(),
        JSON,
        422,
        "unknown_field",
    ),
    ("empty body", "POST", URL, b"", JSON, 400, "empty_body"),
    (
        "text/plain",
        "POST",
        URL,
        b"hello",
        {"content-type": "text/plain"},
        415,
        "unsupported_media_type",
    ),
    ("no content type", "POST", URL, b'{"inputs": []}', {}, 415, "unsupported_media_type"),
    (
        "form body",
        "POST",
        URL,
        b"a=1",
        {"content-type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_media_type",
    ),
    (
        "mc_passes negative",
        "POST",
        URL,
        json.dumps({"inputs": _rows(), "mc_passes": -1}).encode(),
        JSON,
        422,
        "invalid_mc_passes",
    ),
    (
        "mc_passes too many",
        "POST",
        URL,
        json.dumps({"inputs": _rows(), "mc_passes": 10_000}).encode(),
        JSON,
        422,
        "invalid_mc_passes",
    ),
    (
        "mc_passes boolean",
        "POST",
        URL,
        json.dumps({"inputs": _rows(), "mc_passes": True}).encode(),
        JSON,
        422,
        "invalid_mc_passes",
    ),
    (
        "mc_passes string",
        "POST",
        URL,
        json.dumps({"inputs": _rows(), "mc_passes": "3"}).encode(),
        JSON,
        422,
        "invalid_mc_passes",
    ),
    (
        "mc_passes query not int",
        "POST",
        URL + "?mc_passes=abc",
        json.dumps({"inputs": _rows()}).encode(),
        JSON,
        422,
        "invalid_mc_passes",
    ),
    (
        "binary without X-Shape",
        "POST",
        URL,
        matrix((1, 48, 13)).tobytes(),
        BINARY,
        400,
        "missing_shape",
    ),
    (
        "binary bad X-Shape",
        "POST",
        URL,
        matrix((1, 48, 13)).tobytes(),
        {**BINARY, "x-shape": "one,48,13"},
        400,
        "invalid_shape",
    ),
    (
        "binary wrong dims",
        "POST",
        URL,
        matrix((1, 48, 13)).tobytes(),
        {**BINARY, "x-shape": "1,13,48,1"},
        422,
        "invalid_shape",
    ),
    (
        "binary size mismatch",
        "POST",
        URL,
        matrix((1, 48, 13)).tobytes()[:-4],
        {**BINARY, "x-shape": "1,48,13"},
        400,
        "body_size_mismatch",
    ),
    (
        "binary zero samples",
        "POST",
        URL,
        b"\x00" * 4,
        {**BINARY, "x-shape": "0,48,13"},
        422,
        "empty_batch",
    ),
    ("binary NaN", "POST", URL, _nan_bytes(), {**BINARY, "x-shape": "2,48,13"}, 422, "non_finite"),
    (
        "binary oversize batch",
        "POST",
        URL,
        matrix((65, 48, 13)).tobytes(),
        {**BINARY, "x-shape": "65,48,13"},
        413,
        "batch_too_large",
    ),
    ("oversize body", "POST", URL, b"[" + b"1," * 300_000 + b"1]", JSON, 413, "body_too_large"),
    ("GET on predict", "GET", URL, b"", {}, 405, None),
    ("unknown model", "POST", "/v1/models/nope/predict", b"{}", JSON, 404, None),
]


@pytest.fixture
def strict_client(make_settings: Callable[..., Settings]) -> TestClient:
    settings = make_settings(max_request_samples=64, max_body_bytes=500_000, max_mc_passes=64)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_request_gets_a_clear_4xx(
    strict_client: TestClient,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    reason: str | None,
) -> None:
    reply = strict_client.request(method, path, content=body or None, headers=headers)
    assert reply.status_code == status, reply.text
    if reason is not None:
        payload = reply.json()
        assert payload["error"] == reason
        assert payload["detail"]
    assert strict_client.get("/ready").status_code == 200


def test_chunked_body_over_the_limit_is_refused(strict_client: TestClient) -> None:
    def chunks():
        for _ in range(100):
            yield b" " * 10_000

    reply = strict_client.post(URL, content=chunks(), headers=JSON)
    assert reply.status_code == 413
    assert reply.json()["error"] == "body_too_large"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_memory_stays_flat_under_a_stream_of_bad_requests(strict_client: TestClient) -> None:
    cases = [case for case in CASES if case[0] not in {"oversize body", "oversize batch"}]

    def burst(rounds: int) -> None:
        for _ in range(rounds):
            for _, method, path, body, headers, status, _reason in cases:
                reply = strict_client.request(method, path, content=body or None, headers=headers)
                assert reply.status_code == status

    burst(5)  # warm caches, allocator pools and metric label children
    before = _rss_bytes()
    burst(40)  # about 1,700 bad requests
    growth = _rss_bytes() - before
    assert growth < 16 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"
    good = orjson.dumps({"inputs": matrix((48, 13))}, option=NUMPY)
    assert strict_client.post(URL, content=good, headers=JSON).status_code == 200
    metrics = strict_client.get("/metrics").text
    assert 'status="500"' not in metrics
