"""Probes: liveness, readiness, version, Prometheus metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response

from grandmodel_service import __version__
from grandmodel_service.responses import json_response
from grandmodel_service.runtime import Runtime, get_runtime
from grandmodel_service.schemas import VersionResponse

router = APIRouter(tags=["probes"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


@router.get("/health", summary="Process is alive")
async def health() -> Response:
    return json_response(200, {"status": "alive"})


@router.get(
    "/ready",
    summary="Models loaded, verified, warmed; not draining",
    responses={503: {"description": "Not ready, with the reasons"}},
)
async def ready(runtime: RuntimeDep) -> Response:
    reasons = runtime.not_ready_reasons()
    if reasons:
        return json_response(503, {"status": "not_ready", "reasons": reasons})
    return json_response(200, {"status": "ready", "models": sorted(runtime.slots)})


@router.get("/version", response_model=VersionResponse)
async def version(runtime: RuntimeDep) -> Response:
    settings = runtime.settings
    models: dict[str, Any] = {}
    for name, slot in runtime.slots.items():
        model = slot.model
        models[name] = {
            "version": model.manifest.version if model else None,
            "sha256": model.manifest.sha256 if model else None,
            "ready": model is not None,
            "input_domain": model.domain.source if model else None,
        }
    return json_response(
        200,
        {
            "service_version": settings.service_version,
            "color": settings.color,
            "env": settings.env.value,
            "package_version": __version__,
            "models": models,
        },
    )


@router.get("/metrics", summary="Prometheus exposition")
async def prometheus(runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
