"""Segment's HTTP tracking API: `/v1/track`, `/v1/identify`, `/v1/page`, `/v1/screen`,
`/v1/group`, `/v1/alias` and `/v1/batch`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError

from activities.ingest import EventStore, StoreResult
from api.auth import Source
from api.body import read_json_object, too_large
from api.errors import ApiError, invalid_request
from api.segment import CALL_MODELS, BatchRequest, to_incoming_event
from bisik.logs import get_logger

log = get_logger(__name__)

router = APIRouter(prefix="/v1", tags=["ingest"])


def _event_store(request: Request) -> EventStore:
    return request.app.state.event_store


def _response(result: StoreResult) -> dict[str, Any]:
    # `success` is what Segment's API returns; the counts help whoever reads the response.
    return {"success": True, "stored": result.stored, "duplicates": result.duplicates}


async def _ingest_call(request: Request, source: str, call_type: str) -> dict[str, Any]:
    settings = request.app.state.settings
    body = await read_json_object(request, settings.max_call_bytes)
    given_type = body.setdefault("type", call_type)
    if given_type != call_type:
        raise ApiError(
            400, "invalid_request", f"type: must be {call_type!r} on /v1/{call_type}, got {given_type!r}"
        )
    try:
        call = CALL_MODELS[call_type].model_validate(body)
    except ValidationError as error:
        raise invalid_request(error) from None

    event = to_incoming_event(call, source=source, received_at=datetime.now(UTC))
    result = await _event_store(request).store([event])
    log.debug(
        "ingest.stored",
        call_type=call_type,
        message_id=event.message_id,
        stored=result.stored,
        duplicates=result.duplicates,
    )
    return _response(result)


@router.post("/track")
async def track(request: Request, source: Source) -> dict[str, Any]:
    return await _ingest_call(request, source, "track")


@router.post("/identify")
async def identify(request: Request, source: Source) -> dict[str, Any]:
    return await _ingest_call(request, source, "identify")


@router.post("/page")
async def page(request: Request, source: Source) -> dict[str, Any]:
    return await _ingest_call(request, source, "page")


@router.post("/screen")
async def screen(request: Request, source: Source) -> dict[str, Any]:
    return await _ingest_call(request, source, "screen")


@router.post("/group")
async def group(request: Request, source: Source) -> dict[str, Any]:
    return await _ingest_call(request, source, "group")


@router.post("/alias")
async def alias(request: Request, source: Source) -> dict[str, Any]:
    return await _ingest_call(request, source, "alias")


@router.post("/batch")
async def batch(request: Request, source: Source) -> dict[str, Any]:
    settings = request.app.state.settings
    body = await read_json_object(request, settings.max_batch_bytes)
    _check_call_sizes(body.get("batch"), settings.max_call_bytes)
    try:
        batch_request = BatchRequest.model_validate(body)
    except ValidationError as error:
        raise invalid_request(error, drop_union_tags=True) from None

    received_at = datetime.now(UTC)
    events = [
        to_incoming_event(
            call,
            source=source,
            received_at=received_at,
            batch_sent_at=batch_request.sent_at,
            batch_context=batch_request.context,
        )
        for call in batch_request.batch
    ]
    result = await _event_store(request).store(events)
    log.debug(
        "ingest.batch_stored",
        calls=len(events),
        stored=result.stored,
        duplicates=result.duplicates,
    )
    return _response(result)


def _check_call_sizes(calls: object, limit: int) -> None:
    """Reject the batch when one call in it is larger than a single call may be."""
    if not isinstance(calls, list):
        return
    for position, call in enumerate(calls):
        size = len(json.dumps(call, separators=(",", ":"), ensure_ascii=False).encode())
        if size > limit:
            raise too_large(f"batch[{position}]", size, limit)
