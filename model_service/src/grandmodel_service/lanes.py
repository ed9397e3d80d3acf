"""The Monte-Carlo lane: MC-dropout work, bounded and kept out of the plain predictions' way.

One MC request of 1,024 samples x 64 passes is a 65,536-row forward pass (hundreds of ms on
one core). Run on the same thread as plain predictions it stalled them for that long, and one
client could queue several. Here MC work:

- runs on its own thread(s) (``mc_concurrency``), never on the plain-prediction path;
- runs at a lower CPU priority (``mc_nice``, a per-thread nice value): when plain work and MC
  work compete for the same core, the kernel's scheduler gives the plain thread almost all
  of it (weight 1024 against 110 at nice 10), so a plain forward pass is not delayed by a
  long MC pass; the MC pass simply takes longer;
- is bounded: at most ``mc_concurrency`` running and ``mc_queue_limit`` waiting; beyond that
  the request is refused at once with 429 ``mc_lane_full`` and ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from grandmodel_service.codec import RequestError

T = TypeVar("T")


def _lower_priority(nice: int) -> None:
    # setpriority(PRIO_PROCESS, tid) sets one thread's nice value on Linux. Raising it needs
    # no privilege; where it fails (another OS, a seccomp filter) MC still runs, only unniced.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class McLane:
    def __init__(
        self, *, concurrency: int, queue_limit: int, retry_after_s: int, nice: int
    ) -> None:
        self.concurrency = concurrency
        self.queue_limit = queue_limit
        self.retry_after_s = retry_after_s
        self.nice = nice
        self.active = 0  # running + waiting
        self._executor = ThreadPoolExecutor(
            concurrency, thread_name_prefix="mc", initializer=_lower_priority, initargs=(nice,)
        )

    @property
    def capacity(self) -> int:
        return self.concurrency + self.queue_limit

    async def run(self, func: Callable[..., T], *args: object) -> T:
        if self.active >= self.capacity:
            raise RequestError(
                429,
                "mc_lane_full",
                f"{self.concurrency} Monte-Carlo request(s) running and {self.queue_limit} "
                f"waiting already; retry in {self.retry_after_s} s",
                headers={"retry-after": str(self.retry_after_s)},
            )
        loop = asyncio.get_running_loop()
        self.active += 1
        # The slot is held until the work itself ends, even when the awaiting request is
        # cancelled: the thread keeps running it, so it still counts against the bound.
        job = self._executor.submit(func, *args)
        job.add_done_callback(lambda _job: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(job)

    def _release(self) -> None:
        self.active -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
