"""The preference page behind the link in every email: which channels and topics a customer wants.

`GET /p/{token}` shows the customer's current choices and changes nothing; `POST /p/{token}`
saves the form. Each change is stored as a `Consent Updated` event with source
`preference_page` and applied to the `consents` table by the same code that applies an ingested
`Consent Updated`. Switching email off or on also adds or removes the customer's email
`unsubscribed` suppression, as the unsubscribe link does.

Topics apply to every channel, but the page never grants a topic on a channel that is off. In
the consent policy a topic's row outranks the channel's own row, so a topic switched on for
WhatsApp would allow WhatsApp marketing that the customer never agreed to.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from activities.ingest import CONSENT_CHANNELS, CONSENT_EVENT, EventStore
from activities.messaging import normalize_locale
from activities.policy import ContactPolicy
from activities.suppressions import SuppressionStore
from activities.templates import default_template_dir
from activities.tracking import read_preference_token
from api.errors import ApiError
from bisik.logs import get_logger

log = get_logger(__name__)

router = APIRouter(tags=["preferences"])

SOURCE = "preference_page"
MAX_FORM_BYTES = 8 * 1024
CHANNEL_FIELD = "channel."
TOPIC_FIELD = "topic."
CHECKBOX_VALUES = {"on": True, "off": False}

PAGE_TEXT: dict[str, dict[str, Any]] = {
    "en": {
        "title": "Choose what we send you",
        "intro": "Pick how and about what {brand} may get in touch. Emails about your orders always reach you.",
        "channels": "How should we reach you?",
        "channel_labels": {"email": "Email", "whatsapp": "WhatsApp", "sms": "SMS"},
        "topics": "What would you like to hear about?",
        "save": "Save my choices",
        "saved": "Saved! We'll stick to these choices from now on.",
    },
    "id": {
        "title": "Atur pesan dari kami",
        "intro": "Pilih mau dihubungi {brand} lewat mana dan soal apa aja. Info soal pesananmu tetap kami kirim ya.",
        "channels": "Enaknya dihubungi lewat mana?",
        "channel_labels": {"email": "Email", "whatsapp": "WhatsApp", "sms": "SMS"},
        "topics": "Mau dengar kabar soal apa?",
        "save": "Simpan pilihanku",
        "saved": "Sip, udah tersimpan! Mulai sekarang kami ikutin pilihanmu.",
    },
}
# Labels of the default topics; any other topic name is shown with its underscores as spaces.
TOPIC_LABELS: dict[str, dict[str, str]] = {
    "en": {"promotions": "Promos and discounts", "new_arrivals": "New arrivals", "tips": "Tips and inspiration"},
    "id": {"promotions": "Promo dan diskon", "new_arrivals": "Produk baru", "tips": "Tips dan inspirasi"},
}

_pages = Environment(
    loader=FileSystemLoader(str(default_template_dir() / "pages")),
    autoescape=select_autoescape(["html"]),
)


@dataclass(frozen=True)
class Choices:
    """A customer's choices: each channel and each topic on or off."""

    channels: dict[str, bool]
    topics: dict[str, bool]


@dataclass(frozen=True)
class ConsentChange:
    channel: str
    topic: str | None
    granted: bool


@router.get("/p/{token}", response_class=HTMLResponse)
async def preference_page(token: str, request: Request) -> HTMLResponse:
    customer_id, locale = await _customer(request, token)
    choices, _ = await _current_choices(request, customer_id)
    return _page(request, locale, choices, saved=False)


@router.post("/p/{token}", response_class=HTMLResponse)
async def save_preferences(token: str, request: Request) -> HTMLResponse:
    customer_id, locale = await _customer(request, token)
    requested = _parse_form(await _read_form(request), request.app.state.settings.preference_topics)

    current, topic_rows = await _current_choices(request, customer_id)
    changes = _consent_changes(current, requested, topic_rows)
    for change in changes:
        await _apply(request, customer_id, change)
    log.info("preferences.saved", customer_id=customer_id, changes=len(changes))

    saved, _ = await _current_choices(request, customer_id)
    return _page(request, locale, saved, saved=True)


async def _customer(request: Request, token: str) -> tuple[str, str]:
    """Return the canonical customer id of a signed token and their locale; 404 for any other token."""
    customer_id = read_preference_token(request.app.state.links, token)
    row = None
    if customer_id is not None:
        row = await request.app.state.pool.fetchrow(
            "SELECT id, traits FROM customers WHERE id = (SELECT COALESCE(merged_into, id) FROM customers WHERE id = $1)",
            customer_id,
        )
    if row is None:
        raise ApiError(404, "not_found", "this preference link is not valid")
    locale = normalize_locale((row["traits"] or {}).get("locale"), request.app.state.settings.default_locale)
    return row["id"], locale


async def _current_choices(request: Request, customer_id: str) -> tuple[Choices, dict[tuple[str, str], bool]]:
    """Return the choices to show and the latest consent of each channel and topic pair.

    A channel is on when the contact policy would allow marketing on it (email: also no
    `unsubscribed` suppression). A topic is on unless it was withdrawn on a channel that is on,
    or, while every channel is off, on any channel.
    """
    pool: asyncpg.Pool = request.app.state.pool
    settings = request.app.state.settings
    policy = ContactPolicy(pool, settings)
    channels = {channel: await policy.consent_refusal(customer_id, channel, None) is None for channel in CONSENT_CHANNELS}
    unsubscribed = await pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM suppressions WHERE customer_id = $1 AND channel = 'email' AND topic IS NULL AND reason = 'unsubscribed')",
        customer_id,
    )
    channels["email"] = channels["email"] and not unsubscribed

    rows = await pool.fetch(
        """
        SELECT DISTINCT ON (channel, topic) channel, topic, granted FROM consents
        WHERE customer_id = $1 AND topic IS NOT NULL
        ORDER BY channel, topic, recorded_at DESC, id DESC
        """,
        customer_id,
    )
    topic_rows = {(row["channel"], row["topic"]): row["granted"] for row in rows}
    considered = [channel for channel, on in channels.items() if on] or list(CONSENT_CHANNELS)
    topics = {
        topic: all(topic_rows.get((channel, topic)) is not False for channel in considered)
        for topic in settings.preference_topics
    }
    return Choices(channels, topics), topic_rows


def _consent_changes(
    current: Choices, requested: Choices, topic_rows: dict[tuple[str, str], bool]
) -> list[ConsentChange]:
    """Return the consent records that turn `current` into `requested`, channels first."""
    changes = [
        ConsentChange(channel, None, on)
        for channel, on in requested.channels.items()
        if on != current.channels[channel]
    ]
    for topic, topic_on in requested.topics.items():
        for channel in CONSENT_CHANNELS:
            latest = topic_rows.get((channel, topic))
            if not topic_on and latest is not False:
                changes.append(ConsentChange(channel, topic, False))
            elif topic_on and requested.channels[channel] and latest is False:
                changes.append(ConsentChange(channel, topic, True))
            elif topic_on and not requested.channels[channel] and latest is True:
                # A topic grant would outrank the channel being off, so it is withdrawn with it.
                changes.append(ConsentChange(channel, topic, False))
    return changes


async def _apply(request: Request, customer_id: str, change: ConsentChange) -> None:
    """Store one change as a `Consent Updated` event and apply it to consents and suppressions."""
    pool: asyncpg.Pool = request.app.state.pool
    suppressions = SuppressionStore(pool)
    if change.channel == "email" and change.topic is None:
        if change.granted:
            await suppressions.unsuppress(customer_id, channel="email", reason="unsubscribed")
        else:
            await suppressions.suppress(customer_id, channel="email", reason="unsubscribed", source=SOURCE)

    properties: dict[str, Any] = {"channel": change.channel, "granted": change.granted, "source": SOURCE}
    if change.topic is not None:
        properties["topic"] = change.topic
    store: EventStore = request.app.state.event_store
    message_id = f"preferences-{customer_id}-{uuid.uuid4().hex}"
    # The event and its consent row are written in one transaction.
    event_id = await store.record_system_event(customer_id, CONSENT_EVENT, properties, message_id=message_id)
    if event_id is None:
        raise RuntimeError(f"the consent event {message_id} was stored before, which a fresh id rules out")


async def _read_form(request: Request) -> list[tuple[str, str]]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise ApiError(413, "payload_too_large", f"the form is {len(body)} bytes; the limit is {MAX_FORM_BYTES} bytes")
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_request", "the form is not UTF-8 text") from None


def _parse_form(fields: list[tuple[str, str]], topics: list[str]) -> Choices:
    """Read checkbox fields `channel.<channel>` and `topic.<topic>`; a missing checkbox means off."""
    channels = dict.fromkeys(CONSENT_CHANNELS, False)
    chosen_topics = dict.fromkeys(topics, False)
    for name, value in fields:
        if name.startswith(CHANNEL_FIELD):
            target, known, kind = channels, CONSENT_CHANNELS, "channel"
        elif name.startswith(TOPIC_FIELD):
            target, known, kind = chosen_topics, tuple(topics), "topic"
        else:
            raise ApiError(400, "invalid_request", f"{name}: unknown field; expected channel.<channel> or topic.<topic>")
        key = name.removeprefix(CHANNEL_FIELD if kind == "channel" else TOPIC_FIELD)
        if key not in known:
            raise ApiError(400, "invalid_request", f"{name}: unknown {kind}; expected one of {', '.join(known)}")
        if value not in CHECKBOX_VALUES:
            raise ApiError(400, "invalid_request", f"{name}: must be on or off, got {value!r}")
        target[key] = CHECKBOX_VALUES[value]
    return Choices(channels, chosen_topics)


def _page(request: Request, locale: str, choices: Choices, *, saved: bool) -> HTMLResponse:
    settings = request.app.state.settings
    text = PAGE_TEXT[locale]
    topic_labels = {
        topic: TOPIC_LABELS[locale].get(topic, topic.replace("_", " ").capitalize()) for topic in choices.topics
    }
    html = _pages.get_template("preferences.html").render(
        locale=locale,
        text=text,
        intro=text["intro"].format(brand=settings.brand_name),
        choices=choices,
        topic_labels=topic_labels,
        saved=saved,
    )
    return HTMLResponse(html, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
