"""The input domain of a model: the range of values each feature may take.

``grandmodel-export`` records, per feature, the valid range in the manifest (``input.domain``):
measured on the training data when it is given (minimum and maximum widened by a margin of the
observed span on each side), else the documented default ``[-DEFAULT_BOUND, DEFAULT_BOUND]``.
Manifests written before the domain existed get that default when they are read, so older
releases keep loading. The service refuses a sample with any value outside its feature's range
(422 ``input_out_of_domain``, naming the sample, bar and feature): a model answers garbage
confidently far outside what it was trained on, and a desk must not trade on that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Default bound on every feature when no training data was given at export. The features are
#: expected standardised (z-scores): no real market state sits 10,000 standard deviations out,
#: while finite float32 garbage (3e38) and unit mistakes (prices in cents) do.
DEFAULT_BOUND = 1.0e4
#: Default margin, as a fraction of the observed span, added on each side of the training range.
DEFAULT_MARGIN = 0.25


class DomainError(ValueError):
    """The manifest's domain is malformed, or the training data cannot give one."""


@dataclass(frozen=True)
class InputDomain:
    """Per-feature closed ranges ``[low[i], high[i]]`` applied to every bar."""

    low: np.ndarray  # (features,) float32
    high: np.ndarray  # (features,) float32
    names: tuple[str, ...]
    source: str  # "training_data", "default", or "default (manifest has no domain)"

    @classmethod
    def default(cls, features: int, source: str = "default") -> InputDomain:
        return cls(
            np.full(features, -DEFAULT_BOUND, dtype=np.float32),
            np.full(features, DEFAULT_BOUND, dtype=np.float32),
            tuple(f"f{i}" for i in range(features)),
            source,
        )

    @classmethod
    def from_training_data(
        cls, data: np.ndarray, margin: float = DEFAULT_MARGIN, names: list[str] | None = None
    ) -> InputDomain:
        """Range of ``data`` (N, bars, features) per feature, widened by ``margin`` x span."""
        if data.ndim != 3 or data.shape[0] == 0:
            raise DomainError(f"training data must be (N, bars, features), got {data.shape}")
        if not np.isfinite(data).all():
            raise DomainError("training data contains NaN or Inf")
        if margin < 0:
            raise DomainError(f"margin must be >= 0, got {margin}")
        flat = data.reshape(-1, data.shape[-1]).astype(np.float64)
        low, high = flat.min(axis=0), flat.max(axis=0)
        span = np.maximum(high - low, 1e-6)
        features = data.shape[-1]
        return cls(
            (low - margin * span).astype(np.float32),
            (high + margin * span).astype(np.float32),
            tuple(names) if names else tuple(f"f{i}" for i in range(features)),
            "training_data",
        )

    def to_manifest(self, **extra: Any) -> dict[str, Any]:
        return {
            "source": self.source,
            **extra,
            "features": [
                {"name": name, "min": float(lo), "max": float(hi)}
                for name, lo, hi in zip(self.names, self.low, self.high, strict=True)
            ],
        }

    @classmethod
    def from_manifest(cls, data: dict[str, Any] | None, features: int) -> InputDomain:
        if data is None:
            return cls.default(features, "default (manifest has no domain)")
        try:
            entries = data["features"]
            if len(entries) != features:
                raise DomainError(f"domain lists {len(entries)} features, input has {features}")
            low = np.asarray([float(e["min"]) for e in entries], dtype=np.float64)
            high = np.asarray([float(e["max"]) for e in entries], dtype=np.float64)
            names = tuple(str(e.get("name", f"f{i}")) for i, e in enumerate(entries))
        except (KeyError, TypeError, ValueError) as exc:
            raise DomainError(f"input.domain is malformed: {exc}") from exc
        if not (np.isfinite(low).all() and np.isfinite(high).all()) or (low > high).any():
            raise DomainError("input.domain needs finite ranges with min <= max")
        return cls(
            low.astype(np.float32), high.astype(np.float32), names, str(data.get("source", "?"))
        )

    def violation(self, array: np.ndarray) -> tuple[int, int, int, float] | None:
        """(sample, bar, feature, value) of the first value outside its range (NaN included).

        ``array`` is (B, bars, features). The common case (everything inside) costs one fused
        comparison pass; locating the culprit happens only on refusal.
        """
        inside = (array >= self.low) & (array <= self.high)  # NaN compares False: refused too
        if inside.all():
            return None
        sample, bar, feature = (int(i) for i in np.argwhere(~inside)[0])
        return sample, bar, feature, float(array[sample, bar, feature])

    def describe(self, where: tuple[int, int, int, float]) -> str:
        sample, bar, feature, value = where
        shown = "NaN" if math.isnan(value) else f"{value:.6g}"
        return (
            f"sample {sample}, bar {bar}, feature {feature} ({self.names[feature]!r}) = {shown} "
            f"is outside the model's input domain [{float(self.low[feature]):.6g}, "
            f"{float(self.high[feature]):.6g}] (domain source: {self.source})"
        )
