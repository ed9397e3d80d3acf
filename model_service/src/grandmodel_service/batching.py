"""Micro-batching: concurrent requests for one model share a forward pass."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
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


class MicroBatcher:
    """Collects submitted arrays and runs them as one batch on ``executor``.

    While a forward pass runs, new requests queue up and the next pass takes all of them (up
    to ``max_batch_size`` samples). On a busy single core that alone makes small batches:
    clients whose answers went out together come back one by one. So the batcher tracks the
    concurrency it sees (an EWMA of requests submitted and not yet answered) and, when fewer
    requests than that are queued, holds the batch open for up to ``max_wait_s`` for the
    rest. A lone client (concurrency 1) therefore never waits, and a crowd batches well.
    A request larger than ``max_batch_size`` runs alone.
    """

    EWMA_WEIGHT = 0.1

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], BatchOutput],
        executor: Executor,
        *,
        max_batch_size: int,
        max_wait_s: float,
        on_batch: Callable[[int, float], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._on_error = on_error
        self._queue: deque[_Pending] = deque()
        self._queued_samples = 0
        self._outstanding = 0
        self._concurrency = 1.0
        self._target = 1
        self._wakeup = asyncio.Event()
        self._window: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

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

    async def submit(self, inputs: np.ndarray) -> BatchOutput:
        if self._task is None:
            raise RuntimeError("batcher is not running")
        future: asyncio.Future[BatchOutput] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(inputs, future))
        self._queued_samples += inputs.shape[0]
        self._outstanding += 1
        self._concurrency += self.EWMA_WEIGHT * (self._outstanding - self._concurrency)
        self._wakeup.set()
        window = self._window
        if window is not None and (
            len(self._queue) >= self._target or self._queued_samples >= self._max_batch_size
        ):
            _resolve(window)
        try:
            return await future
        finally:
            self._outstanding -= 1

    async def _hold_window(self) -> None:
        loop = asyncio.get_running_loop()
        self._window = window = loop.create_future()
        handle = loop.call_later(self._max_wait_s, _resolve, window)
        try:
            await window
        finally:
            handle.cancel()
            self._window = None

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
            self._target = math.ceil(self._concurrency - 0.25)
            if (
                self._max_wait_s > 0
                and len(self._queue) < self._target
                and self._queued_samples < self._max_batch_size
            ):
                await self._hold_window()
            batch = self._take_batch()
            inputs = (
                batch[0].inputs
                if len(batch) == 1
                else np.concatenate([item.inputs for item in batch])
            )
            started = loop.time()
            try:
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
                self._on_batch(int(inputs.shape[0]), loop.time() - started)
            offset = 0
            for item in batch:
                size = item.inputs.shape[0]
                if not item.future.done():  # the client may have gone away
                    item.future.set_result(
                        output if len(batch) == 1 else output.slice(offset, offset + size)
                    )
                offset += size


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
