"""Garbage in is refused, nothing non-finite ever goes out, and served predictions are counted."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path

import httpx2
import numpy as np
import orjson
import pytest
import torch
from fastapi.testclient import TestClient

from grandmodel_service import nets
from grandmodel_service.app import create_app
from grandmodel_service.domain import DEFAULT_BOUND
from grandmodel_service.export import export_model
from grandmodel_service.settings import Settings

from .conftest import matrix

URL = "/v1/models/strategic/predict"
JSON = {"content-type": "application/json"}
NUMPY = orjson.OPT_SERIALIZE_NUMPY


def _body(array: np.ndarray, **extra: object) -> bytes:
    return orjson.dumps({"inputs": array, **extra}, option=NUMPY)


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of ``name`` with exactly ``labels`` (in any order) in a Prometheus text page."""
    line_re = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
    for line in text.splitlines():
        found = line_re.match(line)
        if not found or found.group(1) != name:
            continue
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))
        if pairs == labels:
            return float(found.group(3))
    raise AssertionError(f"{name}{labels} not in metrics")


def _no_non_finite(payload: bytes) -> None:
    """No null (orjson's NaN), NaN/Infinity token or non-finite number anywhere in the JSON."""

    def walk(node: object) -> None:
        assert node is not None
        if isinstance(node, float):
            assert np.isfinite(node)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(payload))


@pytest.mark.parametrize(
    "garbage",
    [
        np.full((48, 13), 3e38, dtype=np.float32),  # the issue's request: all finite float32
        np.where(matrix((48, 13)) > 0, 3e38, -3e38).astype(np.float32),  # mixed +-3e38
    ],
    ids=["all_3e38", "mixed_pm_3e38"],
)
def test_issue_garbage_is_refused_with_the_feature_and_bar(
    client: TestClient, garbage: np.ndarray
) -> None:
    reply = client.post(URL, content=_body(garbage), headers=JSON)
    assert reply.status_code == 422
    body = reply.json()
    assert body["error"] == "input_out_of_domain"
    assert "sample 0, bar 0, feature 0 ('f0')" in body["detail"]
    assert f"[{-DEFAULT_BOUND:g}, {DEFAULT_BOUND:g}]" in body["detail"]
    text = client.get("/metrics").text
    assert (
        _metric(text, "grandmodel_input_out_of_domain_total", model="strategic", color="green") == 1
    )
    assert (
        _metric(
            text, "grandmodel_predictions_total", model="strategic", color="green", action="long"
        )
        == 0
    )


def test_first_offender_is_named_at_the_last_position_and_on_every_codec_path(
    client: TestClient,
) -> None:
    batch = matrix((3, 48, 13))
    batch[2, 47, 12] = np.float32(DEFAULT_BOUND * 1.001)  # the very last value of the batch
    for content, headers in (
        (_body(batch), JSON),  # simdjson fast path
        (_body(batch).replace(b"[", b" [ "), JSON),  # still fast path, odd spacing
        (json.dumps({"inputs": batch.tolist(), "mc_passes": 0}, indent=1).encode(), JSON),
        (
            batch.astype("<f4").tobytes(),
            {"content-type": "application/octet-stream", "x-shape": "3,48,13"},
        ),
    ):
        reply = client.post(URL, content=content, headers=headers)
        assert reply.status_code == 422, reply.text
        assert reply.json()["error"] == "input_out_of_domain"
        assert "sample 2, bar 47, feature 12 ('f12') = 10010" in reply.json()["detail"]
    # The bound itself is inside the domain.
    edge = matrix((1, 48, 13))
    edge[0, 0, 0], edge[0, 1, 1] = DEFAULT_BOUND, -DEFAULT_BOUND
    assert client.post(URL, content=_body(edge), headers=JSON).status_code == 200


def test_training_data_sets_the_domain_and_the_goldens(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    rng = np.random.default_rng(5)
    training = rng.uniform(-2.0, 2.0, size=(500, 48, 13)).astype(np.float32)
    training[:, :, 3] = rng.uniform(10.0, 20.0, size=(500, 48))  # one feature elsewhere
    np.save(tmp_path / "train.npy", training)
    out = tmp_path / "art"
    export_model("strategic", out, training_data_path=tmp_path / "train.npy", domain_margin=0.5)
    export_model("tactical", out)
    manifest = json.loads((out / "strategic.manifest.json").read_text())
    domain = manifest["input"]["domain"]
    assert domain["source"] == "training_data"
    assert domain["rows"] == 500
    f3 = domain["features"][3]
    assert 4.9 < f3["min"] < 5.1
    assert 24.9 < f3["max"] < 25.1
    goldens = np.asarray([s["input"] for s in manifest["golden"]["samples"]])
    assert (goldens[:, :, 3] >= 10).all()  # drawn from the training data
    with TestClient(create_app(make_settings(model_dir=out))) as client:
        assert (
            client.get("/version").json()["models"]["strategic"]["input_domain"] == "training_data"
        )
        inside = training[:2].copy()
        inside[0, 10, 3] = 24.5
        assert client.post(URL, content=_body(inside), headers=JSON).status_code == 200
        inside[1, 20, 3] = 3.0  # below 5 for feature 3 only: a value other features accept
        reply = client.post(URL, content=_body(inside), headers=JSON)
        assert reply.status_code == 422
        assert "sample 1, bar 20, feature 3 ('f3') = 3 " in reply.json()["detail"]


def test_manifest_from_before_the_domain_still_loads_with_the_default(
    artifact_copy: Path, make_settings: Callable[..., Settings]
) -> None:
    path = artifact_copy / "strategic.manifest.json"
    data = json.loads(path.read_text())
    del data["input"]["domain"]
    path.write_text(json.dumps(data))
    with TestClient(create_app(make_settings(model_dir=artifact_copy))) as client:
        assert client.get("/ready").status_code == 200
        version = client.get("/version").json()["models"]["strategic"]
        assert version["input_domain"] == "default (manifest has no domain)"
        garbage = np.full((48, 13), 3e38, dtype=np.float32)
        assert client.post(URL, content=_body(garbage), headers=JSON).status_code == 422


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d["features"][0].update({"min": 5.0, "max": 1.0}), "min <= max"),
        (lambda d: d["features"].pop(), "domain lists 12 features"),
        (lambda d: d["features"][1].update({"max": "wide"}), "malformed"),
    ],
    ids=["inverted", "missing_feature", "not_a_number"],
)
def test_malformed_domain_refuses_the_model(
    artifact_copy: Path, make_settings: Callable[..., Settings], mutate, reason: str
) -> None:
    path = artifact_copy / "strategic.manifest.json"
    data = json.loads(path.read_text())
    mutate(data["input"]["domain"])
    path.write_text(json.dumps(data))
    with TestClient(create_app(make_settings(model_dir=artifact_copy))) as client:
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert reason in ready.json()["reasons"]["strategic"]
        assert client.post(URL, content=_body(matrix((48, 13))), headers=JSON).status_code == 503


@pytest.fixture
def overflowing_artifacts(tmp_path: Path, artifacts: Path) -> Path:
    """A strategic model that is finite on normal inputs and overflows near the domain edge."""
    model = nets.build("strategic")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["embed.weight"] *= 1e36
    torch.save(state, tmp_path / "huge.pt")
    out = tmp_path / "art"
    export_model("strategic", out, state_dict_path=tmp_path / "huge.pt")
    export_model("tactical", out)
    return out


def test_non_finite_output_is_refused_and_counted_never_returned(
    overflowing_artifacts: Path, make_settings: Callable[..., Settings]
) -> None:
    app = create_app(make_settings(model_dir=overflowing_artifacts, batch_max_wait_ms=50))
    normal = matrix((48, 13))
    edge = np.full((48, 13), DEFAULT_BOUND * 0.9, dtype=np.float32)  # inside the domain

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx2.ASGITransport(app=app)
            async with httpx2.AsyncClient(transport=transport, base_url="http://t") as client:
                # One request alone, then concurrent ones sharing forward passes: the bad
                # sample must fail only its own request.
                alone = await client.post(URL, content=_body(edge), headers=JSON)
                assert alone.status_code == 422
                assert alone.json()["error"] == "non_finite_output"
                _no_non_finite(alone.content)
                mixed = np.stack([normal, edge, normal])
                replies = await asyncio.gather(
                    client.post(URL, content=_body(normal), headers=JSON),
                    client.post(URL, content=_body(mixed), headers=JSON),
                    client.post(URL, content=_body(normal[None]), headers=JSON),
                    client.post(URL, content=_body(normal, mc_passes=4), headers=JSON),
                    client.post(URL, content=_body(edge, mc_passes=4), headers=JSON),
                )
                assert [r.status_code for r in replies] == [200, 422, 200, 200, 422]
                assert "for sample 1" in replies[1].json()["detail"]
                for reply in replies:
                    _no_non_finite(reply.content)
                binary = await client.post(
                    URL,
                    content=edge.tobytes(),
                    headers={"content-type": "application/octet-stream", "x-shape": "48,13"},
                )
                assert binary.status_code == 422
                text = (await client.get("/metrics")).text
                assert (
                    _metric(
                        text,
                        "grandmodel_non_finite_outputs_total",
                        model="strategic",
                        color="green",
                    )
                    == 4
                )
                # Only finite predictions are counted: 2 + 1 (the good rows of the mixed
                # batch are not served, but they were predicted) ...
                served = sum(
                    _metric(
                        text,
                        "grandmodel_predictions_total",
                        model="strategic",
                        color="green",
                        action=a,
                    )
                    for a in nets.ACTIONS
                )
                count = _metric(
                    text, "grandmodel_prediction_confidence_count", model="strategic", color="green"
                )
                assert served == count
                assert 3 <= served <= 5  # 1 + 1 + the 2 finite rows of the mixed batch (+ warm)

    asyncio.run(scenario())


def test_prediction_distribution_metrics_count_every_served_sample(client: TestClient) -> None:
    batch = matrix((37, 48, 13), seed=3)
    reply = client.post(URL, content=_body(batch), headers=JSON)
    assert reply.status_code == 200
    predictions = reply.json()["predictions"]
    single = client.post(URL, content=_body(batch[0]), headers=JSON).json()["predictions"]
    text = client.get("/metrics").text
    expected = dict.fromkeys(nets.ACTIONS, 0)
    for p in predictions + single:
        expected[p["action"]] += 1
    for action, count in expected.items():
        assert (
            _metric(
                text,
                "grandmodel_predictions_total",
                model="strategic",
                color="green",
                action=action,
            )
            == count
        )
    confidences = [p["confidence"] for p in predictions + single]
    labels = {"model": "strategic", "color": "green"}
    assert _metric(text, "grandmodel_prediction_confidence_count", **labels) == 38
    assert _metric(text, "grandmodel_prediction_confidence_sum", **labels) == pytest.approx(
        sum(confidences), rel=1e-4
    )
    le_05 = sum(c <= 0.5 for c in confidences)
    assert _metric(text, "grandmodel_prediction_confidence_bucket", **labels, le="0.5") == le_05
    assert _metric(text, "grandmodel_prediction_confidence_bucket", **labels, le="+Inf") == 38
    # The tactical model has its own series, untouched.
    assert (
        _metric(
            text, "grandmodel_predictions_total", model="tactical", color="green", action="long"
        )
        == 0
    )
