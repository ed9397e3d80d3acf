"""Micro-batching: concurrent requests for one model share a forward pass."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from grandmodel_service.engine import BatchOutput

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    inputs: np.ndarray
    future: asyncio.Future[BatchOutput]
    probe: bool = False


def _client_rows(batch: list[_Pending], samples: int) -> np.ndarray | None:
    """Which rows of the batch answer clients (not release probes); None when all of them do."""
    if not any(item.probe for item in batch):
        return None
    rows = np.ones(samples, dtype=bool)
    offset = 0
    for item in batch:
        size = item.inputs.shape[0]
        if item.probe:
            rows[offset : offset + size] = False
        offset += size
    return rows


class MicroBatcher:
    """Collects submitted arrays and runs them as one batch on ``executor``.

    While a forward pass runs, new requests queue up and the next pass takes all of them (up
    to ``max_batch_size`` samples). On a busy single core that alone makes small batches:
    clients whose answers went out together come back one by one. So the batcher tracks the
    concurrency it sees (an EWMA of requests submitted and not yet answered) and, when fewer
    requests than that are queued, keeps yielding to the event loop so that requests already
    on the wire can join, for as long as they keep arriving at most ``arrival_gap_s`` apart
    and never longer than ``max_wait_s`` in all. A lone client never waits; a crowd batches
    well. Event-loop timers have 1 ms resolution, too coarse for this, hence the yielding.
    A request larger than ``max_batch_size`` runs alone.

    ``on_batch(output, seconds, client_rows)`` sees every forward pass; ``client_rows`` is None
    when every row answers a client, else a mask that is False on the rows of requests
    submitted with ``probe=True`` (a release gate's own requests, kept out of the prediction
    statistics that compare the colours on client traffic).

    With ``executor=None`` the forward pass runs on the event loop's own thread (see the
    README's tail-latency section for when that is the better choice).
    """

    EWMA_WEIGHT = 0.1

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], BatchOutput],
        executor: Executor | None,
        *,
        max_batch_size: int,
        max_wait_s: float,
        arrival_gap_s: float = 0.0003,
        on_batch: Callable[[BatchOutput, float, np.ndarray | None], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._arrival_gap_s = arrival_gap_s
        self._on_batch = on_batch
        self._on_error = on_error
        self._queue: deque[_Pending] = deque()
        self._queued_samples = 0
        self._outstanding = 0
        self._concurrency = 1.0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def observed_concurrency(self) -> float:
        return self._concurrency

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        while self._queue:  # noqa: ASYNC110 - runs once, at shutdown
            await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, inputs: np.ndarray, *, probe: bool = False) -> BatchOutput:
        if self._task is None:
            raise RuntimeError("batcher is not running")
        future: asyncio.Future[BatchOutput] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(inputs, future, probe))
        self._queued_samples += inputs.shape[0]
        self._outstanding += 1
        self._concurrency += self.EWMA_WEIGHT * (self._outstanding - self._concurrency)
        self._wakeup.set()
        try:
            return await future
        finally:
            self._outstanding -= 1

    async def _gather(self) -> None:
        """Yield to the loop while more requests are expected and still arriving."""
        target = math.ceil(self._concurrency - 0.25)
        if self._max_wait_s <= 0 or len(self._queue) >= target:
            return
        clock = time.perf_counter
        now = clock()
        deadline = now + self._max_wait_s
        last_arrival, seen = now, len(self._queue)
        while len(self._queue) < target and self._queued_samples < self._max_batch_size:
            await asyncio.sleep(0)
            now = clock()
            if len(self._queue) != seen:
                last_arrival, seen = now, len(self._queue)
            elif now - last_arrival > self._arrival_gap_s or now > deadline:
                return

    def _take_batch(self) -> list[_Pending]:
        batch = [self._queue.popleft()]
        samples = batch[0].inputs.shape[0]
        while self._queue and samples + self._queue[0].inputs.shape[0] <= self._max_batch_size:
            item = self._queue.popleft()
            batch.append(item)
            samples += item.inputs.shape[0]
        self._queued_samples -= samples
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._gather()
            batch = self._take_batch()
            inputs = (
                batch[0].inputs
                if len(batch) == 1
                else np.concatenate([item.inputs for item in batch])
            )
            started = loop.time()
            try:
                if self._executor is None:
                    output = self._run_batch(inputs)
                else:
                    output = await loop.run_in_executor(self._executor, self._run_batch, inputs)
            except Exception as exc:
                if self._on_error is not None:
                    self._on_error(exc)
                log.exception("inference failed", extra={"batch_size": int(inputs.shape[0])})
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(
                    output, loop.time() - started, _client_rows(batch, int(inputs.shape[0]))
                )
            offset = 0
            for item in batch:
                size = item.inputs.shape[0]
                if not item.future.done():  # the client may have gone away
                    item.future.set_result(
                        output if len(batch) == 1 else output.slice(offset, offset + size)
                    )
                offset += size
