"""Mutable state of one running service: its model slots, drain flag and in-flight count."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from grandmodel_service.batching import MicroBatcher
from grandmodel_service.codec import InputCodec
from grandmodel_service.engine import LoadedModel
from grandmodel_service.metrics import Metrics
from grandmodel_service.settings import Settings


@dataclass
class ModelSlot:
    """One configured model and where it stands."""

    name: str
    model: LoadedModel | None = None
    codec: InputCodec | None = None
    batcher: MicroBatcher | None = None
    failure: str | None = "not loaded yet"


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics
    slots: dict[str, ModelSlot] = field(default_factory=dict)
    executor: ThreadPoolExecutor | None = None
    draining: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False

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
