"""State of one running service and its life cycle: model slots, lanes, drain flag, in-flight.

``Runtime.start()`` (called by the app's lifespan) configures torch, loads every model slot
(``ModelSlot.load``: read, verify, warm up, then a batcher and a codec), freezes the start-up
heap out of the garbage collector's view and marks the service started; ``Runtime.stop()``
drains the batchers and the lanes. Routes receive the runtime as a FastAPI dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from fastapi import Request

from grandmodel_service.batching import MicroBatcher
from grandmodel_service.codec import InputCodec
from grandmodel_service.engine import BatchOutput, LoadedModel, ModelLoadError, load_model
from grandmodel_service.lanes import McLane
from grandmodel_service.metrics import Metrics
from grandmodel_service.settings import Settings
from grandmodel_service.shadow import ShadowRing

log = logging.getLogger("grandmodel_service")


def configure_torch(settings: Settings) -> None:
    torch.set_num_threads(settings.torch_threads)
    # The TorchScript profiling executor re-specialises the graph for new input shapes;
    # with micro-batching every batch size is a new shape, which cost up to 5 ms per
    # recompilation (measured). Small MLPs gain nothing from its fusions, so run unoptimised.
    torch._C._set_graph_executor_optimize(False)
    # Inter-op threads can be set only once per process, before any inter-op work.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(settings.torch_interop_threads)


@dataclass
class ModelSlot:
    """One configured model and where it stands."""

    name: str
    model: LoadedModel | None = None
    codec: InputCodec | None = None
    batcher: MicroBatcher | None = None
    failure: str | None = "not loaded yet"

    async def load(self, runtime: Runtime) -> None:
        """Load, verify and warm up; on refusal keep the reason and stay not ready."""
        settings, metrics = runtime.settings, runtime.metrics
        path = settings.manifest_path(self.name)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            model = await loop.run_in_executor(
                runtime.loader,
                partial(
                    load_model,
                    path,
                    self.name,
                    atol_override=settings.golden_atol,
                    warmup_iterations=settings.warmup_iterations,
                    warmup_batch=min(settings.batch_max_size, 256),
                ),
            )
        except ModelLoadError as exc:
            self.failure = f"refused: {exc}"
            log.error(
                "model refused; service stays not ready",
                extra={"model": self.name, "manifest": str(path), "reason": str(exc)},
            )
            return
        self.model = model
        self.codec = InputCodec(
            model.input_shape,
            settings.max_request_samples,
            settings.max_mc_passes,
            domain=model.domain,
            max_mc_samples=settings.mc_max_samples,
        )
        color = settings.color
        errors = metrics.inference_errors.labels(self.name)
        metrics.predictions.register_model(self.name, color, model.manifest.actions)
        observe = partial(metrics.observe_batch, self.name)
        record = partial(metrics.predictions.observe, self.name, color)

        def on_batch(output: BatchOutput, seconds: float, client_rows: np.ndarray | None) -> None:
            observe(len(output), seconds)
            probabilities = output.probabilities
            keep = np.isfinite(probabilities).all(axis=1) & np.isfinite(output.value)
            if client_rows is not None:  # a release gate's probes stay out of the prediction mix
                keep &= client_rows
            record(probabilities if keep.all() else probabilities[keep])

        self.batcher = MicroBatcher(
            model.predict,
            runtime.plain_executor,
            max_batch_size=settings.batch_max_size,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            arrival_gap_s=settings.batch_arrival_gap_ms / 1000,
            on_batch=on_batch,
            on_error=lambda _exc: errors.inc(),
        )
        self.batcher.start()
        self.failure = None
        metrics.model_info.labels(
            self.name,
            model.manifest.version,
            model.manifest.sha256,
            settings.service_version,
            color,
        ).set(1)
        metrics.out_of_domain.labels(self.name, color)
        metrics.non_finite_outputs.labels(self.name, color)
        log.info(
            "model loaded, verified and warmed up",
            extra={
                "model": self.name,
                "version": model.manifest.version,
                "sha256": model.manifest.sha256,
                "input_domain": model.domain.source,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics
    slots: dict[str, ModelSlot] = field(default_factory=dict)
    #: Plain forward passes (None: on the event loop thread itself, see settings).
    plain_executor: ThreadPoolExecutor | None = None
    #: Loading and warm-up only.
    loader: ThreadPoolExecutor | None = None
    mc_lane: McLane | None = None
    draining: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False
    #: Answers to requests with an X-Request-ID, for the release's shadow comparison.
    shadow: ShadowRing = field(init=False)

    def __post_init__(self) -> None:
        self.slots = {name: ModelSlot(name) for name in self.settings.models}
        self.shadow = ShadowRing(self.settings.shadow_ring_size)

    async def start(self) -> None:
        settings = self.settings
        configure_torch(settings)
        self.idle = asyncio.Event()
        self.idle.set()
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="loader")
        if not settings.inline_inference:
            self.plain_executor = ThreadPoolExecutor(
                settings.inference_workers, thread_name_prefix="inference"
            )
        self.mc_lane = McLane(
            concurrency=settings.mc_concurrency,
            queue_limit=settings.mc_queue_limit,
            retry_after_s=settings.mc_retry_after_s,
            nice=settings.mc_nice,
            torch_threads=settings.torch_threads,
            sched_idle=settings.mc_sched_idle,
        )
        for slot in self.slots.values():
            await slot.load(self)
        await self.mc_lane.start(
            [
                (
                    name,
                    str(settings.manifest_path(name)),
                    slot.model.manifest.sha256,
                    settings.golden_atol,
                )
                for name, slot in self.slots.items()
                if slot.model is not None
            ],
            use_process=settings.mc_process,
        )
        # torch, FastAPI and pydantic leave ~200k long-lived objects; a full collection that
        # walks them takes 50-300 ms (measured) and lands on some unlucky request. Freeze
        # them out of the collector's view once they exist.
        gc.collect()
        gc.freeze()
        self.started = True
        self.refresh_ready_gauge()
        log.info(
            "service started",
            extra={
                "color": settings.color,
                "env": settings.env.value,
                "service_version": settings.service_version,
                "not_ready": self.not_ready_reasons() or None,
            },
        )

    async def stop(self) -> None:
        # uvicorn has already stopped accepting and waited for in-flight requests.
        self.draining = True
        self.refresh_ready_gauge()
        for slot in self.slots.values():
            await slot.close()
        for executor in (self.plain_executor, self.loader):
            if executor is not None:
                executor.shutdown(wait=True)
        if self.mc_lane is not None:
            self.mc_lane.shutdown()
        log.info("service stopped", extra={"color": self.settings.color})

    def not_ready_reasons(self) -> dict[str, str]:
        reasons: dict[str, str] = {}
        if not self.started:
            reasons["service"] = "starting"
        if self.draining:
            reasons["service"] = "draining"
        for name, slot in self.slots.items():
            if slot.failure:
                reasons[name] = slot.failure
        return reasons

    def refresh_ready_gauge(self) -> None:
        self.metrics.ready.set(0 if self.not_ready_reasons() else 1)
        self.metrics.draining.set(1 if self.draining else 0)

    def request_started(self) -> None:
        self.in_flight += 1
        self.metrics.inflight.inc()
        self.idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        self.metrics.inflight.dec()
        if self.in_flight == 0:
            self.idle.set()


def get_runtime(request: Request) -> Runtime:
    """FastAPI dependency: the runtime of the app serving this request."""
    runtime: Runtime = request.app.state.runtime
    return runtime
