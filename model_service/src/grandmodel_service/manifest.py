"""The artifact manifest: a small JSON document next to each TorchScript file."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

FORMAT_VERSION = 1


class ManifestError(ValueError):
    """The manifest is missing, unreadable or incomplete."""


@dataclass(frozen=True)
class GoldenSample:
    input: list[list[float]]
    probabilities: list[float]
    value: float
    action: str


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    created_at: str
    artifact: str
    sha256: str
    input_shape: tuple[int, ...]
    input_dtype: str
    atol: float
    golden: tuple[GoldenSample, ...]
    actions: tuple[str, ...]
    #: ``input.domain`` as written by the exporter; None in manifests that predate it.
    input_domain: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    path: Path | None = field(default=None, compare=False)

    @property
    def artifact_path(self) -> Path:
        base = self.path.parent if self.path else Path.cwd()
        return base / self.artifact

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> Manifest:
        try:
            golden = data["golden"]
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                created_at=str(data["created_at"]),
                artifact=str(data["artifact"]),
                sha256=str(data["sha256"]).lower(),
                input_shape=tuple(int(d) for d in data["input"]["shape"]),
                input_dtype=str(data["input"]["dtype"]),
                atol=float(golden["atol"]),
                golden=tuple(
                    GoldenSample(
                        input=s["input"],
                        probabilities=[float(p) for p in s["probabilities"]],
                        value=float(s["value"]),
                        action=str(s["action"]),
                    )
                    for s in golden["samples"]
                ),
                actions=tuple(data["output"]["actions"]),
                input_domain=data["input"].get("domain"),
                raw=data,
                path=path,
            )
        except (KeyError, TypeError, ValueError) as exc:
            where = path or "<dict>"
            raise ManifestError(f"manifest {where} is incomplete: {exc!r}") from exc

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = orjson.loads(path.read_bytes())
        except OSError as exc:
            raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
        except orjson.JSONDecodeError as exc:
            raise ManifestError(f"manifest {path} is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ManifestError(f"manifest {path} is not a JSON object")
        return cls.from_dict(data, path)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically so a reader never sees half a manifest."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    tmp.replace(path)
