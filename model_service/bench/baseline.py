"""The baselines the benchmark compares against (benchmark tooling, not in the service wheel).

- **naive**: what a first FastAPI endpoint for the same model usually looks like: a pydantic
  body of nested float lists, a synchronous endpoint (so FastAPI runs it in its thread pool),
  one eager forward pass per request with no batching, FastAPI's standard JSON response.
- **plain**: a competent plain FastAPI route: the raw body parsed by orjson, ``np.asarray``
  into float32, ``torch.from_numpy``, the TorchScript artifact under ``inference_mode``, the
  answer encoded by orjson. No batching, no custom codec.
- **trivial**: ``GET /`` answering a constant: the framework's ceiling.

Every one runs with the service's own settings: same weights, one torch thread, the same
uvicorn configuration (uvloop, httptools, no access log, the same connection guard).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel

from grandmodel_service import nets
from grandmodel_service.connections import guarded_protocol
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


def create_plain_app(manifest_path: Path) -> FastAPI:
    manifest = Manifest.read(manifest_path)
    module = torch.jit.load(  # type: ignore[no-untyped-call]
        io.BytesIO(manifest.artifact_path.read_bytes()), map_location="cpu"
    ).eval()
    app = FastAPI(title="plain orjson baseline")

    @app.post(f"/v1/models/{manifest.name}/predict")
    async def predict(request: Request) -> Response:
        x = np.asarray(orjson.loads(await request.body())["inputs"], dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        with torch.inference_mode():
            logits, value = module(torch.from_numpy(x))
            probabilities = torch.softmax(logits, dim=-1).numpy()
        actions = probabilities.argmax(axis=1).tolist()
        body = {
            "model": manifest.name,
            "version": manifest.version,
            "predictions": [
                {
                    "action": nets.ACTIONS[a],
                    "confidence": p[a],
                    "probabilities": p,
                    "value": v,
                }
                for a, p, v in zip(actions, probabilities, value.numpy(), strict=True)
            ],
        }
        return Response(
            orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
        )

    return app


def create_trivial_app() -> FastAPI:
    app = FastAPI(title="trivial")

    @app.get("/")
    async def trivial() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return app


def serve(app: FastAPI, port: int) -> None:
    """The service's uvicorn settings (server.main), so only the application differs."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=guarded_protocol(header_timeout_s=5.0, body_timeout_s=10.0, on_close=lambda _r: None),
        lifespan="on",
        log_level="warning",
        access_log=False,
        limit_concurrency=512,
        timeout_keep_alive=75,
        backlog=2048,
        server_header=False,
    )
    uvicorn.Server(config).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baseline.py", description=__doc__)
    parser.add_argument("kind", choices=["naive", "plain", "trivial"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--manifest", type=Path, help="the model (naive and plain)")
    parser.add_argument("--cpu", type=int, help="pin to this CPU")
    args = parser.parse_args(argv)
    # The service's thread settings: one intra-op and one inter-op thread, graph executor off.
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch._C._set_graph_executor_optimize(False)
    if args.cpu is not None:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), {args.cpu})
    if args.kind == "trivial":
        app = create_trivial_app()
    elif args.manifest is None:
        parser.error(f"{args.kind} needs --manifest")
    else:
        app = (create_naive_app if args.kind == "naive" else create_plain_app)(args.manifest)
    serve(app, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
