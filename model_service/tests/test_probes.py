"""A release gate's own requests (header X-GrandModel-Probe) stay out of the client series.

The release analysis compares the colours' throughput, error ratio, latency and prediction mix
from Prometheus. A gate that probes a colour with golden inputs would otherwise add its own
requests and predictions to that colour's series and shift exactly what is compared.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
from fastapi.testclient import TestClient

from grandmodel_service.batching import MicroBatcher

from .conftest import matrix
from .test_batching import _echo
from .test_domain import _metric

URL = "/v1/models/strategic/predict"
JSON = {"content-type": "application/json"}
PROBE = {**JSON, "x-grandmodel-probe": "quantnova.grandmodel"}


def _predictions(text: str) -> float:
    """Predictions of the strategic model on green, summed over every action."""
    found = re.findall(
        r"^grandmodel_predictions_total\{"
        r'(?=[^}]*model="strategic")(?=[^}]*color="green")[^}]*\} (\S+)$',
        text,
        re.MULTILINE,
    )
    assert found, "no prediction series"
    return sum(float(value) for value in found)


def test_probes_are_answered_and_counted_apart_from_clients(client: TestClient) -> None:
    body = orjson.dumps({"inputs": matrix((2, 48, 13))}, option=orjson.OPT_SERIALIZE_NUMPY)
    probe_body = orjson.dumps({"inputs": matrix((3, 48, 13), 1)}, option=orjson.OPT_SERIALIZE_NUMPY)
    assert client.post(URL, content=body, headers=JSON).status_code == 200
    for _ in range(2):
        answer = client.post(URL, content=probe_body, headers=PROBE)
        assert answer.status_code == 200
        assert len(answer.json()["predictions"]) == 3
    assert client.post(URL, content=b"{", headers=PROBE).status_code == 400  # a bad probe too
    text = client.get("/metrics").text
    client_labels = {"method": "POST", "route": URL}
    assert _metric(text, "grandmodel_http_requests_total", **client_labels, status="200") == 1
    assert f'grandmodel_http_requests_total{{method="POST",route="{URL}",status="400"}}' not in text
    assert _metric(text, "grandmodel_probe_requests_total", **client_labels, status="200") == 2
    assert _metric(text, "grandmodel_probe_requests_total", **client_labels, status="400") == 1
    assert _metric(text, "grandmodel_http_request_duration_seconds_count", **client_labels) == 1
    assert _predictions(text) == 2  # the client's rows only
    assert _metric(text, "grandmodel_inference_samples_total", model="strategic") == 8  # all work


def test_an_empty_probe_header_counts_as_a_client(client: TestClient) -> None:
    body = orjson.dumps({"inputs": matrix((1, 48, 13))}, option=orjson.OPT_SERIALIZE_NUMPY)
    empty = {**JSON, "x-grandmodel-probe": ""}
    assert client.post(URL, content=body, headers=empty).status_code == 200
    text = client.get("/metrics").text
    labels = {"method": "POST", "route": URL, "status": "200"}
    assert _metric(text, "grandmodel_http_requests_total", **labels) == 1
    assert _predictions(text) == 1


def test_a_batch_of_clients_and_probes_marks_exactly_the_probe_rows() -> None:
    seen: list[tuple[np.ndarray, np.ndarray | None]] = []

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(
                _echo,
                executor,
                max_batch_size=64,
                max_wait_s=0.05,
                on_batch=lambda out, _s, rows: seen.append((out.value.copy(), rows)),
            )
            batcher.start()
            # Values 100+ are probes; sizes vary so row offsets are exercised.
            requests = [
                (np.full((1 + i % 3, 4, 2), float(100 + i if p else i), np.float32), p)
                for i, p in ((i, i % 4 == 1) for i in range(24))
            ]
            results = await asyncio.gather(*(batcher.submit(x, probe=p) for x, p in requests))
            for (x, _), out in zip(requests, results, strict=True):
                np.testing.assert_array_equal(out.value, x[:, 0, 0])  # probes answered too
            await batcher.stop()

    asyncio.run(scenario())
    assert any(rows is not None for _, rows in seen), "no batch mixed a probe with clients"
    client_values: list[float] = []
    for values, rows in seen:
        kept = values if rows is None else values[rows]
        assert all(v < 100 for v in kept)  # no probe row is kept
        if rows is not None:
            assert all(v >= 100 for v in values[~rows])  # and no client row is dropped
        client_values.extend(kept.tolist())
    expected = sum(1 + i % 3 for i in range(24) if i % 4 != 1)
    assert len(client_values) == expected
