"""Reading a JSON request body within a byte limit, gzip included."""

from __future__ import annotations

import json
import zlib
from typing import Any

from fastapi import Request

from api.errors import ApiError

# Deeper bodies are refused: storing one would exhaust the serializers' recursion limits (a 500
# that Segment's clients retry forever), and no tracking call needs that many levels.
MAX_DEPTH = 64


def too_large(what: str, size: int | str, limit: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"{what} is {size} bytes; the limit is {limit} bytes",
    )


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """Return the body as a JSON object, rejecting it past `limit` bytes before reading it all.

    The limit applies to the decompressed body when it is sent with `Content-Encoding: gzip`.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large("the request body", int(declared), limit)

    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large("the request body", f"more than {limit}", limit)
        chunks.append(chunk)
    raw = b"".join(chunks)

    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding == "gzip":
        raw = _gunzip(raw, limit)
    elif encoding != "identity":
        raise ApiError(
            415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported; use gzip"
        )

    try:
        # JSON exchanged between systems must be UTF-8 (RFC 8259); json.loads would also guess UTF-16/32.
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "the request body is not UTF-8 text") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as error:
        raise ApiError(
            400,
            "invalid_json",
            f"the request body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}",
        ) from None
    if not isinstance(body, dict):
        raise ApiError(
            400, "invalid_request", f"the request body must be a JSON object, got {type(body).__name__}"
        )
    if _depth(body) > MAX_DEPTH:
        raise ApiError(400, "invalid_json", f"the request body nests deeper than {MAX_DEPTH} levels")
    return body


def _depth(value: Any) -> int:
    """Return how deeply `value` nests objects and arrays, without recursion."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            items = item.values()
        elif isinstance(item, list):
            items = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        pending.extend((child, depth + 1) for child in items)
    return deepest


def _gunzip(raw: bytes, limit: int) -> bytes:
    decompressor = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    try:
        data = decompressor.decompress(raw, limit + 1)
    except zlib.error:
        raise ApiError(400, "invalid_gzip", "the request body is not valid gzip data") from None
    if len(data) > limit or decompressor.unconsumed_tail:
        raise too_large("the decompressed request body", f"more than {limit}", limit)
    return data
