"""``grandmodel-export``: build TorchScript artifacts and their manifests."""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grandmodel_service import __version__, nets
from grandmodel_service.domain import DEFAULT_BOUND, DEFAULT_MARGIN, DomainError, InputDomain
from grandmodel_service.engine import run_forward
from grandmodel_service.logs import configure_logging
from grandmodel_service.manifest import FORMAT_VERSION, sha256_hex, write_json

log = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-5
#: Bounds of the trunk sizes export accepts (a model far beyond them is a typo, not a release).
MAX_HIDDEN = 4096
MAX_DEPTH = 256


def export_model(
    name: str,
    out_dir: Path,
    *,
    version: str = "1.0.0",
    seed: int = 0,
    state_dict_path: Path | None = None,
    golden_count: int = 4,
    atol: float = DEFAULT_ATOL,
    training_data_path: Path | None = None,
    domain_margin: float = DEFAULT_MARGIN,
    hidden: int | None = None,
    depth: int = 0,
) -> Path:
    """Write ``<name>-<version>.pt`` and ``<name>.manifest.json`` into ``out_dir``.

    The manifest's ``input.domain`` is each feature's range in ``training_data_path`` (a
    ``numpy.save``d float array of shape (N, bars, features)) widened by ``domain_margin`` of
    the span on each side, or ``[-DEFAULT_BOUND, DEFAULT_BOUND]`` without training data.
    ``hidden`` and ``depth`` size the trunk (default: the shipped actor's width, no extra layers):
    a bigger model answers the same requests more slowly, as a heavier release would.
    """
    if name not in nets.SPECS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(nets.SPECS)}")
    spec = nets.SPECS[name]
    if hidden is not None and not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"{name}: hidden={hidden} must be between 1 and {MAX_HIDDEN}")
    if not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"{name}: depth={depth} must be between 0 and {MAX_DEPTH}")
    spec = dataclasses.replace(spec, hidden=spec.hidden if hidden is None else hidden, depth=depth)
    training: np.ndarray | None = None
    if training_data_path is not None:
        try:
            training = np.load(training_data_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DomainError(f"cannot read training data {training_data_path}: {exc}") from exc
        if training.ndim != 3 or training.shape[1:] != spec.input_shape:
            raise DomainError(
                f"training data {training_data_path} has shape {training.shape}; "
                f"{name} needs (N, {spec.input_shape[0]}, {spec.input_shape[1]})"
            )
        domain = InputDomain.from_training_data(training, domain_margin)
        domain_doc = domain.to_manifest(
            training_data=str(training_data_path),
            rows=int(training.shape[0]),
            margin=domain_margin,
        )
    else:
        domain = InputDomain.default(spec.features)
        domain_doc = domain.to_manifest(bound=DEFAULT_BOUND)
    state_dict = None
    if state_dict_path is not None:
        state_dict = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    model = nets.build(name, state_dict, seed, spec=spec)
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    data = buffer.getvalue()

    out_dir.mkdir(parents=True, exist_ok=True)
    artifact = out_dir / f"{name}-{version}.pt"
    tmp = artifact.with_suffix(".pt.tmp")
    tmp.write_bytes(data)
    tmp.replace(artifact)

    # Goldens come from the artifact as written, so they test exactly what will be served.
    reloaded = torch.jit.load(  # type: ignore[no-untyped-call]
        io.BytesIO(data), map_location="cpu"
    ).eval()
    rng = np.random.default_rng(seed + 10_000)
    if training is not None:  # goldens from the data the model knows, inside its domain
        rows = rng.choice(
            training.shape[0], size=golden_count, replace=training.shape[0] < golden_count
        )
        inputs = np.ascontiguousarray(training[rows], dtype=np.float32)
    else:
        inputs = rng.standard_normal((golden_count, *spec.input_shape), dtype=np.float32)
    out = run_forward(reloaded, inputs)
    if not (np.isfinite(out.probabilities).all() and np.isfinite(out.value).all()):
        raise ValueError(
            f"{name}: the model gives non-finite outputs on its golden samples; refusing to "
            "export an artifact that cannot answer"
        )
    golden = [
        {
            "input": inputs[i].tolist(),
            "probabilities": out.probabilities[i].tolist(),
            "value": float(out.value[i]),
            "action": nets.ACTIONS[int(np.argmax(out.probabilities[i]))],
        }
        for i in range(golden_count)
    ]
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "artifact": artifact.name,
        "sha256": sha256_hex(data),
        "size_bytes": len(data),
        "format": "torchscript",
        "torch_version": torch.__version__,
        "exporter_version": __version__,
        "source": {"state_dict": str(state_dict_path)} if state_dict_path else {"seed": seed},
        "architecture": spec.architecture(),
        "input": {
            "shape": list(spec.input_shape),
            "dtype": "float32",
            "batch_dim": 0,
            "domain": domain_doc,
        },
        "output": {
            "actions": list(nets.ACTIONS),
            "probabilities": "softmax over the policy logits, shape (B, 3), order as actions",
            "value": "value head, shape (B,)",
            "confidence": "max of probabilities",
            "mc_dropout": "mean and std of probabilities and value over N dropout passes",
        },
        "golden": {"atol": atol, "samples": golden},
    }
    manifest_path = out_dir / f"{name}.manifest.json"
    write_json(manifest_path, manifest)
    log.info(
        "exported model",
        extra={
            "model": name,
            "version": version,
            "artifact": str(artifact),
            "sha256": manifest["sha256"],
        },
    )
    return manifest_path


def _parse_named_paths(option: str, items: list[str]) -> dict[str, Path]:
    result: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in nets.SPECS:
            raise SystemExit(f"{option} expects NAME=PATH with NAME in {sorted(nets.SPECS)}")
        result[name] = Path(path)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grandmodel-export", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("artifacts"), help="output folder")
    parser.add_argument(
        "--model",
        action="append",
        choices=sorted(nets.SPECS),
        help="model to export (repeatable; default: all)",
    )
    parser.add_argument("--version", default="1.0.0", help="model version for the manifest")
    parser.add_argument("--seed", type=int, default=0, help="init seed when no state_dict")
    parser.add_argument(
        "--state-dict",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="torch.save()d state_dict for a model (repeatable)",
    )
    parser.add_argument("--golden", type=int, default=4, help="golden samples per model")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="golden tolerance")
    parser.add_argument(
        "--training-data",
        action="append",
        default=[],
        metavar="NAME=PATH.npy",
        help="numpy.save()d training inputs (N, bars, features): the input domain and the "
        f"golden samples come from it (repeatable; default domain +-{DEFAULT_BOUND:g})",
    )
    parser.add_argument(
        "--domain-margin",
        type=float,
        default=DEFAULT_MARGIN,
        help="widen each training range by this fraction of its span on each side",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        help=f"trunk width (default: the shipped actor's; at most {MAX_HIDDEN})",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=0,
        help=f"extra trunk layers: a deeper, slower model (default 0; at most {MAX_DEPTH})",
    )
    args = parser.parse_args(argv)
    configure_logging("INFO")
    state_dicts = _parse_named_paths("--state-dict", args.state_dict)
    training = _parse_named_paths("--training-data", args.training_data)
    for name in args.model or sorted(nets.SPECS):
        try:
            path = export_model(
                name,
                args.out,
                version=args.version,
                seed=args.seed,
                state_dict_path=state_dicts.get(name),
                golden_count=args.golden,
                atol=args.atol,
                training_data_path=training.get(name),
                domain_margin=args.domain_margin,
                hidden=args.hidden,
                depth=args.depth,
            )
        except (DomainError, ValueError) as exc:
            log.error("export refused", extra={"model": name, "reason": str(exc)})
            print(f"grandmodel-export: {name}: {exc}", file=sys.stderr)
            return 2
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
