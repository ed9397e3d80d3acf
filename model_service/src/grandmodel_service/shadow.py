"""Shadow-comparison ring: the last N answers to requests that carry an ``X-Request-ID``.

During a release's shadow phase the front door (nginx ``mirror``) sends each live predict request
to the idle colour as well, with the same ``X-Request-ID`` (nginx's ``$request_id``, shared by a
request and its mirror subrequest). Both colours remember what they answered here; the
``quantnova.grandmodel.shadow_compare`` module reads both rings through ``GET /admin/shadow`` and
joins them on the request id.

The predict path pays one deque append (constant time, bounded memory: the oldest record falls
out) and only for requests that carry a well-formed id; the answer's numpy arrays are kept as they
are and turned into lists only when an operator reads the ring.
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Ids the ring accepts: nginx's $request_id is 32 hex digits; common tracing ids fit too. Anything
#: else (too long, odd bytes) is not recorded, so a hostile header cannot grow or poison the ring.
REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")


@dataclass(slots=True)
class ShadowRecord:
    request_id: str
    model: str
    status: int
    latency_s: float
    at: float
    probabilities: np.ndarray | None  # (B, 3) float32 for a 200, None for an error

    def as_dict(self) -> dict[str, Any]:
        probabilities = self.probabilities
        return {
            "id": self.request_id,
            "model": self.model,
            "status": self.status,
            "latency_ms": round(self.latency_s * 1000.0, 4),
            "at": round(self.at, 6),
            "actions": None if probabilities is None else probabilities.argmax(axis=1).tolist(),
            "probabilities": None if probabilities is None else probabilities.tolist(),
        }


class ShadowRing:
    """Bounded, append-only memory of answers; ``capacity`` 0 records nothing."""

    __slots__ = ("capacity", "recorded", "records")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: deque[ShadowRecord] = deque(maxlen=max(capacity, 1))
        self.recorded = 0  # ever appended, to tell a reader how many fell out

    @staticmethod
    def accepts(raw_id: bytes | None) -> bool:
        return raw_id is not None and REQUEST_ID.match(raw_id) is not None

    def add(
        self,
        raw_id: bytes,
        model: str,
        status: int,
        started: float,
        probabilities: np.ndarray | None,
    ) -> None:
        if self.capacity <= 0:
            return
        self.records.append(
            ShadowRecord(
                raw_id.decode("ascii"),
                model,
                status,
                time.perf_counter() - started,
                time.time(),
                probabilities,
            )
        )
        self.recorded += 1

    def snapshot(self, limit: int, model: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` records (oldest first), optionally of one model only."""
        chosen: list[ShadowRecord] = []
        for record in reversed(self.records):  # a copy is not needed: no await in between
            if model is None or record.model == model:
                chosen.append(record)
                if len(chosen) >= limit:
                    break
        chosen.reverse()
        return [record.as_dict() for record in chosen]
