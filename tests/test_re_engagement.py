"""Re-engagement journey on the time-skipping server, sending real email to an SMTP sink."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from activities.suppressions import SuppressionStore
from activities.templates import TemplateRenderer
from bisik.models import JourneyEvent, JourneyInput, JourneyResult
from tests.helpers import store_call
from tests.journey_fixtures import JourneyHarness
from workers.relay import journey_workflow_id
from workflows.registry import RoutingIndex

ORDER = {"order_id": "o-1", "total": 120.0, "currency": "USD"}
OFFER_CODE = re.compile(r"COMEBACK-[A-Z2-9]{6}")


def days_between(later: datetime, earlier: datetime) -> float:
    return round((later - earlier).total_seconds() / 86400, 3)


async def sunset_customer(journeys: JourneyHarness, user_id: str, **traits: object) -> str:
    """Run a watcher for a customer who stays away until it sunsets them; return the customer id."""
    customer = await journeys.customer(user_id, **traits)
    order = await journeys.event(user_id, "Order Completed", **ORDER)
    result = await (await journeys.deliver("re_engagement", order)).result()
    assert result.outcome == "completed"
    return customer


async def test_offer_after_90_quiet_days_then_last_call(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("quiet-1", first_name="Sari")
    start = await journeys.now()
    order = await journeys.event("quiet-1", "Order Completed", start, **ORDER)

    result = await (await journeys.deliver("re_engagement", order)).result()

    assert result.outcome == "completed"
    offer, last_call = await journeys.messages(customer)
    assert offer["template"] == "re_engagement_offer"
    assert offer["step"] == "offer:1"
    assert offer["status"] == "sent"
    assert days_between(offer["step_at"], start) == 90
    assert last_call["template"] == "re_engagement_last_call"
    assert last_call["status"] == "sent"
    assert days_between(last_call["step_at"], start) == 104
    offer_mail, last_mail = journeys.mail_to("quiet-1@example.com")
    assert offer_mail.subject == "We miss you, Sari! Here's 15% off"
    assert offer_mail.text().startswith("Hi Sari,")
    code = OFFER_CODE.search(offer_mail.text())
    assert code is not None
    assert last_mail.subject == "Sari, this is our last offer for now"
    assert code.group() in last_mail.text()


async def test_customer_sunset_after_last_call(journeys: JourneyHarness) -> None:
    customer = await sunset_customer(journeys, "quiet-2")

    [suppression] = await journeys.pool.fetch(
        "SELECT channel, topic, reason, source FROM suppressions WHERE customer_id = $1", customer
    )
    assert suppression["channel"] == "all"
    assert suppression["topic"] is None
    assert suppression["reason"] == "sunset"
    assert suppression["source"] == "re_engagement"
    run = await journeys.pool.fetchrow("SELECT status, reason FROM journey_runs WHERE customer_id = $1", customer)
    assert run["status"] == "completed"


async def test_signed_up_starts_watcher(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("quiet-3")
    start = await journeys.now()

    handle = await journeys.deliver("re_engagement", await journeys.event("quiet-3", "Signed Up", start))
    await handle.result()

    offer = (await journeys.messages(customer))[0]
    assert offer["template"] == "re_engagement_offer"
    assert days_between(offer["step_at"], start) == 90


async def test_activity_on_day_60_pushes_the_check_to_day_150(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("quiet-4")
    start = await journeys.now()
    handle = await journeys.deliver("re_engagement", await journeys.event("quiet-4", "Order Completed", start, **ORDER))

    await journeys.env.sleep(timedelta(days=60))
    # No journey wants a product view, so it reaches no workflow. It only raises last_seen_at.
    await journeys.event("quiet-4", "Product Viewed", start + timedelta(days=60), product_id="shoe-1")
    await journeys.env.sleep(timedelta(days=31))
    messages_on_day_91 = await journeys.messages(customer)
    await handle.result()

    assert messages_on_day_91 == []
    offer, last_call = await journeys.messages(customer)
    assert days_between(offer["step_at"], start) == 150
    assert days_between(last_call["step_at"], start) == 164


async def test_page_view_raises_last_seen_without_signal(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("quiet-5")
    start = await journeys.now()
    handle = await journeys.deliver("re_engagement", await journeys.event("quiet-5", "Order Completed", start, **ORDER))

    await journeys.env.sleep(timedelta(days=45))
    await store_call(
        journeys.pool,
        {"type": "page", "userId": "quiet-5", "name": "Home", "timestamp": (start + timedelta(days=45)).isoformat()},
    )
    await handle.result()

    offer = (await journeys.messages(customer))[0]
    assert days_between(offer["step_at"], start) == 135


async def test_return_within_14_days_skips_last_call(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("quiet-6")
    start = await journeys.now()
    handle = await journeys.deliver("re_engagement", await journeys.event("quiet-6", "Order Completed", start, **ORDER))

    # The customer clicks the offer five days after it went out.
    await journeys.env.sleep(timedelta(days=95))
    await journeys.event("quiet-6", "Email Link Clicked", start + timedelta(days=95), url="https://shop.example.com")
    await journeys.env.sleep(timedelta(days=10))
    status_on_day_105 = (await handle.describe()).status
    result = await handle.result()

    assert status_on_day_105 is not None
    assert status_on_day_105.name == "RUNNING"
    assert result.outcome == "completed"
    messages = await journeys.messages(customer)
    assert [row["step"] for row in messages] == ["offer:1", "offer:2", "last_call:2"]
    assert [days_between(row["step_at"], start) for row in messages] == [90, 185, 199]
    first_offer, second_offer, _ = journeys.mail_to("quiet-6@example.com")
    first_code = OFFER_CODE.search(first_offer.text())
    second_code = OFFER_CODE.search(second_offer.text())
    assert first_code is not None
    assert second_code is not None
    assert first_code.group() != second_code.group()


async def test_the_sunset_customer_gets_no_more_marketing(journeys: JourneyHarness) -> None:
    customer = await sunset_customer(journeys, "quiet-7")
    mail_before = len(journeys.mail_to("quiet-7@example.com"))

    added = await journeys.event("quiet-7", "Product Added", product_id="shoe-1", name="Running Shoes", price=450.5)
    cart = await (await journeys.deliver("abandoned_cart", added)).result()

    assert cart.outcome == "exited"
    assert cart.reason == "suppressed: sunset"
    [reminder] = [row for row in await journeys.messages(customer) if row["journey"] == "abandoned_cart"]
    assert reminder["status"] == "suppressed"
    assert reminder["reason"] == "sunset"
    assert reminder["attempts"] == 1
    assert mail_before == 2
    assert len(journeys.mail_to("quiet-7@example.com")) == 2


async def test_sunset_customer_still_gets_order_email(journeys: JourneyHarness) -> None:
    customer = await sunset_customer(journeys, "quiet-8")

    order = await journeys.event("quiet-8", "Order Completed", **{**ORDER, "order_id": "o-2"})
    await (await journeys.deliver("post_purchase", order)).result()

    by_template = {row["template"]: row["status"] for row in await journeys.messages(customer)}
    assert by_template["order_thank_you"] == "sent"
    assert by_template["review_request"] == "suppressed"


async def test_sunset_customer_who_buys_again_gets_new_watcher(journeys: JourneyHarness) -> None:
    customer = await sunset_customer(journeys, "quiet-9")
    first_run = await journeys.pool.fetchval("SELECT run_id FROM journey_runs WHERE customer_id = $1", customer)
    again_at = await journeys.now()

    order = await journeys.event("quiet-9", "Order Completed", again_at, **{**ORDER, "order_id": "o-2"})
    result = await (await journeys.deliver("re_engagement", order)).result()

    assert result.outcome == "exited"
    assert result.reason == "suppressed: sunset"
    runs = await journeys.pool.fetch(
        "SELECT run_id, status FROM journey_runs WHERE customer_id = $1 ORDER BY id", customer
    )
    assert [run["status"] for run in runs] == ["completed", "exited"]
    assert runs[1]["run_id"] != first_run
    offer = (await journeys.messages(customer))[-1]
    assert offer["template"] == "re_engagement_offer"
    assert offer["status"] == "suppressed"
    assert days_between(offer["step_at"], again_at) == 90
    assert len(journeys.mail_to("quiet-9@example.com")) == 2


async def test_order_reaches_the_running_watcher(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("quiet-10")
    start = await journeys.now()
    first = await journeys.deliver("re_engagement", await journeys.event("quiet-10", "Order Completed", start, **ORDER))
    first_run = (await first.describe()).run_id

    await journeys.env.sleep(timedelta(days=40))
    second_order = await journeys.event("quiet-10", "Order Completed", start + timedelta(days=40), **{**ORDER, "order_id": "o-2"})
    second = await journeys.deliver("re_engagement", second_order)
    await journeys.env.sleep(timedelta(minutes=1))

    assert (await second.describe()).run_id == first_run
    assert await second.query("pending_event_ids") == []
    await second.result()
    runs = await journeys.pool.fetchval("SELECT count(*) FROM journey_runs WHERE customer_id = $1", customer)
    assert runs == 1
    offer = (await journeys.messages(customer))[0]
    assert days_between(offer["step_at"], start) == 130


async def test_unsubscribe_while_waiting_stops_offer(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("quiet-11")
    start = await journeys.now()
    handle = await journeys.deliver("re_engagement", await journeys.event("quiet-11", "Order Completed", start, **ORDER))

    await journeys.env.sleep(timedelta(days=30))
    await SuppressionStore(journeys.pool).suppress(customer, channel="email", reason="unsubscribed", source="link")
    await journeys.env.sleep(timedelta(days=60, minutes=1))

    assert (await handle.describe()).status.name == "COMPLETED"
    result = await handle.result()
    assert result.outcome == "exited"
    assert result.reason == "suppressed: unsubscribed"
    [offer] = await journeys.messages(customer)
    assert offer["template"] == "re_engagement_offer"
    assert offer["status"] == "suppressed"
    assert offer["attempts"] == 1
    assert days_between(offer["step_at"], start) == 90
    assert journeys.mail_to("quiet-11@example.com") == []
    sunset = await journeys.pool.fetchval(
        "SELECT count(*) FROM suppressions WHERE customer_id = $1 AND reason = 'sunset'", customer
    )
    assert sunset == 0


async def test_customer_without_email_not_sunset(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("quiet-12", email=None)

    handle = await journeys.deliver("re_engagement", await journeys.event("quiet-12", "Order Completed", **ORDER))
    result = await handle.result()

    assert result.outcome == "exited"
    assert result.reason == "offer not sent: skipped: no email address"
    assert [row["status"] for row in await journeys.messages(customer)] == ["skipped"]
    suppressions = await journeys.pool.fetchval("SELECT count(*) FROM suppressions WHERE customer_id = $1", customer)
    assert suppressions == 0


async def test_a_journey_that_continued_as_new_while_waiting_still_sends_on_schedule(
    journeys: JourneyHarness,
) -> None:
    customer = await journeys.customer("quiet-13")
    start = await journeys.now()
    first_order = await journeys.event("quiet-13", "Order Completed", start, **ORDER)
    handle = await journeys.env.client.start_workflow(
        "re_engagement",
        JourneyInput(customer_id=customer, journey="re_engagement", history_limit=100),
        id=journey_workflow_id("re_engagement", customer),
        task_queue=journeys.worker.task_queue,
        start_signal="event",
        start_signal_args=[first_order],
        result_type=JourneyResult,
    )
    first_run = (await handle.describe()).run_id

    # An order every 30 days for a year: each reaches the running watcher as a signal.
    last_activity = start
    for month in range(1, 13):
        await journeys.env.sleep(timedelta(days=30))
        last_activity = start + timedelta(days=30 * month)
        order = await journeys.event("quiet-13", "Order Completed", last_activity, **{**ORDER, "order_id": f"o-{month}"})
        await handle.signal("event", order)
    await journeys.env.sleep(timedelta(days=90, minutes=1))

    run_after_offer = (await handle.describe()).run_id
    messages_after_offer = await journeys.messages(customer)
    # Let the run finish, so no timer of it is left on the shared test server.
    result = await handle.result()

    assert run_after_offer != first_run
    [offer] = messages_after_offer
    assert offer["template"] == "re_engagement_offer"
    assert abs(offer["step_at"] - (last_activity + timedelta(days=90))) < timedelta(seconds=5)
    assert result.outcome == "completed"
    assert [row["step"] for row in await journeys.messages(customer)] == ["offer:1", "last_call:1"]
    assert len(journeys.mail_to("quiet-13@example.com")) == 2


def routed_event(event_type: str, name: str) -> JourneyEvent:
    at = datetime(2026, 12, 4, tzinfo=UTC)
    return JourneyEvent(
        id=1, message_id="m-1", type=event_type, name=name, customer_id="cus_1", timestamp=at, received_at=at  # type: ignore[arg-type]
    )


def test_page_views_not_routed_to_watcher() -> None:
    index = RoutingIndex()

    page_routes = index.routes(routed_event("page", "Home"))
    order_routes = index.routes(routed_event("track", "Order Completed"))

    assert "re_engagement" not in [route.journey.name for route in page_routes]
    assert [route.starts for route in order_routes if route.journey.name == "re_engagement"] == [True]


async def test_indonesian_customer_gets_indonesian_offer(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("quiet-14", first_name="Dewi", locale="id-ID")

    await (await journeys.deliver("re_engagement", await journeys.event("quiet-14", "Signed Up"))).result()

    offer_mail, last_mail = journeys.mail_to("quiet-14@example.com")
    assert offer_mail.subject == "Kak Dewi, kangen nih! Ada diskon 15% buat kamu 🎁"
    assert offer_mail.text().startswith("Hai Kak Dewi!")
    assert last_mail.subject == "Kak Dewi, ini promo terakhir dari kami 👋"
    assert [row["locale"] for row in await journeys.messages(customer)] == ["id", "id"]


@pytest.mark.parametrize("locale", ["en", "id"])
@pytest.mark.parametrize("template", ["re_engagement_offer", "re_engagement_last_call"])
@pytest.mark.parametrize("first_name", ["Budi", None])
def test_templates_render_with_code_and_unsubscribe(template: str, locale: str, first_name: str | None) -> None:
    context = {
        "brand_name": "Toko Bisik",
        "shop_url": "https://shop.example.com",
        "public_url": "http://127.0.0.1:8000",
        "unsubscribe_url": "http://127.0.0.1:8000/u/token",
        "transactional": False,
        "customer": {"first_name": first_name, "email": "budi@example.com", "traits": {}},
        "offer_code": "COMEBACK-ABC234",
        "discount_percent": 15,
    }

    message = TemplateRenderer().render(template, locale, context)

    assert "None" not in message.subject + message.text + message.html
    assert "COMEBACK-ABC234" in message.text
    assert "COMEBACK-ABC234" in message.html
    assert "15%" in message.text
    assert message.text.rstrip().endswith("http://127.0.0.1:8000/u/token")


def test_indonesian_offer_greets_without_first_name() -> None:
    context = {
        "brand_name": "Toko Bisik",
        "shop_url": "https://shop.example.com",
        "public_url": "http://127.0.0.1:8000",
        "unsubscribe_url": None,
        "transactional": False,
        "customer": {"first_name": None, "email": None, "traits": {}},
        "offer_code": "COMEBACK-ABC234",
        "discount_percent": 15,
    }

    message = TemplateRenderer().render("re_engagement_offer", "id", context)

    assert message.subject == "Kangen nih! Ada diskon 15% buat kamu 🎁"
    assert message.text.startswith("Hai Kak!")
