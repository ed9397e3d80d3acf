"""The FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import orjson
import torch
from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.routing import Match, Route
from starlette.types import Scope

from grandmodel_service import __version__
from grandmodel_service.batching import MicroBatcher
from grandmodel_service.codec import InputCodec, RequestError
from grandmodel_service.engine import ModelLoadError, load_model
from grandmodel_service.metrics import Metrics, MetricsMiddleware
from grandmodel_service.predict import PredictEndpoint, predict_doc_endpoint
from grandmodel_service.runtime import ModelSlot, Runtime
from grandmodel_service.schemas import (
    DrainResponse,
    ErrorResponse,
    PredictRequest,
    PredictResponse,
    VersionResponse,
)
from grandmodel_service.settings import Settings

log = logging.getLogger("grandmodel_service")

JSON_MEDIA = "application/json"
BINARY_MEDIA = "application/octet-stream"


class _LabelledRoute(Route):
    """A Starlette route that, like FastAPI's, records itself in the scope for metrics."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def _json(status: int, content: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status, headers, media_type=JSON_MEDIA)


def _configure_torch(settings: Settings) -> None:
    torch.set_num_threads(settings.torch_threads)
    # The TorchScript profiling executor re-specialises the graph for new input shapes;
    # with micro-batching every batch size is a new shape, which cost up to 5 ms per
    # recompilation (measured). Small MLPs gain nothing from its fusions, so run unoptimised.
    torch._C._set_graph_executor_optimize(False)
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
                load_model,
                path,
                slot.name,
                atol_override=settings.golden_atol,
                warmup_iterations=settings.warmup_iterations,
                warmup_batch=min(settings.batch_max_size, 256),
            ),
        )
    except ModelLoadError as exc:
        slot.failure = f"refused: {exc}"
        log.error(
            "model refused; service stays not ready",
            extra={"model": slot.name, "manifest": str(path), "reason": str(exc)},
        )
        return
    metrics = runtime.metrics
    slot.model = model
    slot.codec = InputCodec(model.input_shape, settings.max_request_samples, settings.max_mc_passes)
    errors = metrics.inference_errors.labels(slot.name)
    slot.batcher = MicroBatcher(
        model.predict,
        runtime.executor,
        max_batch_size=settings.batch_max_size,
        max_wait_s=settings.batch_max_wait_ms / 1000,
        arrival_gap_s=settings.batch_arrival_gap_ms / 1000,
        on_batch=partial(metrics.observe_batch, slot.name),
        on_error=lambda _exc: errors.inc(),
    )
    slot.batcher.start()
    slot.failure = None
    metrics.model_info.labels(
        slot.name,
        model.manifest.version,
        model.manifest.sha256,
        settings.service_version,
        settings.color,
    ).set(1)
    log.info(
        "model loaded, verified and warmed up",
        extra={
            "model": slot.name,
            "version": model.manifest.version,
            "sha256": model.manifest.sha256,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )


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
        runtime.executor = ThreadPoolExecutor(
            settings.inference_workers, thread_name_prefix="inference"
        )
        for slot in runtime.slots.values():
            await _load_slot(runtime, slot)
        # torch, FastAPI and pydantic leave ~200k long-lived objects; a full collection that
        # walks them takes 50-300 ms (measured) and lands on some unlucky request. Freeze
        # them out of the collector's view once they exist.
        gc.collect()
        gc.freeze()
        runtime.started = True
        runtime.refresh_ready_gauge()
        log.info(
            "service started",
            extra={
                "color": settings.color,
                "env": settings.env.value,
                "service_version": settings.service_version,
                "not_ready": runtime.not_ready_reasons() or None,
            },
        )
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

    @app.get(
        "/ready",
        tags=["probes"],
        summary="Models loaded, verified, warmed; not draining",
        responses={503: {"description": "Not ready, with the reasons"}},
    )
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
        return _json(
            200,
            {
                "service_version": settings.service_version,
                "color": settings.color,
                "env": settings.env.value,
                "package_version": __version__,
                "models": models,
            },
        )

    @app.get("/metrics", tags=["probes"], summary="Prometheus exposition")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- predictions --------------------------------------------------------------------
    body_doc = {
        "requestBody": {
            "required": True,
            "content": {
                JSON_MEDIA: {"schema": PredictRequest.model_json_schema()},
                BINARY_MEDIA: {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": "float32 little-endian, C order; X-Shape: B,bars,features",
                    }
                },
            },
        },
        "parameters": [
            {
                "name": "mc_passes",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 0, "maximum": settings.max_mc_passes},
            },
            {
                "name": "X-Shape",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "binary bodies: B,bars,features",
            },
        ],
    }
    error_docs: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503)
    }
    # The predict endpoints are served by plain Starlette routes placed first in the router:
    # FastAPI's per-request machinery (dependency solving, telemetry, endpoint context)
    # costs about a quarter of a single-sample request, and these endpoints parse their
    # bodies themselves anyway. Matching APIRoutes exist only to document them in OpenAPI.
    doc_routes: list[APIRoute] = []
    for index, (name, slot) in enumerate(runtime.slots.items()):
        endpoint = PredictEndpoint(slot, runtime)
        for position, (path, summary) in enumerate(
            (
                (f"/v1/models/{name}/predict", f"Predict with the {name} actor"),
                (f"/api/{name}/process", f"Alias of /v1/models/{name}/predict"),
            )
        ):
            app.router.routes.insert(
                2 * index + position, _LabelledRoute(path, endpoint, methods=["POST"])
            )
            doc_routes.append(
                APIRoute(
                    path,
                    predict_doc_endpoint,
                    methods=["POST"],
                    response_model=PredictResponse,
                    responses=error_docs,
                    openapi_extra=body_doc,
                    tags=["predict"],
                    summary=summary,
                )
            )

    def openapi_with_predict_routes() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=[*doc_routes, *app.routes],
            )
        return app.openapi_schema

    app.openapi = openapi_with_predict_routes  # type: ignore[method-assign]

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
        return {
            "draining": runtime.draining,
            "in_flight": runtime.in_flight,
            "drained": runtime.draining and runtime.in_flight == 0,
        }

    admin_docs: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (401, 403)
    }

    @app.post(
        "/admin/drain",
        tags=["admin"],
        response_model=DrainResponse,
        responses=admin_docs,
        summary="Stop accepting predictions; /ready answers 503; finish in-flight work",
    )
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
                log.warning(
                    "drain timed out with requests in flight",
                    extra={"in_flight": runtime.in_flight},
                )
        return _json(200, admin_status())

    @app.post(
        "/admin/resume",
        tags=["admin"],
        response_model=DrainResponse,
        responses=admin_docs,
        summary="Undo a drain: accept predictions again",
    )
    async def resume(request: Request) -> Response:
        authorize(request)
        if runtime.draining:
            log.warning("resumed: predictions are accepted again", extra={"color": settings.color})
        runtime.draining = False
        runtime.refresh_ready_gauge()
        return _json(200, admin_status())

    app.add_api_route(
        "/admin/undrain",
        resume,
        methods=["POST"],
        tags=["admin"],
        response_model=DrainResponse,
        responses=admin_docs,
        summary="Alias of /admin/resume",
    )

    @app.get("/admin/status", tags=["admin"], response_model=DrainResponse, responses=admin_docs)
    async def status(request: Request) -> Response:
        authorize(request)
        return _json(200, admin_status())

    return app
