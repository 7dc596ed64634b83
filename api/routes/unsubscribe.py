"""Unsubscribe links: the page behind the link in every marketing email, RFC 8058 one-click
unsubscribe, and the short survey that asks why the customer left."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from activities.ingest import EventStore
from activities.messaging import normalize_locale
from activities.suppressions import SuppressionStore
from activities.templates import default_template_dir
from api.errors import ApiError
from bisik.links import LinkSigner
from bisik.logs import get_logger

log = get_logger(__name__)

router = APIRouter(tags=["unsubscribe"])

MAX_FORM_BYTES = 8 * 1024
MAX_COMMENT_LENGTH = 2000
SURVEY_REASONS = ("too_many", "not_relevant", "never_signed_up", "other")

PAGE_TEXT: dict[str, dict[str, Any]] = {
    "en": {
        "title": "You're unsubscribed",
        "body": "We won't send you marketing emails any more. Emails about your orders will still reach you.",
        "question": "Would you tell us why? It helps us do better.",
        "reasons": [
            ("too_many", "Too many emails"),
            ("not_relevant", "They weren't relevant to me"),
            ("never_signed_up", "I never signed up"),
            ("other", "Something else"),
        ],
        "comment": "Anything else you'd like to say? (optional)",
        "submit": "Send",
        "thanks_title": "Thank you for telling us",
        "thanks_body": "We've got your answer. Take care!",
    },
    "id": {
        "title": "Kamu sudah berhenti berlangganan",
        "body": "Mulai sekarang kami nggak akan kirim email promosi lagi. Email soal pesananmu tetap kami kirim ya.",
        "question": "Boleh tahu kenapa? Jawabanmu bantu banget biar kami jadi lebih baik.",
        "reasons": [
            ("too_many", "Emailnya kebanyakan"),
            ("not_relevant", "Isinya nggak relevan buat aku"),
            ("never_signed_up", "Aku nggak pernah daftar"),
            ("other", "Alasan lain"),
        ],
        "comment": "Ada yang mau ditambahin? (opsional)",
        "submit": "Kirim",
        "thanks_title": "Makasih udah cerita!",
        "thanks_body": "Masukanmu sudah kami terima. Sampai ketemu lagi ya.",
    },
}

_pages = Environment(
    loader=FileSystemLoader(str(default_template_dir() / "pages")),
    autoescape=select_autoescape(["html"]),
)


def _link_target(request: Request, token: str) -> dict[str, Any]:
    """Return the verified token payload, or raise 404 for a link Bisik did not sign."""
    signer: LinkSigner = request.app.state.links
    payload = signer.verify("unsubscribe", token)
    if payload is None or not isinstance(payload.get("c"), str):
        raise ApiError(404, "not_found", "this unsubscribe link is not valid")
    return payload


async def _unsubscribe(request: Request, payload: dict[str, Any], source: str) -> str:
    """Suppress marketing on the link's channel and record an `Unsubscribed` event; return the locale."""
    pool = request.app.state.pool
    customer_id, channel, message_id = payload["c"], payload.get("ch", "email"), payload.get("m")
    row = await pool.fetchrow(
        "SELECT id, traits FROM customers WHERE id = (SELECT COALESCE(merged_into, id) FROM customers WHERE id = $1)",
        customer_id,
    )
    if row is None:
        raise ApiError(404, "not_found", "this unsubscribe link is not valid")

    newly = await SuppressionStore(pool).suppress(
        row["id"], channel=channel, reason="unsubscribed", source=source, message_id=message_id
    )
    if newly:
        store: EventStore = request.app.state.event_store
        await store.record_system_event(
            row["id"],
            "Unsubscribed",
            {"channel": channel, "message_id": message_id, "source": source},
            message_id=f"unsubscribe-{row['id']}-{channel}-{uuid.uuid4().hex[:8]}",
        )
    log.info("customer.unsubscribed", customer_id=row["id"], channel=channel, source=source, new=newly)
    return normalize_locale((row["traits"] or {}).get("locale"), request.app.state.settings.default_locale)


def _page(locale: str, *, answered: bool, survey_action: str = "") -> HTMLResponse:
    template = _pages.get_template("unsubscribed.html")
    html = template.render(locale=locale, text=PAGE_TEXT[locale], answered=answered, survey_action=survey_action)
    return HTMLResponse(html, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


async def _read_form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise ApiError(413, "payload_too_large", f"the form is {len(body)} bytes; the limit is {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_request", "the form is not UTF-8 text") from None
    return {name: values[0] for name, values in fields.items()}


@router.get("/u/{token}", response_class=HTMLResponse)
async def unsubscribe_page(token: str, request: Request) -> HTMLResponse:
    payload = _link_target(request, token)
    locale = await _unsubscribe(request, payload, source="link")
    return _page(locale, answered=False, survey_action=f"/u/{token}/survey")


@router.post("/u/{token}")
async def one_click_unsubscribe(token: str, request: Request) -> JSONResponse:
    """RFC 8058: the mail client POSTs `List-Unsubscribe=One-Click` on the reader's behalf."""
    payload = _link_target(request, token)
    await _unsubscribe(request, payload, source="one_click")
    return JSONResponse({"unsubscribed": True})


@router.post("/u/{token}/survey", response_class=HTMLResponse)
async def unsubscribe_survey(token: str, request: Request) -> HTMLResponse:
    payload = _link_target(request, token)
    form = await _read_form(request)
    reason = form.get("reason", "")
    if reason not in SURVEY_REASONS:
        raise ApiError(400, "invalid_request", f"reason: must be one of {', '.join(SURVEY_REASONS)}, got {reason!r}")
    comment = form.get("comment", "").strip()
    if len(comment) > MAX_COMMENT_LENGTH:
        raise ApiError(400, "invalid_request", f"comment: at most {MAX_COMMENT_LENGTH} characters, got {len(comment)}")

    locale = await _unsubscribe(request, payload, source="link")
    store: EventStore = request.app.state.event_store
    await store.record_system_event(
        payload["c"],
        "Unsubscribe Survey Answered",
        {"reason": reason, "comment": comment, "message_id": payload.get("m"), "channel": payload.get("ch", "email")},
        message_id=f"unsubscribe-survey-{uuid.uuid4().hex}",
    )
    return _page(locale, answered=True)
