"""Every route of a healthy service."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from grandmodel_service.manifest import Manifest

from .conftest import matrix

NUMPY = orjson.OPT_SERIALIZE_NUMPY


def test_health(client: TestClient) -> None:
    reply = client.get("/health")
    assert reply.status_code == 200
    assert reply.json() == {"status": "alive"}


def test_ready(client: TestClient) -> None:
    reply = client.get("/ready")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ready", "models": ["strategic", "tactical"]}


def test_version_matches_the_manifests(client: TestClient, artifacts) -> None:
    body = client.get("/version").json()
    assert body["service_version"] == "9.9.9"
    assert body["color"] == "green"
    for name in ("strategic", "tactical"):
        manifest = Manifest.read(artifacts / f"{name}.manifest.json")
        assert body["models"][name] == {
            "version": "1.2.3",
            "sha256": manifest.sha256,
            "ready": True,
            "input_domain": "default",
        }


def test_metrics_exposition(client: TestClient) -> None:
    body = orjson.dumps({"inputs": matrix((2, 48, 13))}, option=NUMPY)
    headers = {"content-type": "application/json"}
    assert client.post("/v1/models/strategic/predict", content=body, headers=headers).is_success
    client.post("/v1/models/strategic/predict", content=b"{", headers=headers)
    client.get("/no/such/path")
    text = client.get("/metrics").text
    assert (
        'grandmodel_http_requests_total{method="POST",'
        'route="/v1/models/strategic/predict",status="200"} 1.0'
    ) in text
    assert 'route="/v1/models/strategic/predict",status="400"' in text
    assert 'route="unmatched",status="404"' in text
    assert "grandmodel_http_request_duration_seconds_bucket" in text
    assert 'grandmodel_inference_batch_size_sum{model="strategic"} 2.0' in text
    assert "grandmodel_inference_duration_seconds_bucket" in text
    assert "grandmodel_inference_errors_total" in text
    assert 'grandmodel_rejected_requests_total{reason="malformed_json"} 1.0' in text
    assert 'grandmodel_model_info{color="green",model="strategic"' in text
    assert 'version="1.2.3"' in text
    assert "grandmodel_ready 1.0" in text
    assert "process_resident_memory_bytes" in text


def test_openapi_documents_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/health",
        "/ready",
        "/version",
        "/metrics",
        "/admin/drain",
        "/admin/resume",
        "/v1/models/strategic/predict",
        "/v1/models/tactical/predict",
        "/api/strategic/process",
        "/api/tactical/process",
    ):
        assert path in paths, path
    predict = paths["/v1/models/strategic/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {
        "application/json",
        "application/octet-stream",
    }
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/v1/models/strategic/predict", (48, 13)),
        ("/api/strategic/process", (48, 13)),
        ("/v1/models/tactical/predict", (60, 7)),
        ("/api/tactical/process", (60, 7)),
    ],
)
def test_predict_single_matrix(client: TestClient, path: str, shape: tuple[int, int]) -> None:
    reply = client.post(
        path,
        content=orjson.dumps({"inputs": matrix(shape)}, option=NUMPY),
        headers={"content-type": "application/json"},
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["actions"] == ["short", "neutral", "long"]
    assert body["version"] == "1.2.3"
    (prediction,) = body["predictions"]
    assert prediction["action"] == body["actions"][prediction["action_index"]]
    assert prediction["confidence"] == pytest.approx(max(prediction["probabilities"]))
    assert sum(prediction["probabilities"]) == pytest.approx(1, abs=1e-5)
    assert "mc_dropout" not in prediction


def test_predict_batch_matches_single_requests(client: TestClient) -> None:
    x = matrix((5, 48, 13), seed=11)
    headers = {"content-type": "application/json"}
    batch = client.post(
        "/v1/models/strategic/predict",
        content=orjson.dumps({"inputs": x}, option=NUMPY),
        headers=headers,
    )
    singles = [
        client.post(
            "/v1/models/strategic/predict",
            content=orjson.dumps({"inputs": x[i]}, option=NUMPY),
            headers=headers,
        ).json()["predictions"][0]
        for i in range(5)
    ]
    got = batch.json()["predictions"]
    assert len(got) == 5
    for one, many in zip(singles, got, strict=True):
        assert one["action"] == many["action"]
        np.testing.assert_allclose(one["probabilities"], many["probabilities"], atol=1e-6)


def test_binary_batches_round_trip(client: TestClient) -> None:
    x = matrix((3, 48, 13), seed=5)
    reply = client.post(
        "/v1/models/strategic/predict",
        content=x.tobytes(),
        headers={"content-type": "application/octet-stream", "x-shape": "3,48,13"},
    )
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/octet-stream"
    assert reply.headers["x-shape"] == "3,6"
    assert reply.headers["x-columns"].split(",")[:3] == ["p_short", "p_neutral", "p_long"]
    table = np.frombuffer(reply.content, dtype="<f4").reshape(3, 6)
    as_json = client.post(
        "/v1/models/strategic/predict",
        content=x.tobytes(),
        headers={
            "content-type": "application/octet-stream",
            "x-shape": "3,48,13",
            "accept": "application/json",
        },
    ).json()["predictions"]
    for row, prediction in zip(table, as_json, strict=True):
        np.testing.assert_allclose(row[:3], prediction["probabilities"], atol=1e-6)
        assert int(row[3]) == prediction["action_index"]
        assert row[4] == pytest.approx(prediction["confidence"])
        assert row[5] == pytest.approx(prediction["value"], abs=1e-6)


def test_mc_dropout_on_request(client: TestClient) -> None:
    x = matrix((2, 48, 13), seed=9)
    headers = {"content-type": "application/json"}
    plain = [
        client.post(
            "/v1/models/strategic/predict",
            headers=headers,
            content=orjson.dumps({"inputs": x}, option=NUMPY),
        ).json()
        for _ in range(2)
    ]
    assert plain[0]["predictions"] == plain[1]["predictions"]  # eval mode: deterministic
    mc = client.post(
        "/v1/models/strategic/predict",
        headers=headers,
        content=orjson.dumps({"inputs": x, "mc_passes": 32}, option=NUMPY),
    ).json()
    for deterministic, sampled in zip(plain[0]["predictions"], mc["predictions"], strict=True):
        spread = sampled["mc_dropout"]
        assert spread["passes"] == 32
        assert all(s > 0 for s in spread["std"])
        assert spread["value_std"] > 0
        assert sum(spread["mean"]) == pytest.approx(1, abs=1e-5)
        assert sampled["probabilities"] == deterministic["probabilities"]
    by_query = client.post(
        "/v1/models/strategic/predict?mc_passes=4",
        headers=headers,
        content=orjson.dumps({"inputs": x}, option=NUMPY),
    ).json()
    assert by_query["predictions"][0]["mc_dropout"]["passes"] == 4
    binary = client.post(
        "/v1/models/strategic/predict?mc_passes=8",
        content=x.tobytes(),
        headers={"content-type": "application/octet-stream", "x-shape": "2,48,13"},
    )
    assert binary.headers["x-shape"] == "2,14"


def test_golden_samples_replay_over_http(client: TestClient, artifacts) -> None:
    """What the release flow's health gate does: replay goldens, compare within atol."""
    for name in ("strategic", "tactical"):
        manifest = Manifest.read(artifacts / f"{name}.manifest.json")
        inputs = [sample.input for sample in manifest.golden]
        reply = client.post(f"/v1/models/{name}/predict", json={"inputs": inputs})
        for sample, prediction in zip(manifest.golden, reply.json()["predictions"], strict=True):
            assert prediction["action"] == sample.action
            np.testing.assert_allclose(
                prediction["probabilities"], sample.probabilities, atol=manifest.atol
            )
            assert prediction["value"] == pytest.approx(sample.value, abs=manifest.atol)
