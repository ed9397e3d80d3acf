"""The FastAPI application: ``create_app(settings)`` wires the runtime to the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi

from grandmodel_service.codec import RequestError
from grandmodel_service.docs import DOCS_CSP, docs_html
from grandmodel_service.metrics import Metrics, MetricsMiddleware
from grandmodel_service.responses import json_response
from grandmodel_service.routes import admin, probes
from grandmodel_service.routes.predict import mount_predict_routes
from grandmodel_service.runtime import Runtime
from grandmodel_service.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    """Build the service. Models load in the lifespan, never at import or here."""
    runtime = Runtime(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="GrandModel inference service",
        version=settings.service_version,
        description="Strategic (48x13) and tactical (60x7) MAPPO actors.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads its assets from a CDN: blank offline
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> Response:
        runtime.metrics.rejected.labels(exc.reason).inc()
        return json_response(exc.status, {"error": exc.reason, "detail": exc.detail}, exc.headers)

    app.include_router(probes.router)
    app.include_router(admin.router)
    doc_routes = mount_predict_routes(app, runtime)

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

    if settings.docs_enabled:
        page = docs_html(app.title)

        @app.get("/docs", include_in_schema=False)
        async def docs() -> Response:
            return Response(
                page,
                media_type="text/html; charset=utf-8",
                headers={"content-security-policy": DOCS_CSP},
            )

    return app
