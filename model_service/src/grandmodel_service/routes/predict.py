"""The predict endpoints, as lean ASGI apps.

They sit on plain Starlette routes placed first in the router: FastAPI's per-request machinery
(dependency solving, telemetry, endpoint context) cost about a quarter of a single-sample
request, and these endpoints parse their bodies themselves anyway. No Request object, headers
read straight from the scope, the response written as two ASGI messages. Documentation-only
APIRoutes describe them in OpenAPI. Client errors raise ``RequestError``, which the app's
exception handler turns into a 4xx JSON answer.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from grandmodel_service.codec import RequestError, encode_binary, encode_json
from grandmodel_service.engine import BatchOutput
from grandmodel_service.metrics import PROBE_HEADER
from grandmodel_service.runtime import ModelSlot, Runtime
from grandmodel_service.schemas import ErrorResponse, PredictRequest, PredictResponse

log = logging.getLogger("grandmodel_service")

JSON_TYPES = frozenset({b"application/json"})
BINARY_TYPES = frozenset({b"application/octet-stream", b"application/x-grandmodel-f32"})
JSON_MEDIA = b"application/json"
_MC_VALUE = re.compile(rb'"mc_passes"\s*:\s*(\d+)')
BINARY_MEDIA = b"application/octet-stream"


async def predict_doc_endpoint(request: Request) -> Response:  # pragma: no cover
    """Stands in for ``PredictEndpoint`` in the OpenAPI document only."""
    raise NotImplementedError


class LabelledRoute(Route):
    """A Starlette route that, like FastAPI's, records itself in the scope for metrics."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


class PredictEndpoint:
    def __init__(self, slot: ModelSlot, runtime: Runtime) -> None:
        self.slot = slot
        self.runtime = runtime
        self.metrics = runtime.metrics
        self.max_body = runtime.settings.max_body_bytes
        self.shadow = runtime.shadow
        color = runtime.settings.color
        self.out_of_domain = runtime.metrics.out_of_domain.labels(slot.name, color)
        self.non_finite = runtime.metrics.non_finite_outputs.labels(slot.name, color)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = content_length = accept = shape = request_id = None
        probe = False
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                content_length = value
            elif name == b"accept":
                accept = value
            elif name == b"x-shape":
                shape = value
            elif name == b"x-request-id":
                request_id = value
            elif name == PROBE_HEADER:
                probe = bool(value)
        if request_id is None or not self.shadow.accepts(request_id):
            await self._serve(
                scope, receive, send, content_type, content_length, accept, shape, probe
            )
            return
        # Shadow comparison (routes through the front door's mirror carry X-Request-ID): remember
        # what this colour answered, errors included, for GET /admin/shadow.
        started = time.perf_counter()
        try:
            probabilities = await self._serve(
                scope, receive, send, content_type, content_length, accept, shape, probe
            )
        except RequestError as exc:
            self.shadow.add(request_id, self.slot.name, exc.status, started, None)
            raise
        except Exception:
            self.shadow.add(request_id, self.slot.name, 500, started, None)
            raise
        self.shadow.add(request_id, self.slot.name, 200, started, probabilities.copy())

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        content_type: bytes | None,
        content_length: bytes | None,
        accept: bytes | None,
        shape: bytes | None,
        probe: bool = False,
    ) -> Any:
        """Answer one predict request; returns the (B, 3) probabilities it sent.

        A probe (a release gate's own request, header X-GrandModel-Probe) is answered like any
        other; its rows stay out of the per-colour prediction statistics.
        """
        runtime, slot = self.runtime, self.slot
        if runtime.draining:
            raise RequestError(503, "draining", "service is draining; retry on another host")
        model, codec, batcher = slot.model, slot.codec, slot.batcher
        if model is None or codec is None or batcher is None:
            raise RequestError(503, "model_not_ready", slot.failure or "not loaded")
        media = (content_type or b"").partition(b";")[0].strip().lower()
        is_binary = media in BINARY_TYPES
        if not is_binary and media not in JSON_TYPES:
            raise RequestError(
                415,
                "unsupported_media_type",
                "Content-Type must be application/json or application/octet-stream, "
                f"got {media.decode('latin-1') or 'none'!r}",
            )
        body = await self._read_body(receive, content_length)
        lane = runtime.mc_lane
        if lane is not None and lane.full and self._asks_for_mc(body, scope["query_string"]):
            lane.refuse()  # before decoding: a flood of refused MC bodies costs next to nothing
        try:
            if is_binary:
                decoded = codec.decode_binary(body, shape.decode("latin-1") if shape else None)
            else:
                decoded = codec.decode_json(body)
        except RequestError as exc:
            if exc.reason == "input_out_of_domain":
                self.out_of_domain.inc()
            raise
        mc_passes = decoded.mc_passes
        if scope["query_string"] and mc_passes is None:
            values = parse_qs(scope["query_string"].decode("latin-1")).get("mc_passes")
            mc_passes = codec.parse_mc_query(values[-1] if values else None)
        inputs = decoded.inputs
        runtime.request_started()
        try:
            if mc_passes:
                codec.check_mc_samples(inputs.shape[0], mc_passes)
                output = await self._infer_mc(inputs, mc_passes)
            else:
                output = await batcher.submit(inputs, probe=probe)
        finally:
            runtime.request_finished()
        bad = output.first_non_finite()
        if bad is not None:
            self.non_finite.inc()
            log.warning(
                "model produced a non-finite output; refused",
                extra={"model": slot.name, "sample": bad, "samples": len(output)},
            )
            raise RequestError(
                422,
                "non_finite_output",
                f"the model produced a NaN or infinite output for sample {bad}; its inputs are "
                "within the declared domain but the model is not usable there",
            )
        headers: list[tuple[bytes, bytes]]
        if (accept is not None and BINARY_MEDIA in accept) or (
            is_binary and (accept is None or JSON_MEDIA not in accept)
        ):
            content, extra = encode_binary(output)
            headers = [(b"content-type", BINARY_MEDIA)]
            headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        else:
            content = encode_json(
                model.name, model.manifest.version, model.manifest.actions, output
            )
            headers = [(b"content-type", JSON_MEDIA)]
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        return output.probabilities

    @staticmethod
    def _asks_for_mc(body: bytes, query: bytes) -> bool:
        """Cheap look for a non-zero mc_passes (query or JSON key) without decoding the body."""
        if b"mc_passes" in query:
            return True  # the decoder words any error; a refusal here only needs a hint
        at = body.rfind(b'"mc_passes"')  # memmem from the end, where clients put it
        if at < 0:
            return False
        found = _MC_VALUE.match(body, at)
        return found is not None and int(found.group(1)) > 0

    async def _read_body(self, receive: Receive, content_length: bytes | None) -> bytes:
        limit = self.max_body
        if content_length is not None:
            if not content_length.isdigit():
                raise RequestError(400, "invalid_content_length", "bad Content-Length")
            if int(content_length) > limit:
                raise RequestError(413, "body_too_large", f"body exceeds {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "client_disconnected", "client went away")
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, "body_too_large", f"body exceeds {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _infer_mc(self, inputs: Any, mc_passes: int) -> BatchOutput:
        """MC requests run alone (their batch already is inputs x passes) in the MC lane."""
        model, lane = self.slot.model, self.runtime.mc_lane
        assert model is not None
        assert lane is not None
        started = time.perf_counter()
        try:
            output = await lane.run_mc(model, inputs, mc_passes)
        except RequestError:
            raise
        except Exception:
            self.metrics.inference_errors.labels(model.name).inc()
            raise
        self.metrics.observe_batch(
            model.name, inputs.shape[0] * mc_passes, time.perf_counter() - started
        )
        return output


def _doc_extras(max_mc_passes: int) -> tuple[dict[str, Any], dict[int | str, dict[str, Any]]]:
    body_doc = {
        "requestBody": {
            "required": True,
            "content": {
                JSON_MEDIA.decode(): {"schema": PredictRequest.model_json_schema()},
                BINARY_MEDIA.decode(): {
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
                "schema": {"type": "integer", "minimum": 0, "maximum": max_mc_passes},
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
        code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 429, 503)
    }
    return body_doc, error_docs


def mount_predict_routes(app: FastAPI, runtime: Runtime) -> list[APIRoute]:
    """Put the lean predict routes first in ``app``'s router; return their OpenAPI twins."""
    body_doc, error_docs = _doc_extras(runtime.settings.max_mc_passes)
    doc_routes: list[APIRoute] = []
    position = 0
    for name, slot in runtime.slots.items():
        endpoint = PredictEndpoint(slot, runtime)
        for path, summary in (
            (f"/v1/models/{name}/predict", f"Predict with the {name} actor"),
            (f"/api/{name}/process", f"Alias of /v1/models/{name}/predict"),
        ):
            app.router.routes.insert(position, LabelledRoute(path, endpoint, methods=["POST"]))
            position += 1
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
    return doc_routes
