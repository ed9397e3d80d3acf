"""The FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
import torch
from fastapi import FastAPI, Request, Response

from grandmodel_service import __version__
from grandmodel_service.batching import MicroBatcher
from grandmodel_service.codec import InputCodec, RequestError, encode_binary, encode_json
from grandmodel_service.engine import BatchOutput, LoadedModel, ModelLoadError, load_model
from grandmodel_service.metrics import Metrics, MetricsMiddleware
from grandmodel_service.schemas import (
    DrainResponse,
    ErrorResponse,
    PredictRequest,
    PredictResponse,
    VersionResponse,
)
from grandmodel_service.settings import Settings

log = logging.getLogger("grandmodel_service")

JSON_TYPES = frozenset({"application/json"})
BINARY_TYPES = frozenset({"application/octet-stream", "application/x-grandmodel-f32"})
JSON_MEDIA = "application/json"
BINARY_MEDIA = "application/octet-stream"


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


def _json(status: int, content: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status, headers, media_type=JSON_MEDIA)


def _configure_torch(settings: Settings) -> None:
    torch.set_num_threads(settings.torch_threads)
    # Inter-op threads can be set only once per process, before any inter-op work.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(settings.torch_interop_threads)


async def _load_slot(runtime: Runtime, slot: ModelSlot) -> None:
    settings = runtime.settings
    path = settings.manifest_path(slot.name)
    loop = asyncio.get_running_loop()
    assert runtime.executor is not None
    started = time.perf_counter()
    try:
        model = await loop.run_in_executor(
            runtime.executor,
            partial(
                load_model, path, slot.name, atol_override=settings.golden_atol,
                warmup_iterations=settings.warmup_iterations,
                warmup_batch=min(settings.batch_max_size, 256),
            ),
        )
    except ModelLoadError as exc:
        slot.failure = f"refused: {exc}"
        log.error("model refused; service stays not ready",
                  extra={"model": slot.name, "manifest": str(path), "reason": str(exc)})
        return
    metrics = runtime.metrics
    slot.model = model
    slot.codec = InputCodec(model.input_shape, settings.max_request_samples,
                            settings.max_mc_passes)
    errors = metrics.inference_errors.labels(slot.name)
    slot.batcher = MicroBatcher(
        model.predict, runtime.executor,
        max_batch_size=settings.batch_max_size,
        max_wait_s=settings.batch_max_wait_ms / 1000,
        on_batch=partial(metrics.observe_batch, slot.name),
        on_error=lambda _exc: errors.inc(),
    )
    slot.batcher.start()
    slot.failure = None
    metrics.model_info.labels(
        slot.name, model.manifest.version, model.manifest.sha256, settings.service_version,
        settings.color,
    ).set(1)
    log.info("model loaded, verified and warmed up", extra={
        "model": slot.name, "version": model.manifest.version, "sha256": model.manifest.sha256,
        "seconds": round(time.perf_counter() - started, 3)})


def create_app(settings: Settings) -> FastAPI:
    """Build the service. Models load in the lifespan, never at import or here."""
    metrics = Metrics()
    runtime = Runtime(settings=settings, metrics=metrics)
    runtime.slots = {name: ModelSlot(name) for name in settings.models}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _configure_torch(settings)
        runtime.idle = asyncio.Event()
        runtime.idle.set()
        runtime.executor = ThreadPoolExecutor(settings.inference_workers,
                                              thread_name_prefix="inference")
        for slot in runtime.slots.values():
            await _load_slot(runtime, slot)
        runtime.started = True
        runtime.refresh_ready_gauge()
        log.info("service started", extra={
            "color": settings.color, "env": settings.env.value,
            "service_version": settings.service_version,
            "not_ready": runtime.not_ready_reasons() or None})
        try:
            yield
        finally:
            # uvicorn has already stopped accepting and waited for in-flight requests.
            runtime.draining = True
            runtime.refresh_ready_gauge()
            for slot in runtime.slots.values():
                if slot.batcher is not None:
                    await slot.batcher.stop()
            runtime.executor.shutdown(wait=True)
            log.info("service stopped", extra={"color": settings.color})

    app = FastAPI(
        title="GrandModel inference service",
        version=settings.service_version,
        description="Strategic (48x13) and tactical (60x7) MAPPO actors.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> Response:
        metrics.rejected.labels(exc.reason).inc()
        return _json(exc.status, {"error": exc.reason, "detail": exc.detail})

    # -- probes -------------------------------------------------------------------------
    @app.get("/health", tags=["probes"], summary="Process is alive")
    async def health() -> Response:
        return _json(200, {"status": "alive"})

    @app.get("/ready", tags=["probes"], summary="Models loaded, verified, warmed; not draining",
             responses={503: {"description": "Not ready, with the reasons"}})
    async def ready() -> Response:
        reasons = runtime.not_ready_reasons()
        if reasons:
            return _json(503, {"status": "not_ready", "reasons": reasons})
        return _json(200, {"status": "ready", "models": sorted(runtime.slots)})

    @app.get("/version", tags=["probes"], response_model=VersionResponse)
    async def version() -> Response:
        models: dict[str, Any] = {}
        for name, slot in runtime.slots.items():
            manifest = slot.model.manifest if slot.model else None
            models[name] = {
                "version": manifest.version if manifest else None,
                "sha256": manifest.sha256 if manifest else None,
                "ready": slot.model is not None,
            }
        return _json(200, {"service_version": settings.service_version, "color": settings.color,
                           "env": settings.env.value, "package_version": __version__,
                           "models": models})

    @app.get("/metrics", tags=["probes"], summary="Prometheus exposition")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- predictions --------------------------------------------------------------------
    max_body = settings.max_body_bytes

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise RequestError(400, "invalid_content_length", "bad Content-Length")
            if int(length) > max_body:
                raise RequestError(413, "body_too_large", f"body exceeds {max_body} bytes")
            return await request.body()
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise RequestError(413, "body_too_large", f"body exceeds {max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def make_predict(slot: ModelSlot) -> Callable[[Request], Awaitable[Response]]:
        async def predict(request: Request) -> Response:
            if runtime.draining:
                raise RequestError(503, "draining", "service is draining; retry on another host")
            model, codec, batcher = slot.model, slot.codec, slot.batcher
            if model is None or codec is None or batcher is None:
                raise RequestError(503, "model_not_ready", slot.failure or "not loaded")
            content_type = request.headers.get("content-type", "").partition(";")[0].strip()
            content_type = content_type.lower()
            is_binary = content_type in BINARY_TYPES
            if not is_binary and content_type not in JSON_TYPES:
                raise RequestError(
                    415, "unsupported_media_type",
                    f"Content-Type must be application/json or {BINARY_MEDIA}, "
                    f"got {content_type or 'none'!r}",
                )
            body = await read_body(request)
            if is_binary:
                decoded = codec.decode_binary(body, request.headers.get("x-shape"))
            else:
                decoded = codec.decode_json(body)
            mc_passes = decoded.mc_passes
            if request.scope["query_string"]:
                query = codec.parse_mc_query(request.query_params.get("mc_passes"))
                mc_passes = mc_passes if mc_passes is not None else query
            runtime.in_flight += 1
            metrics.inflight.inc()
            runtime.idle.clear()
            try:
                output = await _infer(model, batcher, decoded.inputs, mc_passes or 0)
            finally:
                runtime.in_flight -= 1
                metrics.inflight.dec()
                if runtime.in_flight == 0:
                    runtime.idle.set()
            accept = request.headers.get("accept", "")
            if BINARY_MEDIA in accept or (is_binary and JSON_MEDIA not in accept):
                content, headers = encode_binary(output)
                return Response(content, 200, headers, media_type=BINARY_MEDIA)
            content = encode_json(model.name, model.manifest.version, model.manifest.actions,
                                  output)
            return Response(content, 200, media_type=JSON_MEDIA)

        async def _infer(
            model: LoadedModel, batcher: MicroBatcher, inputs: Any, mc_passes: int
        ) -> BatchOutput:
            if mc_passes == 0:
                return await batcher.submit(inputs)
            # MC requests run alone: their batch is inputs x passes already.
            assert runtime.executor is not None
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                output = await loop.run_in_executor(
                    runtime.executor, model.predict_mc, inputs, mc_passes
                )
            except Exception:
                metrics.inference_errors.labels(model.name).inc()
                raise
            metrics.observe_batch(model.name, inputs.shape[0] * mc_passes,
                                  loop.time() - started)
            return output

        return predict

    body_doc = {
        "requestBody": {
            "required": True,
            "content": {
                JSON_MEDIA: {"schema": PredictRequest.model_json_schema()},
                BINARY_MEDIA: {"schema": {
                    "type": "string", "format": "binary",
                    "description": "little-endian float32, C order; X-Shape header B,bars,features",
                }},
            },
        },
        "parameters": [
            {"name": "mc_passes", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 0, "maximum": settings.max_mc_passes}},
            {"name": "X-Shape", "in": "header", "required": False,
             "schema": {"type": "string"}, "description": "binary bodies: B,bars,features"},
        ],
    }
    error_docs: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503)
    }
    for name, slot in runtime.slots.items():
        endpoint = make_predict(slot)
        common: dict[str, Any] = {
            "methods": ["POST"], "response_model": PredictResponse, "responses": error_docs,
            "openapi_extra": body_doc, "tags": ["predict"],
        }
        app.add_api_route(f"/v1/models/{name}/predict", endpoint,
                          summary=f"Predict with the {name} actor", **common)
        app.add_api_route(f"/api/{name}/process", endpoint,
                          summary=f"Alias of /v1/models/{name}/predict", **common)

    # -- admin --------------------------------------------------------------------------
    token = settings.admin_token.get_secret_value() if settings.admin_token else None

    def authorize(request: Request) -> None:
        if token is None:
            raise RequestError(403, "admin_disabled", "no GRANDMODEL_ADMIN_TOKEN configured")
        scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            supplied.strip().encode(), token.encode()
        ):
            raise RequestError(401, "unauthorized", "missing or wrong bearer token")

    def admin_status() -> dict[str, Any]:
        return {"draining": runtime.draining, "in_flight": runtime.in_flight,
                "drained": runtime.draining and runtime.in_flight == 0}

    admin_docs: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (401, 403)
    }

    @app.post("/admin/drain", tags=["admin"], response_model=DrainResponse, responses=admin_docs,
              summary="Stop accepting predictions; /ready answers 503; finish in-flight work")
    async def drain(request: Request, wait: bool = True) -> Response:
        authorize(request)
        if not runtime.draining:
            log.warning("draining: new predictions are refused", extra={"color": settings.color})
        runtime.draining = True
        runtime.refresh_ready_gauge()
        if wait:
            try:
                await asyncio.wait_for(runtime.idle.wait(), settings.drain_timeout_s)
            except TimeoutError:
                log.warning("drain timed out with requests in flight",
                            extra={"in_flight": runtime.in_flight})
        return _json(200, admin_status())

    @app.post("/admin/resume", tags=["admin"], response_model=DrainResponse,
              responses=admin_docs, summary="Undo a drain: accept predictions again")
    async def resume(request: Request) -> Response:
        authorize(request)
        if runtime.draining:
            log.warning("resumed: predictions are accepted again", extra={"color": settings.color})
        runtime.draining = False
        runtime.refresh_ready_gauge()
        return _json(200, admin_status())

    app.add_api_route("/admin/undrain", resume, methods=["POST"], tags=["admin"],
                      response_model=DrainResponse, responses=admin_docs,
                      summary="Alias of /admin/resume")

    @app.get("/admin/status", tags=["admin"], response_model=DrainResponse, responses=admin_docs)
    async def status(request: Request) -> Response:
        authorize(request)
        return _json(200, admin_status())

    return app
