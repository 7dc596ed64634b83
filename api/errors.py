"""Errors the API returns: a status code and a body that names the problem.

The body carries `code` and `message`, which Segment's libraries read and log, and, for invalid
input, `detail` with one entry per field in the shape FastAPI uses for validation errors.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from bisik.logs import get_logger

log = get_logger(__name__)


class ApiError(Exception):
    """An error returned to the caller as JSON with its status code."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        detail: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers

    def to_response(self) -> JSONResponse:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            body["detail"] = self.detail
        return JSONResponse(body, status_code=self.status_code, headers=self.headers)


def format_location(location: tuple[int | str, ...]) -> str:
    """Render a pydantic error location as a path: ("batch", 2, "userId") -> "batch[2].userId"."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path or "body"


def invalid_request(error: ValidationError, *, drop_union_tags: bool = False) -> ApiError:
    """Turn a pydantic ValidationError into a 400 that names each field and the rule it broke.

    With `drop_union_tags`, the call type that pydantic inserts into locations inside a
    discriminated union (`batch.2.track.event`) is left out (`batch[2].event`).
    """
    detail = []
    for item in error.errors(include_url=False, include_context=False, include_input=False):
        location = tuple(item["loc"])
        if drop_union_tags and len(location) >= 3 and isinstance(location[1], int):
            location = (location[0], location[1], *location[3:])
        detail.append({"loc": list(location), "msg": item["msg"], "type": item["type"]})
    summary = "; ".join(
        f"{format_location(tuple(entry['loc']))}: {entry['msg']}" for entry in detail[:5]
    )
    if len(detail) > 5:
        summary += f"; and {len(detail) - 5} more"
    return ApiError(400, "invalid_request", summary, detail=detail)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error.to_response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        detail = [
            {"loc": list(item["loc"]), "msg": item["msg"], "type": item["type"]}
            for item in error.errors()
        ]
        summary = "; ".join(f"{format_location(tuple(d['loc']))}: {d['msg']}" for d in detail[:5])
        return ApiError(400, "invalid_request", summary, detail=detail).to_response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return ApiError(error.status_code, code, str(error.detail), headers=error.headers).to_response()
