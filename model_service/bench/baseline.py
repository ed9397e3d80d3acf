"""The naive baseline the benchmark compares against, and a bare trivial FastAPI app.

The baseline is what a first FastAPI endpoint for the same model usually looks like: a
pydantic body of nested float lists, a synchronous endpoint (so FastAPI runs it in its thread
pool), one eager forward pass per request with no batching, torch's default thread settings,
and FastAPI's standard JSON response. Same weights as the artifact, same uvicorn server.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from grandmodel_service import nets
from grandmodel_service.manifest import Manifest


class NaiveRequest(BaseModel):
    inputs: list[list[float]] | list[list[list[float]]]


def create_naive_app(manifest_path: Path) -> FastAPI:
    manifest = Manifest.read(manifest_path)
    scripted = torch.jit.load(  # type: ignore[no-untyped-call]
        io.BytesIO(manifest.artifact_path.read_bytes())
    )
    model = nets.build(manifest.name, dict(scripted.state_dict()))
    app = FastAPI(title="naive baseline")

    @app.post(f"/v1/models/{manifest.name}/predict")
    def predict(request: NaiveRequest) -> dict[str, Any]:
        x = torch.tensor(request.inputs, dtype=torch.float32)
        if x.dim() == 2:
            x = x.unsqueeze(0)
        with torch.no_grad():
            logits, value = model(x)
            probabilities = torch.softmax(logits, dim=-1)
        return {
            "model": manifest.name,
            "version": manifest.version,
            "predictions": [
                {
                    "action": nets.ACTIONS[int(p.argmax())],
                    "confidence": float(p.max()),
                    "probabilities": p.tolist(),
                    "value": float(v),
                }
                for p, v in zip(probabilities, value, strict=True)
            ],
        }

    return app


def create_trivial_app() -> FastAPI:
    app = FastAPI(title="trivial")

    @app.get("/")
    async def trivial() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grandmodel_service.baseline", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--manifest", type=Path, help="serve the naive baseline of this model")
    parser.add_argument("--trivial", action="store_true", help="serve the bare trivial app")
    parser.add_argument("--cpu", type=int, help="pin to this CPU")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), {args.cpu})
    if args.trivial:
        app = create_trivial_app()
    elif args.manifest:
        app = create_naive_app(args.manifest)
    else:
        parser.error("--manifest or --trivial is required")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
