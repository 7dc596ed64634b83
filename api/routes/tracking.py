"""Tracking: the `track.js` script for websites, the email open pixel and the click redirect.

Opens and clicks are stored as `Email Opened` and `Email Link Clicked` events of the customer in
the signed token. They count as activity (they move `last_seen_at`) and are routed to journeys
like any other event. A token that Bisik did not sign for that purpose gets a 404 and changes
nothing. The click redirect leads only to the URL inside the signed token.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from activities.ingest import EventStore
from activities.tracking import read_click_token, read_open_token
from api.errors import ApiError
from bisik.links import LinkSigner
from bisik.logs import get_logger

log = get_logger(__name__)

router = APIRouter(tags=["tracking"])

SCRIPT_PATH = Path(__file__).resolve().parent.parent / "static" / "track.js"
# Browsers and CDNs may keep the script an hour; the ETag lets them revalidate it cheaply after.
SCRIPT_CACHE_CONTROL = "public, max-age=3600"
# A transparent 1x1 GIF of 42 bytes.
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_STORE = {"Cache-Control": "no-store, max-age=0", "Referrer-Policy": "no-referrer"}


@lru_cache(maxsize=1)
def _script() -> tuple[bytes, str]:
    """Return track.js and its ETag, read once per process."""
    content = SCRIPT_PATH.read_bytes()
    return content, '"' + hashlib.sha256(content).hexdigest()[:32] + '"'


@router.get("/track.js", include_in_schema=False)
async def tracking_script(request: Request) -> Response:
    content, etag = _script()
    headers = {"Cache-Control": SCRIPT_CACHE_CONTROL, "ETag": etag}
    if etag in (tag.strip() for tag in request.headers.get("if-none-match", "").split(",")):
        return Response(status_code=304, headers=headers)
    return Response(content, media_type="text/javascript; charset=utf-8", headers=headers)


@router.get("/t/o/{token}", include_in_schema=False)
async def email_opened(token: str, request: Request) -> Response:
    opened = read_open_token(_signer(request), token)
    if opened is None:
        raise ApiError(404, "not_found", "this tracking link is not valid")
    await _record(
        request,
        opened.customer_id,
        "Email Opened",
        {"message_id": opened.message_id, "channel": "email"},
        event_prefix=f"email-opened-{opened.message_id}",
    )
    return Response(PIXEL_GIF, media_type="image/gif", headers=NO_STORE)


@router.get("/t/c/{token}", include_in_schema=False)
async def email_link_clicked(token: str, request: Request) -> Response:
    clicked = read_click_token(_signer(request), token)
    if clicked is None:
        raise ApiError(404, "not_found", "this tracking link is not valid")
    await _record(
        request,
        clicked.customer_id,
        "Email Link Clicked",
        {"message_id": clicked.message_id, "url": clicked.url, "channel": "email"},
        event_prefix=f"email-clicked-{clicked.message_id}",
    )
    return RedirectResponse(clicked.url, status_code=302, headers=NO_STORE)


def _signer(request: Request) -> LinkSigner:
    return request.app.state.links


async def _record(
    request: Request, customer_id: str, name: str, properties: dict[str, Any], *, event_prefix: str
) -> None:
    """Store the open or click; a failure is logged, so the reader still gets the image or the page."""
    store: EventStore = request.app.state.event_store
    try:
        await store.record_system_event(
            customer_id,
            name,
            properties,
            # Every open and every click is its own event, so each one has a fresh id.
            message_id=f"{event_prefix}-{uuid.uuid4().hex}",
            counts_as_activity=True,
        )
    except LookupError:
        # The customer was deleted after the email went out; the link itself is still ours.
        log.info("tracking.customer_not_found", customer_id=customer_id, event_name=name)
    except (asyncpg.PostgresError, OSError) as error:
        log.error("tracking.record_failed", customer_id=customer_id, event_name=name, error=str(error))
