"""The shadow ring: what a colour answered to X-Request-ID requests, behind the admin token."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from grandmodel_service.app import create_app
from grandmodel_service.settings import Settings
from grandmodel_service.shadow import ShadowRing

from .conftest import ADMIN_TOKEN, matrix

URL = "/v1/models/strategic/predict"
AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}
BODY = orjson.dumps({"inputs": matrix((2, 48, 13))}, option=orjson.OPT_SERIALIZE_NUMPY)
JSON = {"content-type": "application/json"}


def _shadow(client: TestClient, **params: str | int) -> Any:
    reply = client.get("/admin/shadow", headers=AUTH, params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_request_with_an_id_is_recorded_with_its_answer(client: TestClient) -> None:
    answer = client.post(URL, content=BODY, headers={**JSON, "x-request-id": "a" * 32})
    assert answer.status_code == 200
    client.post(URL, content=BODY, headers=JSON)  # no id: not recorded
    ring = _shadow(client)
    assert ring["color"] == "green"
    assert ring["capacity"] == 10_000
    assert ring["size"] == ring["recorded"] == 1
    (record,) = ring["records"]
    predictions = answer.json()["predictions"]
    assert record["id"] == "a" * 32
    assert record["model"] == "strategic"
    assert record["status"] == 200
    assert record["actions"] == [p["action_index"] for p in predictions]
    assert np.allclose(
        record["probabilities"], [p["probabilities"] for p in predictions], atol=1e-6
    )
    assert 0 < record["latency_ms"] < 10_000


def test_errors_are_recorded_with_their_status(client: TestClient) -> None:
    bad = client.post(URL, content=b'{"inputs": []}', headers={**JSON, "x-request-id": "bad-1"})
    assert bad.status_code == 422
    client.post("/admin/drain", headers=AUTH)
    drained = client.post(URL, content=BODY, headers={**JSON, "x-request-id": "drained-1"})
    assert drained.status_code == 503
    records = _shadow(client)["records"]
    assert [(r["id"], r["status"], r["actions"]) for r in records] == [
        ("bad-1", 422, None),
        ("drained-1", 503, None),
    ]


@pytest.mark.parametrize(
    "hostile",
    [b"x" * 65, b"a b", b"<script>", b"id\xff", b""],
)
def test_a_malformed_id_is_served_but_not_recorded(client: TestClient, hostile: bytes) -> None:
    reply = client.post(URL, content=BODY, headers=[*JSON.items(), ("x-request-id", hostile)])  # type: ignore[arg-type]
    assert reply.status_code == 200
    assert _shadow(client)["size"] == 0


def test_the_ring_is_bounded_and_keeps_the_newest(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(shadow_ring_size=3))) as client:
        for number in range(5):
            client.post(URL, content=BODY, headers={**JSON, "x-request-id": f"r{number}"})
        ring = _shadow(client)
        assert (ring["size"], ring["recorded"], ring["capacity"]) == (3, 5, 3)
        assert [r["id"] for r in ring["records"]] == ["r2", "r3", "r4"]
        assert [r["id"] for r in _shadow(client, limit=2)["records"]] == ["r3", "r4"]
        assert _shadow(client, model="tactical")["records"] == []


def test_size_zero_records_nothing(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(shadow_ring_size=0))) as client:
        client.post(URL, content=BODY, headers={**JSON, "x-request-id": "r1"})
        ring = _shadow(client)
        assert (ring["size"], ring["recorded"], ring["records"]) == (0, 0, [])


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"authorization": "Bearer wrong"}, 401), ({"authorization": ADMIN_TOKEN}, 401)],
)
def test_the_ring_needs_the_admin_token(
    client: TestClient, headers: dict[str, str], status: int
) -> None:
    client.post(URL, content=BODY, headers={**JSON, "x-request-id": "secret-1"})
    reply = client.get("/admin/shadow", headers=headers, params={"limit": "oops"})
    assert reply.status_code == status
    assert "secret-1" not in reply.text


def test_the_ring_is_refused_without_an_admin_token(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(admin_token=None))) as client:
        assert client.get("/admin/shadow", headers=AUTH).status_code == 403


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "-1"},
        {"limit": "many"},
        {"limit": "99999999999"},
        {"model": "../etc"},
        {"model": "x" * 100},
    ],
)
def test_bad_parameters_get_a_client_error(client: TestClient, params: dict[str, str]) -> None:
    reply = client.get("/admin/shadow", headers=AUTH, params=params)
    assert 400 <= reply.status_code < 500, reply.text


def test_an_unknown_model_is_a_404(client: TestClient) -> None:
    reply = client.get("/admin/shadow", headers=AUTH, params={"model": "nosuch"})
    assert reply.status_code == 404
    assert reply.json()["error"] == "unknown_model"


def test_append_is_constant_time_and_memory_bounded() -> None:
    ring = ShadowRing(1000)
    probabilities = np.full((1, 3), 1 / 3, dtype=np.float32)
    started = time.perf_counter()
    for number in range(200_000):
        ring.add(b"%032x" % number, "strategic", 200, started, probabilities)
    assert len(ring.records) == 1000
    assert ring.recorded == 200_000
    assert ring.records[0].request_id == "%032x" % (200_000 - 1000)
    # 200k appends into a full ring: well under a second on any machine of ours (about 0.15 s here).
    assert time.perf_counter() - started < 5.0
