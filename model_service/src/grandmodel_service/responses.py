"""Small response helpers shared by the routes."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Response

JSON_MEDIA = "application/json"


def json_response(
    status: int, content: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(content), status, headers, media_type=JSON_MEDIA)
