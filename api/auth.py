"""Write-key authentication, as Segment does it: HTTP Basic with the key as the user name, or
`writeKey` in the JSON body, which browsers can send without a CORS preflight (track.js does)."""

from __future__ import annotations

import base64
import binascii
import gzip
import hmac
import json
from typing import Annotated, Any

from fastapi import Depends, Request

from api.body import read_json_object
from api.errors import ApiError

UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Basic realm="bisik"'}
BODY_KEY_FIELD = "writeKey"


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers=UNAUTHORIZED_HEADERS)


async def authenticate_source(request: Request) -> str:
    """Return the source id of the write key in the Authorization header or in the body."""
    header = request.headers.get("authorization")
    if header:
        write_key = _basic_write_key(header)
    else:
        write_key = await _take_body_write_key(request)

    sources: dict[str, str] = request.app.state.settings.sources_by_write_key
    source = None
    for known_key, known_source in sources.items():
        # Compare every key in constant time, so the time taken does not reveal a near match.
        if hmac.compare_digest(known_key.encode(), write_key.encode()):
            source = known_source
    if source is None:
        raise _unauthorized("invalid write key")
    return source


def _basic_write_key(header: str) -> str:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise _unauthorized("the Authorization header must use the Basic scheme with the write key as user name")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _unauthorized("the Basic credentials are not valid base64") from None
    return decoded.partition(":")[0]


async def _take_body_write_key(request: Request) -> str:
    """Remove `writeKey` from the JSON body and return it; the route then reads the body without it.

    The key is removed so it is never stored with the call. A batch's calls may repeat the key,
    as some Segment libraries do, but may not name another one.
    """
    settings = request.app.state.settings
    limit = settings.max_batch_bytes if request.url.path.endswith("/batch") else settings.max_call_bytes
    body = await read_json_object(request, limit)
    write_key = body.pop(BODY_KEY_FIELD, None)
    if write_key is None:
        raise _unauthorized("missing write key: send it as the HTTP Basic user name or as writeKey in the JSON body")
    if not isinstance(write_key, str):
        raise _unauthorized(f"{BODY_KEY_FIELD}: must be a string, got {type(write_key).__name__}")

    calls = body.get("batch")
    for position, call in enumerate(calls if isinstance(calls, list) else []):
        if not isinstance(call, dict) or BODY_KEY_FIELD not in call:
            continue
        if call.pop(BODY_KEY_FIELD) != write_key:
            raise _unauthorized(
                f"batch[{position}].{BODY_KEY_FIELD}: differs from the batch's {BODY_KEY_FIELD}; "
                "send one batch per write key"
            )

    _replace_body(request, body)
    return write_key


def _replace_body(request: Request, body: dict[str, Any]) -> None:
    """Make the route read `body` instead of the stream this dependency has consumed.

    Starlette's Request caches the body it has read in `_body` and serves later reads from it;
    FastAPI hands this same Request object to the route. The body keeps its Content-Encoding,
    so the route decodes it exactly as it would have decoded the original.
    """
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if request.headers.get("content-encoding", "identity").lower() == "gzip":
        raw = gzip.compress(raw)
    request._body = raw  # noqa: SLF001


Source = Annotated[str, Depends(authenticate_source)]
