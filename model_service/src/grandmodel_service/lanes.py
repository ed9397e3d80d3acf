"""The Monte-Carlo lane: MC-dropout work, bounded and kept out of the plain predictions' way.

One MC request of 1,024 samples x 64 passes is a 65,536-row forward pass (hundreds of ms on
one core). Run on the same thread as plain predictions it stalled them for that long, and one
client could queue several. Here MC work:

- runs in its own **worker process** (``mc_concurrency`` of them), never on the plain path.
  A thread was measured first: even niced, it shares the GIL with the event loop, and each
  time the loop hands the GIL to a low-priority thread that the kernel then leaves waiting
  behind other processes, the loop waits too (priority inversion): plain p99 rose 2.7x
  (nice 0) and 4.1x (nice 10) under an MC flood on a loaded machine. A process shares no GIL;
- runs at a lower CPU priority (``mc_nice``): when plain work and MC work compete for the
  same core, the kernel gives the plain process almost all of it (weight 1024 against 110 at
  nice 10); the MC pass simply takes longer;
- is bounded: at most ``mc_concurrency`` running and ``mc_queue_limit`` waiting; beyond that
  the request is refused at once with 429 ``mc_lane_full`` and ``Retry-After``.

The worker loads the same artifacts (sha256 checked against what the server verified). If it
cannot start (a sandbox that forbids it), the lane falls back to a thread, logged as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from grandmodel_service.codec import RequestError
from grandmodel_service.engine import BatchOutput, LoadedModel

T = TypeVar("T")
log = logging.getLogger("grandmodel_service")

#: (model name, manifest path, sha256 the server verified, golden atol override)
ModelSpec = tuple[str, str, str, float | None]
_WORKER_MODELS: dict[str, LoadedModel] = {}


def _lower_priority(nice: int) -> None:
    # setpriority(PRIO_PROCESS, tid) sets one thread's nice value on Linux (0: the caller),
    # and threads created afterwards inherit it. Raising it needs no privilege; where it
    # fails (another OS, a seccomp filter) MC still runs, only unniced.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def _exit_with_parent(parent: int) -> None:
    """The server was killed outright (SIGKILL, OOM): do not outlive it as an orphan."""
    while os.getppid() == parent:
        threading.Event().wait(1.0)
    os._exit(0)


def _worker_init(
    specs: list[ModelSpec], nice: int, torch_threads: int, sched_idle: bool = False
) -> None:
    threading.Thread(
        target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="parent-watch"
    ).start()
    # Every thread of the worker, also those started while it was being imported; threads
    # started later inherit both settings.
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, int(task), nice)
            if sched_idle:
                os.sched_setscheduler(int(task), os.SCHED_IDLE, os.sched_param(0))
    _lower_priority(nice)
    import torch

    from grandmodel_service.engine import load_model

    torch.set_num_threads(torch_threads)
    torch._C._set_graph_executor_optimize(False)
    for name, path, sha256, atol in specs:
        model = load_model(Path(path), name, atol_override=atol, warmup_iterations=1)
        if model.manifest.sha256 != sha256:
            raise RuntimeError(f"{name}: artifact changed on disk since the server loaded it")
        _WORKER_MODELS[name] = model


def _worker_ready() -> list[str]:
    return sorted(_WORKER_MODELS)


def _worker_mc(name: str, inputs: np.ndarray, passes: int) -> BatchOutput:
    return _WORKER_MODELS[name].predict_mc(inputs, passes)


class McLane:
    def __init__(
        self,
        *,
        concurrency: int,
        queue_limit: int,
        retry_after_s: int,
        nice: int,
        torch_threads: int = 1,
        sched_idle: bool = False,
    ) -> None:
        self.sched_idle = sched_idle
        self.concurrency = concurrency
        self.queue_limit = queue_limit
        self.retry_after_s = retry_after_s
        self.nice = nice
        self.torch_threads = torch_threads
        self.active = 0  # running + waiting
        self.kind = "none"
        self._specs: list[ModelSpec] = []
        self._executor: Executor | None = None

    async def start(self, specs: list[ModelSpec], use_process: bool = True) -> None:
        """Start the worker process(es) and wait until they hold the models; else a thread."""
        self._specs = specs
        if use_process and specs:
            try:
                self._executor = self._process_pool()
                loaded = await asyncio.wrap_future(self._executor.submit(_worker_ready))
                self.kind = "process"
                log.info("Monte-Carlo lane ready", extra={"kind": "process", "models": loaded})
                return
            except Exception as exc:
                log.warning(
                    "Monte-Carlo worker process unavailable; MC runs on a thread",
                    extra={"reason": repr(exc)},
                )
                if self._executor is not None:
                    self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = ThreadPoolExecutor(
            self.concurrency,
            thread_name_prefix="mc",
            initializer=_lower_priority,
            initargs=(self.nice,),
        )
        self.kind = "thread"

    def _process_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.concurrency,
            mp_context=multiprocessing.get_context("spawn"),  # never fork a threaded process
            initializer=_worker_init,
            initargs=(self._specs, self.nice, self.torch_threads, self.sched_idle),
        )

    async def run_mc(self, model: LoadedModel, inputs: np.ndarray, passes: int) -> BatchOutput:
        if self.kind == "process":
            try:
                return await self.run(_worker_mc, model.name, inputs, passes)
            except BrokenProcessPool:
                log.error("Monte-Carlo worker died; restarting it")
                self._executor = self._process_pool()
                raise RequestError(
                    503, "mc_lane_restarting", "the Monte-Carlo worker restarted; retry"
                ) from None
        return await self.run(model.predict_mc, inputs, passes)

    @property
    def capacity(self) -> int:
        return self.concurrency + self.queue_limit

    @property
    def full(self) -> bool:
        return self.active >= self.capacity

    def refuse(self) -> None:
        raise RequestError(
            429,
            "mc_lane_full",
            f"{self.concurrency} Monte-Carlo request(s) running and {self.queue_limit} "
            f"waiting already; retry in {self.retry_after_s} s",
            headers={"retry-after": str(self.retry_after_s)},
        )

    async def run(self, func: Callable[..., T], *args: object) -> T:
        if self.full:
            self.refuse()
        loop = asyncio.get_running_loop()
        self.active += 1
        # The slot is held until the work itself ends, even when the awaiting request is
        # cancelled: the thread keeps running it, so it still counts against the bound.
        assert self._executor is not None, "lane not started"
        job = self._executor.submit(func, *args)
        job.add_done_callback(lambda _job: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(job)

    def _release(self) -> None:
        self.active -= 1

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        _stop_resource_tracker()


def _stop_resource_tracker() -> None:
    """Stop multiprocessing's resource tracker and reap it, so the server exits last.

    The process pool starts the tracker; it ignores SIGTERM and exits only when the server's
    end of its pipe closes, a moment *after* the server exited. systemd then finds a process
    left in the unit's cgroup and waits for it; where it is not told that the cgroup emptied
    (cgroup v1 in a container), it waits the whole TimeoutStopSec: every stop of a colour took
    30 s on the test hosts instead of 0.2 s.
    """
    from multiprocessing import resource_tracker

    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()
