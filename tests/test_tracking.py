"""Tracking: link rewriting, the open pixel and click redirect, track.js in Chromium, and the
preference page, all against the real API over loopback HTTP."""

from __future__ import annotations

import gzip
import json
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import httpx
import pytest
from temporalio.client import Client
from temporalio.service import RPCError

from activities.policy import ContactPolicy
from activities.suppressions import SuppressionStore
from activities.templates import TemplateRenderer
from activities.tracking import (
    add_tracking,
    click_url,
    open_url,
    preference_url,
    read_click_token,
    read_open_token,
    rewrite_links,
)
from bisik.links import LinkSigner
from bisik.settings import Settings, source_id
from tests.conftest import WRITE_KEY, ApiServer, RunningWorker
from tests.helpers import assert_eventually
from workers.stack import free_port

PUBLIC_URL = "http://127.0.0.1:8000"
SIGNER = LinkSigner("test-signing-key-" + "k" * 20)
CHROMIUM = Path("/usr/bin/chromium")
# Seconds each step of the browser test may take; generous, since other test runs may share the cores.
STEP_TIMEOUT = 60.0
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def tracked(html: str) -> str:
    return add_tracking(html, signer=SIGNER, public_url=PUBLIC_URL, message_id=42, customer_id="cus_1")


def click_tokens(html: str) -> list[str]:
    return re.findall(r'href="http://127\.0\.0\.1:8000/t/c/([^"]+)"', html)


def tampered(token: str) -> str:
    """Change the first character of the signature, which is what follows the last dot.

    Not the last character: its low bits are base64 padding, so some changes there decode to
    the same signature.
    """
    payload, _, signature = token.rpartition(".")
    return payload + "." + ("A" if signature[0] != "A" else "B") + signature[1:]


def signer_of(settings: Settings) -> LinkSigner:
    return LinkSigner(settings.secret_key.get_secret_value())


async def new_customer(api: httpx.AsyncClient, pool: asyncpg.Pool, user_id: str, **traits: object) -> str:
    response = await api.post("/v1/identify", json={"userId": user_id, "traits": {"email": f"{user_id}@example.com", **traits}})
    assert response.status_code == 200, response.text
    return await pool.fetchval("SELECT customer_id FROM identities WHERE kind = 'user_id' AND value = $1", user_id)


async def set_last_seen(pool: asyncpg.Pool, customer_id: str, moment: datetime) -> None:
    await pool.execute("UPDATE customers SET last_seen_at = $2 WHERE id = $1", customer_id, moment)


async def bisik_events(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT id, name, customer_id, properties FROM events WHERE source = 'bisik' ORDER BY id")


class CheckboxReader(HTMLParser):
    """Collect each checkbox of a page by name, with whether it is checked."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.checkboxes: dict[str, bool] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "input" and attributes.get("type") == "checkbox":
            self.checkboxes[attributes["name"] or ""] = "checked" in attributes


def form(**fields: str) -> dict[str, object]:
    """Keyword arguments for posting a form; `channel__email="on"` names the field `channel.email`."""
    body = "&".join(f"{name.replace('__', '.')}={value}" for name, value in fields.items())
    return {"content": body, "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


# Rewriting links


def test_rewrite_wraps_http_links() -> None:
    html = '<p><a href="https://shop.example.com/cart">Cart</a> <a href="http://blog.example.com/post">Post</a></p>'

    tokens = click_tokens(tracked(html))

    assert len(tokens) == 2
    assert read_click_token(SIGNER, tokens[0]).url == "https://shop.example.com/cart"
    assert read_click_token(SIGNER, tokens[1]).url == "http://blog.example.com/post"
    assert read_click_token(SIGNER, tokens[0]).message_id == 42
    assert read_click_token(SIGNER, tokens[0]).customer_id == "cus_1"


def test_rewrite_keeps_own_and_mailto_links() -> None:
    untouched = [
        '<a href="http://127.0.0.1:8000/u/unsubscribe-token">Unsubscribe</a>',
        '<a href="http://127.0.0.1:8000/p/preference-token">Preferences</a>',
        '<a href="mailto:help@example.com?subject=Hi&amp;body=x">Mail us</a>',
        '<a href="tel:+6281234567">Call</a>',
        '<a href="javascript:alert(1)">Script</a>',
        '<a href="/relative/path">Relative</a>',
        '<a href="#top">Top</a>',
        '<a name="anchor">No href</a>',
    ]
    html = "\n".join(untouched)

    assert tracked(html) == html + tracked("")


def test_rewrite_keeps_other_html_intact() -> None:
    head = '<!DOCTYPE html>\n<html lang="en">\n<head><title>Fish &amp; chips</title></head>\n<body>\n'
    comment = '<!--[if mso]><a href="https://outlook.example.com">o</a><![endif]-->\n'
    text = "<p>Price &lt; 10 &euro; &#x1F600; <b>bold</b></p>\n"
    link = '<a href="https://shop.example.com/">Shop</a>'
    html = head + comment + text + link + "\n</body>\n</html>\n"

    rewritten = rewrite_links(html, lambda url: "https://tracked.example.com/x")

    assert rewritten == head + comment + text + '<a href="https://tracked.example.com/x">Shop</a>' + "\n</body>\n</html>\n"


def test_rewrite_preserves_escaping() -> None:
    html = (
        '<a class="btn" title="Say &quot;hi&quot; &amp; go" '
        'href="https://shop.example.com/search?q=kaos&amp;size=M&amp;note=%22x%22">Search &amp; find</a>'
    )

    rewritten = tracked(html)
    [token] = click_tokens(rewritten)

    assert read_click_token(SIGNER, token).url == "https://shop.example.com/search?q=kaos&size=M&note=%22x%22"
    assert 'title="Say &quot;hi&quot; &amp; go"' in rewritten
    assert rewritten.startswith('<a class="btn" title=')
    assert ">Search &amp; find</a>" in rewritten


def test_open_pixel_before_body_end() -> None:
    rewritten = tracked("<html><body><p>Hi</p></BODY></html>")

    pixel = re.search(r'<img src="http://127\.0\.0\.1:8000/t/o/([^"]+)" width="1" height="1" alt=""', rewritten)
    assert pixel is not None
    assert rewritten.index("<img") < rewritten.index("</BODY>")
    assert read_open_token(SIGNER, pixel.group(1)).message_id == 42
    assert read_open_token(SIGNER, pixel.group(1)).customer_id == "cus_1"


def test_open_pixel_appended_without_body() -> None:
    rewritten = tracked("<p>Hi</p>")

    assert rewritten.startswith("<p>Hi</p><img src=")


def test_rendered_email_keeps_footer_links() -> None:
    context = {
        "brand_name": "Toko Bisik",
        "shop_url": "https://shop.example.com",
        "public_url": PUBLIC_URL,
        "unsubscribe_url": PUBLIC_URL + "/u/unsubscribe-token",
        "preference_url": preference_url(SIGNER, PUBLIC_URL, "cus_1"),
        "transactional": False,
        "cart": {"items": [{"product_id": "p1", "name": "Kaos", "price": 10.0, "quantity": 1, "image_url": None, "url": None}], "total": 10.0, "currency": "USD"},
        "customer": {"first_name": "Sari", "email": "a@example.com", "traits": {}},
    }
    message = TemplateRenderer().render("cart_reminder_1", "id", context)

    rewritten = tracked(message.html)

    assert f'href="{context["unsubscribe_url"]}"' in rewritten
    assert f'<a href="{context["preference_url"]}" style="color:#888;">Atur pesan yang mau kamu terima</a>' in rewritten
    assert "https://shop.example.com/cart" not in rewritten
    assert [read_click_token(SIGNER, token).url for token in click_tokens(rewritten)] == ["https://shop.example.com/cart"]


def test_email_footer_without_preference_url() -> None:
    context = {
        "brand_name": "Toko Bisik",
        "shop_url": "https://shop.example.com",
        "public_url": PUBLIC_URL,
        "unsubscribe_url": None,
        "preference_url": None,
        "transactional": True,
        "order": {"order_id": "o-1", "items": [], "total": 0, "currency": "USD"},
        "customer": {"first_name": None, "email": "a@example.com", "traits": {}},
    }

    message = TemplateRenderer().render("order_thank_you", "en", context)

    assert "/p/" not in message.html
    assert "This email is about your order with Toko Bisik." in message.html


# Open pixel and click redirect


async def test_open_pixel_records_email_opened(api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings) -> None:
    customer = await new_customer(api, pool, "opener")
    long_ago = datetime(2026, 1, 1, tzinfo=UTC)
    await set_last_seen(pool, customer, long_ago)
    pixel = open_url(signer_of(settings), "", message_id=7, customer_id=customer)

    response = await api.get(pixel)

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/gif"
    assert response.content.startswith(b"GIF89a")
    assert response.headers["cache-control"] == "no-store, max-age=0"
    [event] = await bisik_events(pool)
    assert (event["name"], event["customer_id"]) == ("Email Opened", customer)
    assert event["properties"] == {"message_id": 7, "channel": "email"}
    last_seen = await pool.fetchval("SELECT last_seen_at FROM customers WHERE id = $1", customer)
    assert last_seen > datetime.now(UTC) - timedelta(minutes=1)


async def test_click_redirects_to_signed_target(api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings) -> None:
    customer = await new_customer(api, pool, "clicker")
    await set_last_seen(pool, customer, datetime(2026, 1, 1, tzinfo=UTC))
    target = "https://shop.example.com/products/kaos?utm_source=email&color=merah#reviews"
    link = click_url(signer_of(settings), "", message_id=9, customer_id=customer, target=target)

    response = await api.get(link, follow_redirects=False)

    assert response.status_code == 302
    assert response.headers["location"] == target
    [event] = await bisik_events(pool)
    assert (event["name"], event["customer_id"]) == ("Email Link Clicked", customer)
    assert event["properties"] == {"message_id": 9, "url": target, "channel": "email"}
    last_seen = await pool.fetchval("SELECT last_seen_at FROM customers WHERE id = $1", customer)
    assert last_seen > datetime.now(UTC) - timedelta(minutes=1)


async def test_click_event_queued_for_journeys(api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings) -> None:
    customer = await new_customer(api, pool, "routed")
    link = click_url(signer_of(settings), "", message_id=3, customer_id=customer, target="https://shop.example.com/")

    await api.get(link, follow_redirects=False)

    event_id = await pool.fetchval("SELECT id FROM events WHERE name = 'Email Link Clicked'")
    assert await pool.fetchval("SELECT customer_id FROM outbox WHERE event_id = $1", event_id) == customer


async def test_each_click_stored_separately(api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings) -> None:
    customer = await new_customer(api, pool, "twice")
    link = click_url(signer_of(settings), "", message_id=3, customer_id=customer, target="https://shop.example.com/")

    await api.get(link, follow_redirects=False)
    await api.get(link, follow_redirects=False)

    assert [event["name"] for event in await bisik_events(pool)] == ["Email Link Clicked", "Email Link Clicked"]


async def test_click_for_deleted_customer_still_redirects(
    api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    link = click_url(signer_of(settings), "", message_id=3, customer_id="cus_gone", target="https://shop.example.com/")

    response = await api.get(link, follow_redirects=False)

    assert response.status_code == 302
    assert response.headers["location"] == "https://shop.example.com/"
    assert await bisik_events(pool) == []


async def test_bad_tracking_tokens_404_without_change(
    api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    customer = await new_customer(api, pool, "victim", locale="en")
    long_ago = datetime(2026, 1, 1, tzinfo=UTC)
    await set_last_seen(pool, customer, long_ago)
    signer = signer_of(settings)
    other_key = LinkSigner("someone-elses-key-" + "x" * 20)
    evil = "https://evil.example.com/phish"
    click = click_url(signer, "", message_id=1, customer_id=customer, target="https://shop.example.com/").rsplit("/", 1)[1]
    opened = open_url(signer, "", message_id=1, customer_id=customer).rsplit("/", 1)[1]
    preferences = preference_url(signer, "", customer).rsplit("/", 1)[1]
    evil_payload = signer.sign("click", {"m": 1, "c": customer, "u": evil}).rpartition(".")[0]
    bad_clicks = [
        tampered(click),
        evil_payload + "." + click.rpartition(".")[2],
        click + "x",
        other_key.sign("click", {"m": 1, "c": customer, "u": evil}),
        signer.sign("click", {"m": 1, "c": customer, "u": "javascript:alert(1)"}),
        signer.sign("click", {"m": 1, "c": customer}),
        "not-a-token",
    ]

    for token in bad_clicks:
        response = await api.get(f"/t/c/{token}", follow_redirects=False)
        assert response.status_code == 404, token
        assert "location" not in response.headers
    for token in (tampered(opened), other_key.sign("open", {"m": 1, "c": customer}), "not-a-token"):
        assert (await api.get(f"/t/o/{token}")).status_code == 404
    for token in (tampered(preferences), other_key.sign("preferences", {"c": customer}), "not-a-token"):
        assert (await api.get(f"/p/{token}")).status_code == 404
        assert (await api.post(f"/p/{token}", **form(channel__email="off"))).status_code == 404

    assert await bisik_events(pool) == []
    assert await pool.fetchval("SELECT count(*) FROM consents") == 0
    assert await pool.fetchval("SELECT count(*) FROM suppressions") == 0
    assert await pool.fetchval("SELECT last_seen_at FROM customers WHERE id = $1", customer) == long_ago


async def test_token_for_other_purpose_404(api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings) -> None:
    customer = await new_customer(api, pool, "purposes")
    signer = signer_of(settings)
    click = click_url(signer, "", message_id=1, customer_id=customer, target="https://shop.example.com/").rsplit("/", 1)[1]
    opened = open_url(signer, "", message_id=1, customer_id=customer).rsplit("/", 1)[1]
    preferences = preference_url(signer, "", customer).rsplit("/", 1)[1]
    unsubscribe = signer.unsubscribe_token(customer, 1)

    for path in (f"/t/c/{opened}", f"/t/c/{preferences}", f"/t/c/{unsubscribe}", f"/t/o/{click}", f"/t/o/{unsubscribe}", f"/p/{click}", f"/p/{unsubscribe}", f"/u/{click}"):
        response = await api.get(path, follow_redirects=False)
        assert response.status_code == 404, path
        assert "location" not in response.headers

    assert await bisik_events(pool) == []
    assert await pool.fetchval("SELECT count(*) FROM suppressions") == 0


# track.js and the browser's way in


async def test_track_js_served_cacheable(api: httpx.AsyncClient) -> None:
    response = await api.get("/track.js")
    revalidated = await api.get("/track.js", headers={"If-None-Match": response.headers["etag"]})

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    assert response.headers["cache-control"] == "public, max-age=3600"
    assert "data-write-key" in response.text
    assert revalidated.status_code == 304
    assert revalidated.content == b""


async def test_body_write_key_accepted_not_stored(api_server: ApiServer, pool: asyncpg.Pool) -> None:
    call = {"anonymousId": "anon-1", "event": "Product Viewed", "writeKey": WRITE_KEY}
    async with api_server.client(write_key=None) as client:
        response = await client.post("/v1/track", content=json.dumps(call), headers={"Content-Type": "text/plain;charset=UTF-8"})

    assert response.status_code == 200, response.text
    row = await pool.fetchrow("SELECT source, payload FROM events")
    assert row["source"] == source_id(WRITE_KEY)
    assert "writeKey" not in row["payload"]
    assert row["payload"]["event"] == "Product Viewed"


async def test_body_write_key_in_gzip_batch(api_server: ApiServer, pool: asyncpg.Pool) -> None:
    body = {"writeKey": WRITE_KEY, "batch": [{"type": "track", "anonymousId": "a", "event": "A", "writeKey": WRITE_KEY}]}
    async with api_server.client(write_key=None) as client:
        response = await client.post("/v1/batch", content=gzip.compress(json.dumps(body).encode()), headers={"Content-Encoding": "gzip"})

    assert response.status_code == 200, response.text
    payload = await pool.fetchval("SELECT payload FROM events")
    assert "writeKey" not in payload


async def test_body_write_key_wrong_rejected(api_server: ApiServer, pool: asyncpg.Pool) -> None:
    async with api_server.client(write_key=None) as client:
        wrong = await client.post("/v1/track", content=json.dumps({"anonymousId": "a", "event": "A", "writeKey": "nope"}))
        not_text = await client.post("/v1/track", content=json.dumps({"anonymousId": "a", "event": "A", "writeKey": 12}))
        mixed = await client.post(
            "/v1/batch",
            content=json.dumps({"writeKey": WRITE_KEY, "batch": [{"type": "track", "anonymousId": "a", "event": "A", "writeKey": "other"}]}),
        )

    assert wrong.status_code == 401
    assert wrong.json()["message"] == "invalid write key"
    assert not_text.status_code == 401
    assert not_text.json()["message"] == "writeKey: must be a string, got int"
    assert mixed.status_code == 401
    assert mixed.json()["message"] == "batch[0].writeKey: differs from the batch's writeKey; send one batch per write key"
    assert await pool.fetchval("SELECT count(*) FROM events") == 0


async def test_cors_preflight_allows_basic_auth(api_server: ApiServer) -> None:
    async with api_server.client(write_key=None) as client:
        preflight = await client.options(
            "/v1/track",
            headers={
                "Origin": "https://shop.example.com",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        simple = await client.post(
            "/v1/track",
            content=json.dumps({"anonymousId": "a", "event": "A", "writeKey": WRITE_KEY}),
            headers={"Origin": "https://shop.example.com", "Content-Type": "text/plain"},
        )

    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert preflight.headers["access-control-max-age"] == "7200"
    assert simple.status_code == 200
    assert simple.headers["access-control-allow-origin"] == "*"


# The preference page


async def test_preference_page_shows_current_choices(
    api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    customer = await new_customer(api, pool, "pref-show", locale="id-ID")
    await api.post("/v1/track", json={"userId": "pref-show", "event": "Consent Updated", "properties": {"channel": "whatsapp", "granted": True}})
    await api.post("/v1/track", json={"userId": "pref-show", "event": "Consent Updated", "properties": {"channel": "email", "topic": "tips", "granted": False}})

    response = await api.get(preference_url(signer_of(settings), "", customer))

    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert "Atur pesan dari kami" in response.text
    assert "Tips dan inspirasi" in response.text
    assert CheckboxReader(response.text).checkboxes == {
        "channel.email": True,
        "channel.whatsapp": True,
        "channel.sms": False,
        "topic.promotions": True,
        "topic.new_arrivals": True,
        "topic.tips": False,
    }
    assert await bisik_events(pool) == []


async def test_preference_save_records_consent_events(
    api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    customer = await new_customer(api, pool, "pref-save")
    url = preference_url(signer_of(settings), "", customer)

    response = await api.post(url, **form(channel__sms="on", topic__promotions="on", topic__tips="on"))

    assert response.status_code == 200, response.text
    assert "Saved! We&#39;ll stick to these choices from now on." in response.text
    assert CheckboxReader(response.text).checkboxes == {
        "channel.email": False,
        "channel.whatsapp": False,
        "channel.sms": True,
        "topic.promotions": True,
        "topic.new_arrivals": False,
        "topic.tips": True,
    }
    events = await bisik_events(pool)
    assert {event["name"] for event in events} == {"Consent Updated"}
    assert [event["properties"] for event in events] == [
        {"channel": "email", "granted": False, "source": "preference_page"},
        {"channel": "sms", "granted": True, "source": "preference_page"},
        {"channel": "email", "topic": "new_arrivals", "granted": False, "source": "preference_page"},
        {"channel": "whatsapp", "topic": "new_arrivals", "granted": False, "source": "preference_page"},
        {"channel": "sms", "topic": "new_arrivals", "granted": False, "source": "preference_page"},
    ]
    consents = await pool.fetch("SELECT channel, topic, granted, source FROM consents WHERE customer_id = $1 ORDER BY id", customer)
    assert [tuple(row) for row in consents] == [
        ("email", None, False, "preference_page"),
        ("sms", None, True, "preference_page"),
        ("email", "new_arrivals", False, "preference_page"),
        ("whatsapp", "new_arrivals", False, "preference_page"),
        ("sms", "new_arrivals", False, "preference_page"),
    ]
    assert await SuppressionStore(pool).reason_suppressed(customer, "email") == "unsubscribed"
    policy = ContactPolicy(pool, settings)
    assert await policy.consent_refusal(customer, "sms", "promotions") is None
    assert await policy.consent_refusal(customer, "sms", "new_arrivals") == "no consent: sms consent withdrawn"


async def test_preference_save_unchanged_records_nothing(
    api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    customer = await new_customer(api, pool, "pref-same")
    url = preference_url(signer_of(settings), "", customer)

    response = await api.post(url, **form(channel__email="on", topic__promotions="on", topic__new_arrivals="on", topic__tips="on"))

    assert response.status_code == 200
    assert await bisik_events(pool) == []
    assert await pool.fetchval("SELECT count(*) FROM consents") == 0


async def test_preference_email_on_lifts_unsubscribe(
    api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    customer = await new_customer(api, pool, "pref-back")
    await api.get(f"/u/{signer_of(settings).unsubscribe_token(customer, None)}")
    url = preference_url(signer_of(settings), "", customer)
    shown = CheckboxReader((await api.get(url)).text).checkboxes

    response = await api.post(url, **form(channel__email="on", topic__promotions="on", topic__new_arrivals="on", topic__tips="on"))

    assert shown["channel.email"] is False
    assert response.status_code == 200
    assert CheckboxReader(response.text).checkboxes["channel.email"] is True
    assert await SuppressionStore(pool).reason_suppressed(customer, "email") is None
    consent = await pool.fetchrow("SELECT channel, topic, granted, source FROM consents WHERE customer_id = $1", customer)
    assert tuple(consent) == ("email", None, True, "preference_page")


async def test_preference_topic_not_granted_on_off_channel(
    api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    customer = await new_customer(api, pool, "pref-topic")
    url = preference_url(signer_of(settings), "", customer)
    await api.post(url, **form(channel__email="on", topic__new_arrivals="on", topic__tips="on"))

    await api.post(url, **form(channel__email="on", topic__promotions="on", topic__new_arrivals="on", topic__tips="on"))

    rows = await pool.fetch("SELECT channel, granted FROM consents WHERE topic = 'promotions' ORDER BY id")
    assert [tuple(row) for row in rows] == [("email", False), ("whatsapp", False), ("sms", False), ("email", True)]
    policy = ContactPolicy(pool, settings)
    assert await policy.consent_refusal(customer, "email", "promotions") is None
    assert await policy.consent_refusal(customer, "whatsapp", "promotions") == "no consent: whatsapp consent withdrawn"


async def test_preference_channel_off_withdraws_topic_grants(
    api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    customer = await new_customer(api, pool, "pref-off")
    await api.post("/v1/track", json={"userId": "pref-off", "event": "Consent Updated", "properties": {"channel": "whatsapp", "topic": "promotions", "granted": True}})
    url = preference_url(signer_of(settings), "", customer)

    await api.post(url, **form(channel__email="on", topic__promotions="on", topic__new_arrivals="on", topic__tips="on"))

    policy = ContactPolicy(pool, settings)
    assert await policy.consent_refusal(customer, "whatsapp", "promotions") == "no consent: whatsapp consent withdrawn"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("channel.email=on&topic.weekly=on", "topic.weekly: unknown topic; expected one of promotions, new_arrivals, tips"),
        ("channel.fax=on", "channel.fax: unknown channel; expected one of email, whatsapp, sms"),
        ("colour=red", "colour: unknown field; expected channel.<channel> or topic.<topic>"),
        ("channel.email=yes", "channel.email: must be on or off, got 'yes'"),
    ],
)
async def test_preference_form_rejects_unknown_fields(
    api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings, body: str, message: str
) -> None:
    customer = await new_customer(api, pool, "pref-bad")

    response = await api.post(
        preference_url(signer_of(settings), "", customer), content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )

    assert response.status_code == 400
    assert response.json() == {"code": "invalid_request", "message": message}
    assert await bisik_events(pool) == []
    assert await pool.fetchval("SELECT count(*) FROM consents") == 0


# track.js in Chromium


class ShopPage(BaseHTTPRequestHandler):
    """A shop page on its own origin that includes track.js from the API."""

    api_url = ""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if self.path == "/":
            body = f"""<!DOCTYPE html>
<html><head><title>Kaos Merah</title>
<script>
window.bisik = window.bisik || [];
bisik.push(["track", "Product Viewed", {{"product_id": "kaos-1"}}]);
function listenForLeaving() {{
  // Added after track.js's own pagehide listener, so this call must leave as a beacon.
  window.addEventListener("pagehide", function () {{
    window.fetch = function () {{ throw new Error("fetch called during unload"); }};
    bisik.track("Shop Left", {{}});
  }});
}}
</script>
<script src="{self.api_url}/track.js" data-write-key="{WRITE_KEY}" async onload="listenForLeaving()"></script>
</head><body>
<button id="add" onclick="bisik.track('Product Added', {{product_id: 'kaos-1', name: 'Kaos Merah', price: 99.5, quantity: 1}})">Add to cart</button>
<a id="leave" href="/bye">Leave</a>
</body></html>"""
        else:
            body = "<!DOCTYPE html><html><head><title>Bye</title></head><body>Bye</body></html>"
        content = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        return


@pytest.fixture
def shop_site(api_server: ApiServer) -> Iterator[str]:
    handler = type("Shop", (ShopPage,), {"api_url": api_server.url})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


async def test_track_js_in_chromium_reaches_journeys(
    api_server: ApiServer,
    running_worker: RunningWorker,
    shop_site: str,
    pool: asyncpg.Pool,
    temporal_client: Client,
) -> None:
    from playwright.async_api import async_playwright

    assert CHROMIUM.exists(), "Debian's chromium is missing: run `make install` or `apt-get install -y chromium`"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context()
            page = await context.new_page()
            console_errors: list[str] = []
            page.on("console", lambda message: console_errors.append(message.text) if message.type in ("error", "warning") else None)

            await page.goto(shop_site + "/")

            async def page_view_stored() -> asyncpg.Record:
                row = await pool.fetchrow("SELECT anonymous_id, customer_id, properties, context FROM events WHERE type = 'page'")
                assert row is not None
                return row

            page_view = await assert_eventually(page_view_stored, timeout=STEP_TIMEOUT)
            cookies = {cookie["name"]: cookie for cookie in await context.cookies()}
            assert page_view["anonymous_id"] == cookies["bisik_aid"]["value"]
            assert cookies["bisik_aid"]["sameSite"] == "Lax"
            assert cookies["bisik_aid"]["expires"] > (datetime.now(UTC) + timedelta(days=364)).timestamp()
            assert page_view["properties"]["path"] == "/"
            assert page_view["context"]["page"]["title"] == "Kaos Merah"
            assert page_view["context"]["library"] == {"name": "bisik-track.js", "version": "1.0.0"}
            assert "Chrome" in page_view["context"]["userAgent"]

            await page.click("#add")

            async def cart_journey_started() -> str:
                customer = await pool.fetchval("SELECT customer_id FROM events WHERE name = 'Product Added'")
                assert customer is not None
                try:
                    description = await temporal_client.get_workflow_handle(f"abandoned_cart:{customer}").describe()
                except RPCError as error:
                    raise AssertionError(f"abandoned_cart:{customer} not started yet: {error}") from None
                assert description.status.name == "RUNNING"
                return customer

            anonymous_customer = await assert_eventually(cart_journey_started, timeout=STEP_TIMEOUT)
            queued = await pool.fetchval("SELECT anonymous_id FROM events WHERE name = 'Product Viewed'")
            assert queued == cookies["bisik_aid"]["value"]

            await page.evaluate("bisik.identify('u-1', {email: 'u1@example.com'})")

            async def identified() -> str:
                customer = await pool.fetchval("SELECT customer_id FROM identities WHERE kind = 'user_id' AND value = 'u-1'")
                assert customer is not None
                return customer

            known_customer = await assert_eventually(identified, timeout=STEP_TIMEOUT)
            assert known_customer == anonymous_customer
            owners = await pool.fetch("SELECT DISTINCT customer_id FROM events WHERE type = 'page' OR name = 'Product Added'")
            assert [row["customer_id"] for row in owners] == [known_customer]
            user_cookie = next(cookie for cookie in await context.cookies() if cookie["name"] == "bisik_uid")
            assert user_cookie["value"] == "u-1"

            await page.click("#leave")
            await page.wait_for_url(shop_site + "/bye")

            async def left_with_user_id() -> None:
                assert await pool.fetchval("SELECT user_id FROM events WHERE name = 'Shop Left'") == "u-1"

            await assert_eventually(left_with_user_id, timeout=STEP_TIMEOUT)
            assert console_errors == []
        finally:
            await browser.close()


def test_request_log_hides_link_tokens() -> None:
    from api.app import redact_link_tokens

    assert redact_link_tokens("/u/abc.def/survey") == "/u/[token]/survey"
    assert redact_link_tokens("/p/abc.def") == "/p/[token]"
    assert redact_link_tokens("/t/c/abc.def") == "/t/c/[token]"
    assert redact_link_tokens("/t/o/abc.def.gif") == "/t/o/[token]"
    assert redact_link_tokens("/v1/track") == "/v1/track"


async def test_sent_email_tracks_opens_and_clicks(journeys) -> None:  # type: ignore[no-untyped-def]
    customer = await journeys.customer("tracked-mail")
    added = await journeys.event("tracked-mail", "Product Added", product_id="p", name="Tea", price=3.0, url="https://shop.example.com/tea")

    await (await journeys.deliver("abandoned_cart", added)).result()

    html = journeys.mail_to("tracked-mail@example.com")[0].html()
    assert '/t/o/' in html
    assert 'href="https://shop.example.com/tea"' not in html
    assert "/t/c/" in html
    assert "/u/" in html
    assert "/p/" in html
    assert len(await journeys.messages(customer)) == 2
