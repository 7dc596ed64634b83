"""Outbound webhooks against a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import asyncpg
import pytest
from pydantic import SecretStr

from activities.webhooks import WebhookDispatcher, verify_signature
from bisik.settings import Settings
from bisik.urls import UnsafeUrlError, check_public_url
from tests.journey_fixtures import JourneyHarness
from workers.stack import free_port

SECRET = "webhook-test-secret"
SHOES = {"product_id": "shoe-1", "name": "Running Shoes", "price": 450.5}


class Receiver:
    """An HTTP server that records every POST and answers with the next status in `statuses`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's method name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(({key.lower(): value for key, value in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/bisik"

    def events(self) -> list[dict]:
        return [json.loads(body) for _, body in self.requests]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.thread.start()
    yield server
    server.server.shutdown()


@pytest.fixture
def webhook_settings(settings: Settings, receiver: Receiver) -> Settings:
    settings.webhook_url = receiver.url
    settings.webhook_secret = SecretStr(SECRET)
    settings.allow_private_urls = True
    return settings


def deliveries(pool: asyncpg.Pool) -> object:
    return pool.fetch("SELECT * FROM webhook_deliveries ORDER BY id")


async def test_journey_events_posted_signed(
    journeys: JourneyHarness, webhook_settings: Settings, receiver: Receiver, pool: asyncpg.Pool
) -> None:
    await journeys.customer("hook-1")
    await (await journeys.deliver("abandoned_cart", await journeys.event("hook-1", "Product Added", **SHOES))).result()

    attempted = await WebhookDispatcher(pool, webhook_settings).deliver_due()

    assert attempted == 4
    assert [event["type"] for event in receiver.events()] == [
        "journey.entered", "message.sent", "message.sent", "journey.completed",
    ]
    headers, body = receiver.requests[1]
    assert verify_signature(SECRET, headers["x-bisik-signature"], body)
    assert headers["x-bisik-event"] == "message.sent"
    assert receiver.events()[1]["data"]["template"] == "cart_reminder_1"
    assert {row["status"] for row in await deliveries(pool)} == {"delivered"}


async def test_goal_exit_posted_as_converted(
    journeys: JourneyHarness, webhook_settings: Settings, receiver: Receiver, pool: asyncpg.Pool
) -> None:
    await journeys.customer("hook-2")
    start = await journeys.now()
    handle = await journeys.deliver("abandoned_cart", await journeys.event("hook-2", "Product Added", start, **SHOES))
    await handle.signal("event", await journeys.event("hook-2", "Order Completed", start + timedelta(minutes=5), order_id="o"))
    await handle.result()

    await WebhookDispatcher(pool, webhook_settings).deliver_due()

    types = [event["type"] for event in receiver.events() if event["data"].get("journey") == "abandoned_cart"]
    assert types[-1] == "journey.converted"


async def test_failing_receiver_retried_with_backoff(
    journeys: JourneyHarness, webhook_settings: Settings, receiver: Receiver, pool: asyncpg.Pool
) -> None:
    receiver.statuses = [500]
    await journeys.customer("hook-3")
    await journeys.deliver("abandoned_cart", await journeys.event("hook-3", "Product Added", **SHOES))
    dispatcher = WebhookDispatcher(pool, webhook_settings)
    await journeys.env.sleep(timedelta(seconds=1))

    await dispatcher.deliver_due()
    [failed] = await pool.fetch("SELECT * FROM webhook_deliveries WHERE attempts = 1 AND status = 'pending'")
    await pool.execute("UPDATE webhook_deliveries SET next_attempt_at = now() WHERE id = $1", failed["id"])
    await dispatcher.deliver_due()

    [retried] = await pool.fetch("SELECT * FROM webhook_deliveries WHERE id = $1", failed["id"])
    assert failed["last_error"] == "receiver answered 500"
    assert failed["next_attempt_at"] > failed["created_at"]
    assert retried["status"] == "delivered"
    assert retried["attempts"] == 2


async def test_dead_receiver_never_blocks_journey(
    journeys: JourneyHarness, settings: Settings, pool: asyncpg.Pool
) -> None:
    settings.webhook_url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    settings.webhook_secret = SecretStr(SECRET)
    settings.allow_private_urls = True
    customer = await journeys.customer("hook-4")

    result = await (await journeys.deliver("abandoned_cart", await journeys.event("hook-4", "Product Added", **SHOES))).result()
    await WebhookDispatcher(pool, settings).deliver_due()

    assert result.outcome == "completed"
    assert len(await journeys.messages(customer)) == 2
    rows = await deliveries(pool)
    assert {row["status"] for row in rows} == {"pending"}
    assert all(row["attempts"] == 1 for row in rows)
    assert all("ConnectError" in row["last_error"] for row in rows)


async def test_gives_up_after_max_attempts(
    journeys: JourneyHarness, webhook_settings: Settings, receiver: Receiver, pool: asyncpg.Pool
) -> None:
    webhook_settings.webhook_max_attempts = 2
    receiver.statuses = [503] * 10
    await journeys.customer("hook-5")
    await journeys.deliver("abandoned_cart", await journeys.event("hook-5", "Product Added", **SHOES))
    await journeys.env.sleep(timedelta(seconds=1))
    dispatcher = WebhookDispatcher(pool, webhook_settings)

    await dispatcher.deliver_due()
    await pool.execute("UPDATE webhook_deliveries SET next_attempt_at = now()")
    await dispatcher.deliver_due()

    [row] = await deliveries(pool)
    assert row["status"] == "failed"
    assert row["attempts"] == 2


async def test_private_address_rejected_unless_allowed() -> None:
    with pytest.raises(UnsafeUrlError, match="private or loopback"):
        await check_public_url("http://127.0.0.1:9/hook", allow_private=False)
    with pytest.raises(UnsafeUrlError, match="private or loopback"):
        await check_public_url("http://169.254.169.254/latest/meta-data", allow_private=False)
    with pytest.raises(UnsafeUrlError, match="must start with http"):
        await check_public_url("file:///etc/passwd", allow_private=True)
    await check_public_url("http://127.0.0.1:9/hook", allow_private=True)


def test_webhook_url_requires_secret() -> None:
    with pytest.raises(ValueError, match="BISIK_WEBHOOK_SECRET is required"):
        Settings(_env_file=None, webhook_url="https://crm.example.com/hook")  # type: ignore[call-arg]


def test_signature_rejects_tampered_body() -> None:
    from activities.webhooks import sign

    header = sign(SECRET, 1_700_000_000, b'{"a":1}')

    assert verify_signature(SECRET, header, b'{"a":1}')
    assert not verify_signature(SECRET, header, b'{"a":2}')
    assert not verify_signature("other-secret", header, b'{"a":1}')
