"""Write-key authentication, as Segment does it: HTTP Basic with the key as the user name."""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Annotated

from fastapi import Depends, Request

from api.errors import ApiError

UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Basic realm="bisik"'}


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers=UNAUTHORIZED_HEADERS)


def authenticate_source(request: Request) -> str:
    """Return the source id of the write key in the Authorization header."""
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing write key: send it as the HTTP Basic user name")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise _unauthorized("the Authorization header must use the Basic scheme with the write key as user name")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _unauthorized("the Basic credentials are not valid base64") from None
    write_key = decoded.partition(":")[0]

    sources: dict[str, str] = request.app.state.settings.sources_by_write_key
    source = None
    for known_key, known_source in sources.items():
        # Compare every key in constant time, so the time taken does not reveal a near match.
        if hmac.compare_digest(known_key.encode(), write_key.encode()):
            source = known_source
    if source is None:
        raise _unauthorized("invalid write key")
    return source


Source = Annotated[str, Depends(authenticate_source)]
