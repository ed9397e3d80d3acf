"""The predict endpoints, as lean ASGI apps.

They sit on plain Starlette routes (see ``create_app``): no Request object, no FastAPI
dependency machinery, headers read straight from the scope, and the response written as two
ASGI messages. Client errors raise ``RequestError``, which the app's exception handler turns
into a 4xx JSON answer.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs

from fastapi import Request, Response
from starlette.types import Receive, Scope, Send

from grandmodel_service.batching import MicroBatcher
from grandmodel_service.codec import RequestError, encode_binary, encode_json
from grandmodel_service.engine import BatchOutput, LoadedModel
from grandmodel_service.runtime import ModelSlot, Runtime

JSON_TYPES = frozenset({b"application/json"})
BINARY_TYPES = frozenset({b"application/octet-stream", b"application/x-grandmodel-f32"})
JSON_MEDIA = b"application/json"
BINARY_MEDIA = b"application/octet-stream"


async def predict_doc_endpoint(request: Request) -> Response:  # pragma: no cover
    """Stands in for ``PredictEndpoint`` in the OpenAPI document only."""
    raise NotImplementedError


class PredictEndpoint:
    def __init__(self, slot: ModelSlot, runtime: Runtime) -> None:
        self.slot = slot
        self.runtime = runtime
        self.metrics = runtime.metrics
        self.max_body = runtime.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime, slot = self.runtime, self.slot
        if runtime.draining:
            raise RequestError(503, "draining", "service is draining; retry on another host")
        model, codec, batcher = slot.model, slot.codec, slot.batcher
        if model is None or codec is None or batcher is None:
            raise RequestError(503, "model_not_ready", slot.failure or "not loaded")
        content_type = content_length = accept = shape = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                content_length = value
            elif name == b"accept":
                accept = value
            elif name == b"x-shape":
                shape = value
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
        if is_binary:
            decoded = codec.decode_binary(body, shape.decode("latin-1") if shape else None)
        else:
            decoded = codec.decode_json(body)
        mc_passes = decoded.mc_passes
        if scope["query_string"] and mc_passes is None:
            values = parse_qs(scope["query_string"].decode("latin-1")).get("mc_passes")
            mc_passes = codec.parse_mc_query(values[-1] if values else None)
        runtime.request_started()
        try:
            output = await self._infer(model, batcher, decoded.inputs, mc_passes or 0)
        finally:
            runtime.request_finished()
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

    async def _infer(
        self, model: LoadedModel, batcher: MicroBatcher, inputs: Any, mc_passes: int
    ) -> BatchOutput:
        if mc_passes == 0:
            return await batcher.submit(inputs)
        # MC requests run alone: their batch is already inputs x passes.
        executor = self.runtime.executor
        assert executor is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            output = await loop.run_in_executor(executor, model.predict_mc, inputs, mc_passes)
        except Exception:
            self.metrics.inference_errors.labels(model.name).inc()
            raise
        self.metrics.observe_batch(model.name, inputs.shape[0] * mc_passes, loop.time() - started)
        return output
