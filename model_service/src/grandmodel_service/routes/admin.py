"""Admin: drain and resume a colour, behind a bearer token."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from grandmodel_service.codec import RequestError
from grandmodel_service.responses import json_response
from grandmodel_service.runtime import Runtime, get_runtime
from grandmodel_service.schemas import DrainResponse, ErrorResponse

log = logging.getLogger("grandmodel_service")


def authorized_runtime(request: Request) -> Runtime:
    """Dependency: the runtime, once the bearer token is checked (401/403 otherwise)."""
    runtime = get_runtime(request)
    secret = runtime.settings.admin_token
    if secret is None:
        raise RequestError(403, "admin_disabled", "no GRANDMODEL_ADMIN_TOKEN configured")
    scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        supplied.strip().encode(), secret.get_secret_value().encode()
    ):
        raise RequestError(401, "unauthorized", "missing or wrong bearer token")
    return runtime


AdminDep = Annotated[Runtime, Depends(authorized_runtime)]
router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    responses={code: {"model": ErrorResponse} for code in (401, 403)},
)


def _status(runtime: Runtime) -> dict[str, Any]:
    return {
        "draining": runtime.draining,
        "in_flight": runtime.in_flight,
        "drained": runtime.draining and runtime.in_flight == 0,
    }


@router.post(
    "/drain",
    response_model=DrainResponse,
    summary="Stop accepting predictions; /ready answers 503; finish in-flight work",
)
async def drain(runtime: AdminDep, wait: bool = True) -> Response:
    if not runtime.draining:
        log.warning(
            "draining: new predictions are refused", extra={"color": runtime.settings.color}
        )
    runtime.draining = True
    runtime.refresh_ready_gauge()
    if wait:
        try:
            await asyncio.wait_for(runtime.idle.wait(), runtime.settings.drain_timeout_s)
        except TimeoutError:
            log.warning(
                "drain timed out with requests in flight", extra={"in_flight": runtime.in_flight}
            )
    return json_response(200, _status(runtime))


@router.post(
    "/resume", response_model=DrainResponse, summary="Undo a drain: accept predictions again"
)
async def resume(runtime: AdminDep) -> Response:
    if runtime.draining:
        log.warning(
            "resumed: predictions are accepted again", extra={"color": runtime.settings.color}
        )
    runtime.draining = False
    runtime.refresh_ready_gauge()
    return json_response(200, _status(runtime))


router.add_api_route(
    "/undrain",
    resume,
    methods=["POST"],
    response_model=DrainResponse,
    summary="Alias of /admin/resume",
)


@router.get("/status", response_model=DrainResponse)
async def status(runtime: AdminDep) -> Response:
    return json_response(200, _status(runtime))


@router.get(
    "/shadow",
    summary="The newest answers to requests that carried X-Request-ID (shadow comparison)",
)
async def shadow(
    runtime: AdminDep,
    limit: Annotated[int, Query(ge=1, le=1_000_000)] = 10_000,
    model: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9_-]{0,63}$")] = None,
) -> Response:
    ring = runtime.shadow
    if model is not None and model not in runtime.slots:
        raise RequestError(404, "unknown_model", f"this service serves {sorted(runtime.slots)}")
    records = ring.snapshot(min(limit, ring.capacity or 1), model)
    return json_response(
        200,
        {
            "color": runtime.settings.color,
            "service_version": runtime.settings.service_version,
            "capacity": ring.capacity,
            "recorded": ring.recorded,
            "size": len(ring.records),
            "records": records,
        },
    )
