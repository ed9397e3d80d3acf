"""``grandmodel-export``: build TorchScript artifacts and their manifests."""

from __future__ import annotations

import argparse
import io
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grandmodel_service import __version__, nets
from grandmodel_service.engine import run_forward
from grandmodel_service.logs import configure_logging
from grandmodel_service.manifest import FORMAT_VERSION, sha256_hex, write_json

log = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-5


def export_model(
    name: str,
    out_dir: Path,
    *,
    version: str = "1.0.0",
    seed: int = 0,
    state_dict_path: Path | None = None,
    golden_count: int = 4,
    atol: float = DEFAULT_ATOL,
) -> Path:
    """Write ``<name>-<version>.pt`` and ``<name>.manifest.json`` into ``out_dir``."""
    if name not in nets.SPECS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(nets.SPECS)}")
    spec = nets.SPECS[name]
    state_dict = None
    if state_dict_path is not None:
        state_dict = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    model = nets.build(name, state_dict, seed)
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
    inputs = rng.standard_normal((golden_count, *spec.input_shape), dtype=np.float32)
    out = run_forward(reloaded, inputs)
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
        "input": {"shape": list(spec.input_shape), "dtype": "float32", "batch_dim": 0},
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


def _parse_state_dicts(items: list[str]) -> dict[str, Path]:
    result: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in nets.SPECS:
            raise SystemExit(f"--state-dict expects NAME=PATH with NAME in {sorted(nets.SPECS)}")
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
    args = parser.parse_args(argv)
    configure_logging("INFO")
    state_dicts = _parse_state_dicts(args.state_dict)
    for name in args.model or sorted(nets.SPECS):
        path = export_model(
            name,
            args.out,
            version=args.version,
            seed=args.seed,
            state_dict_path=state_dicts.get(name),
            golden_count=args.golden,
            atol=args.atol,
        )
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
