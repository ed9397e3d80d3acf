"""Micro-batching merges concurrent requests and hands each its own slice."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from grandmodel_service.batching import MicroBatcher
from grandmodel_service.engine import BatchOutput


def _echo(inputs: np.ndarray) -> BatchOutput:
    """Probabilities carry the first input value so slices can be checked."""
    first = inputs[:, 0, 0]
    return BatchOutput(np.repeat(first[:, None], 3, axis=1), first.copy())


def test_concurrent_requests_share_forward_passes() -> None:
    sizes: list[int] = []

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(
                _echo,
                executor,
                max_batch_size=64,
                max_wait_s=0.05,
                on_batch=lambda out, _s, _rows: sizes.append(len(out)),
            )
            batcher.start()
            requests = [np.full((1 + i % 3, 4, 2), float(i), dtype=np.float32) for i in range(40)]
            results = await asyncio.gather(*(batcher.submit(x) for x in requests))
            for x, out in zip(requests, results, strict=True):
                assert len(out) == x.shape[0]
                np.testing.assert_array_equal(out.value, x[:, 0, 0])
            await batcher.stop()

    asyncio.run(scenario())
    assert sum(sizes) == sum(1 + i % 3 for i in range(40))
    assert len(sizes) < 40 / 2, sizes  # merged, not one pass per request
    assert max(sizes) <= 64


def test_oversize_request_runs_alone() -> None:
    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(_echo, executor, max_batch_size=4, max_wait_s=0)
            batcher.start()
            out = await batcher.submit(np.ones((10, 4, 2), dtype=np.float32))
            assert len(out) == 10
            await batcher.stop()

    asyncio.run(scenario())


def test_inference_error_reaches_every_caller_and_the_batcher_survives() -> None:
    errors: list[BaseException] = []
    calls = 0

    def flaky(inputs: np.ndarray) -> BatchOutput:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return _echo(inputs)

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(
                flaky, executor, max_batch_size=8, max_wait_s=0, on_error=errors.append
            )
            batcher.start()
            with pytest.raises(RuntimeError, match="boom"):
                await batcher.submit(np.zeros((1, 4, 2), dtype=np.float32))
            out = await batcher.submit(np.ones((1, 4, 2), dtype=np.float32))
            assert out.value.tolist() == [1.0]
            await batcher.stop()

    asyncio.run(scenario())
    assert len(errors) == 1


def test_lone_client_does_not_wait_for_the_window() -> None:
    async def scenario() -> float:
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(_echo, executor, max_batch_size=64, max_wait_s=0.5)
            batcher.start()
            loop = asyncio.get_running_loop()
            x = np.ones((1, 4, 2), dtype=np.float32)
            await batcher.submit(x)
            started = loop.time()
            for _ in range(20):
                await batcher.submit(x)
            elapsed = loop.time() - started
            await batcher.stop()
            return elapsed

    assert asyncio.run(scenario()) < 0.5  # 20 sequential requests, far below 20 x 0.5 s
