"""The simdjson fast path and the strict path agree, and neither accepts a wrong shape."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from grandmodel_service.codec import InputCodec, RequestError, encode_binary, encode_json
from grandmodel_service.engine import BatchOutput

from .conftest import matrix

CODEC = InputCodec((48, 13), max_samples=8, max_mc_passes=16)


@pytest.mark.parametrize("batch", [None, 1, 3, 8])
def test_fast_and_strict_paths_agree(batch: int | None) -> None:
    x = matrix((48, 13) if batch is None else (batch, 48, 13))
    body = orjson.dumps({"inputs": x, "mc_passes": 2}, option=orjson.OPT_SERIALIZE_NUMPY)
    fast = CODEC._decode_json_fast(body)
    assert fast is not None
    strict = CODEC._decode_json_strict(body)
    assert fast.single == strict.single == (batch is None)
    assert fast.mc_passes == strict.mc_passes == 2
    np.testing.assert_array_equal(fast.inputs, strict.inputs)
    np.testing.assert_array_equal(fast.inputs.reshape(x.shape), x)


def test_ragged_batch_with_the_right_count_is_refused() -> None:
    rows = matrix((48, 13)).tolist()
    rows[0] = rows[0] + [1.0]  # 14 numbers
    rows[1] = rows[1][:-1]  # 12 numbers: the total is still 48 * 13
    with pytest.raises(RequestError) as error:
        CODEC.decode_json(json.dumps({"inputs": rows}).encode())
    assert error.value.status == 422
    assert error.value.reason == "invalid_shape"


def test_whitespace_and_key_order_do_not_matter() -> None:
    rows = matrix((48, 13)).tolist()
    body = json.dumps({"mc_passes": 3, "inputs": rows}, indent=4).encode()
    decoded = CODEC.decode_json(body)
    assert decoded.mc_passes == 3
    assert decoded.single


def test_parser_is_reusable_after_errors() -> None:
    for body in (b"[1,", b'{"inputs": "x"}', b"{}"):
        with pytest.raises(RequestError):
            CODEC.decode_json(body)
    good = orjson.dumps({"inputs": matrix((2, 48, 13))}, option=orjson.OPT_SERIALIZE_NUMPY)
    assert CODEC.decode_json(good).inputs.shape == (2, 48, 13)


def test_encoders_report_every_sample() -> None:
    probs = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], dtype=np.float32)
    out = BatchOutput(probs, np.array([0.5, -0.5], dtype=np.float32))
    body = json.loads(encode_json("strategic", "1", ("short", "neutral", "long"), out))
    assert [p["action"] for p in body["predictions"]] == ["long", "short"]
    assert body["predictions"][1]["confidence"] == pytest.approx(0.6)
    content, headers = encode_binary(out)
    assert headers["X-Shape"] == "2,6"
    table = np.frombuffer(content, dtype="<f4").reshape(2, 6)
    np.testing.assert_allclose(table[:, 3], [2, 0])
    np.testing.assert_allclose(table[:, 5], [0.5, -0.5])
