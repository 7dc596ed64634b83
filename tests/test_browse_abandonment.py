"""Browse-abandonment journey: time-skipping tests with real PostgreSQL and SMTP, and one test
through the HTTP API, the outbox relay and Temporal's dev server."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg
import httpx
import pytest
from temporalio.client import Client

from activities.catalog import CatalogStore, ProductRow
from activities.messaging import MessagingActivities
from activities.suppressions import SuppressionStore
from activities.templates import TemplateRenderer
from bisik.models import JourneyEvent, SendRequest
from bisik.settings import Settings
from tests.conftest import ApiServer, RunningWorker
from tests.helpers import assert_eventually, click_targets
from tests.journey_fixtures import JourneyHarness
from workers.stack import MailSink
from workflows.browse_abandonment import QUALIFYING_VIEW
from workflows.registry import RoutingIndex

JOURNEY = "browse_abandonment"
SHOES = {
    "product_id": "shoe-1",
    "name": "Running Shoes",
    "brand": "Lari",
    "category": "shoes",
    "price": 450.5,
    "currency": "USD",
    "url": "https://shop.example.com/p/shoe-1",
    "image_url": "https://cdn.example.com/shoe-1.jpg",
}
TOTE = {"product_id": "bag-1", "name": "Canvas Tote", "category": "bags", "price": 35.0, "currency": "USD", "url": "https://shop.example.com/p/bag-1"}
CAP = {"product_id": "cap-1", "name": "Sun Cap", "category": "hats", "price": 15.0, "currency": "USD"}
SCARF = {"product_id": "scarf-1", "name": "Silk Scarf", "category": "scarves", "price": 60.0, "currency": "USD"}


def hours_between(later: datetime, earlier: datetime) -> float:
    return round((later - earlier).total_seconds() / 3600, 2)


async def import_products(pool: asyncpg.Pool, *rows: dict) -> None:
    await CatalogStore(pool).import_products([ProductRow.model_validate(row) for row in rows])


async def view_twice(journeys: JourneyHarness, user_id: str, product: dict, at: datetime) -> JourneyEvent:
    """Store a view an hour before `at` and one at `at`, and return the second, which qualifies."""
    await journeys.event(user_id, "Product Viewed", at - timedelta(hours=1), **product)
    return await journeys.event(user_id, "Product Viewed", at, **product)


async def last_run(journeys: JourneyHarness, customer_id: str) -> asyncpg.Record:
    return await journeys.pool.fetchrow(
        "SELECT status, reason FROM journey_runs WHERE customer_id = $1 AND journey = $2 ORDER BY id DESC LIMIT 1",
        customer_id,
        JOURNEY,
    )


def text_of(mail) -> str:  # type: ignore[no-untyped-def]
    """Return the plain-text part with the line endings it had before SMTP made them CRLF."""
    return mail.text().replace("\r\n", "\n")


def listed(text: str, name: str) -> int:
    """Count the lines of a plain-text email that list product `name`."""
    return sum(line.startswith(f"- {name}:") for line in text.splitlines())


# Trigger


async def test_second_view_within_24_hours_qualifies(journeys: JourneyHarness) -> None:
    await journeys.customer("browse-1")
    start = await journeys.now()

    first = await journeys.event("browse-1", "Product Viewed", start - timedelta(hours=23), **SHOES)
    second = await journeys.event("browse-1", "Product Viewed", start, **SHOES)
    next_day = await journeys.event("browse-1", "Product Viewed", start + timedelta(hours=25), **SHOES)
    other_product = await journeys.event("browse-1", "Product Viewed", start + timedelta(hours=25, minutes=1), **TOTE)

    assert first.derived["product_views_24h"] == 1
    assert second.derived["product_views_24h"] == 2
    assert next_day.derived["product_views_24h"] == 1
    assert other_product.derived["product_views_24h"] == 1
    assert not QUALIFYING_VIEW.matches(first)
    assert QUALIFYING_VIEW.matches(second)
    assert not QUALIFYING_VIEW.matches(next_day)


async def test_only_qualifying_view_is_routed(journeys: JourneyHarness) -> None:
    await journeys.customer("browse-2")
    start = await journeys.now()
    index = RoutingIndex()

    first = await journeys.event("browse-2", "Product Viewed", start - timedelta(minutes=5), **SHOES)
    second = await journeys.event("browse-2", "Product Viewed", start, **SHOES)

    assert JOURNEY not in [route.journey.name for route in index.routes(first)]
    assert [(route.journey.name, route.starts) for route in index.routes(second) if route.journey.name == JOURNEY] == [(JOURNEY, True)]


# The email


async def test_email_a_day_after_second_view(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-3", first_name="Sari")
    start = await journeys.now()
    await import_products(
        journeys.pool,
        {"product_id": "shoe-2", "name": "Trail Shoes", "category": "shoes", "price": "520", "currency": "USD", "stock": 5, "image_url": "https://cdn.example.com/shoe-2.jpg"},
        {"product_id": "shoe-3", "name": "Canvas Sneakers", "category": "shoes", "price": "80", "currency": "USD"},
        {"product_id": "shoe-4", "name": "Leather Boots", "category": "shoes", "price": "900", "currency": "USD", "stock": 0},
        {"product_id": "shoe-5", "name": "Beach Slippers", "category": "shoes", "price": "20", "currency": "USD", "stock": 40},
        {"product_id": "bag-9", "name": "Gym Bag", "category": "bags", "price": "45", "currency": "USD", "stock": 3},
    )
    await journeys.event("browse-3", "Order Completed", start - timedelta(days=30), order_id="o-old", products=[{"product_id": "shoe-5", "name": "Beach Slippers", "price": 20}])

    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-3", SHOES, start))
    result = await handle.result()

    assert result.outcome == "completed"
    [message] = await journeys.messages(customer)
    assert message["template"] == "browse_abandonment"
    assert message["step"] == "email"
    assert message["status"] == "sent"
    assert hours_between(message["step_at"], start) == 24
    [mail] = journeys.mail_to("browse-3@example.com")
    assert mail.subject == "Sari, still thinking about Running Shoes?"
    assert mail.header("X-Bisik-Journey") == JOURNEY
    text = text_of(mail)
    assert text.startswith("Hi Sari,")
    assert listed(text, "Running Shoes") == 1
    assert "- Running Shoes: $450.50\n  https://shop.example.com/p/shoe-1" in text
    assert "- Trail Shoes: $520.00" in text
    assert "- Canvas Sneakers: $80.00" in text
    assert "Unsubscribe here:" in text
    html = mail.html()
    assert '<img src="https://cdn.example.com/shoe-1.jpg"' in html
    assert '<img src="https://cdn.example.com/shoe-2.jpg"' in html
    assert "https://shop.example.com/p/shoe-1" in click_targets(html, Settings(_env_file=None).secret_key.get_secret_value())  # type: ignore[call-arg]


async def test_similar_products_skip_sold_out_and_bought(journeys: JourneyHarness) -> None:
    await journeys.customer("browse-4")
    start = await journeys.now()
    await import_products(
        journeys.pool,
        {"product_id": "shoe-4", "name": "Leather Boots", "category": "shoes", "price": "900", "currency": "USD", "stock": 0},
        {"product_id": "shoe-5", "name": "Beach Slippers", "category": "shoes", "price": "20", "currency": "USD", "stock": 40},
        {"product_id": "shoe-6", "name": "Ballet Flats", "category": "shoes", "price": "60", "currency": "USD", "stock": 2},
        {"product_id": "bag-9", "name": "Gym Bag", "category": "bags", "price": "45", "currency": "USD", "stock": 3},
    )
    # Bought by its SKU only, as some shops send order lines.
    await journeys.event("browse-4", "Order Completed", start - timedelta(days=30), order_id="o-1", products=[{"sku": "shoe-5", "name": "Beach Slippers", "price": 20}])

    await (await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-4", SHOES, start))).result()

    text = text_of(journeys.mail_to("browse-4@example.com")[0])
    assert listed(text, "Ballet Flats") == 1
    assert listed(text, "Leather Boots") == 0
    assert listed(text, "Beach Slippers") == 0
    assert listed(text, "Gym Bag") == 0


async def test_at_most_three_similar_products(journeys: JourneyHarness) -> None:
    await journeys.customer("browse-5")
    start = await journeys.now()
    await import_products(
        journeys.pool,
        *[{"product_id": f"shoe-{n}", "name": f"Shoe Model {n}", "category": "shoes", "price": "50", "currency": "USD", "stock": 5} for n in range(10, 15)],
        {"product_id": "shoe-20", "name": "Shoe Without Price", "category": "shoes", "stock": 5},
    )

    await (await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-5", SHOES, start))).result()

    text = text_of(journeys.mail_to("browse-5@example.com")[0])
    similar = [line for line in text.splitlines() if line.startswith("- Shoe ")]
    assert len(similar) == 3
    assert listed(text, "Shoe Without Price") == 0


async def test_email_without_similar_products(journeys: JourneyHarness) -> None:
    await journeys.customer("browse-6")

    await (await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-6", CAP, await journeys.now()))).result()

    text = text_of(journeys.mail_to("browse-6@example.com")[0])
    assert text.startswith("Hi there,")
    assert listed(text, "Sun Cap") == 1
    assert "You might also like" not in text


async def test_second_product_joins_email_once(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-7")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-7", SHOES, start))

    await journeys.env.sleep(timedelta(hours=2))
    await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-7", TOTE, start + timedelta(hours=2)))
    # A third view of the first product, and the same qualifying view delivered twice.
    third = await journeys.event("browse-7", "Product Viewed", start + timedelta(hours=2, minutes=5), **SHOES)
    await journeys.deliver(JOURNEY, third)
    await journeys.deliver(JOURNEY, third)
    result = await handle.result()

    assert result.outcome == "completed"
    [message] = await journeys.messages(customer)
    assert hours_between(message["step_at"], start) == 24
    [mail] = journeys.mail_to("browse-7@example.com")
    assert mail.subject == "Still thinking about Running Shoes and 1 more?"
    text = text_of(mail)
    assert listed(text, "Running Shoes") == 1
    assert listed(text, "Canvas Tote") == 1
    assert text.index("- Running Shoes:") < text.index("- Canvas Tote:")


async def test_at_most_three_viewed_products(journeys: JourneyHarness) -> None:
    await journeys.customer("browse-8")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-8", SHOES, start))

    for minutes, product in [(10, TOTE), (20, CAP), (30, SCARF)]:
        await handle.signal("event", await view_twice(journeys, "browse-8", product, start + timedelta(minutes=minutes)))
    await handle.result()

    text = text_of(journeys.mail_to("browse-8@example.com")[0])
    assert listed(text, "Running Shoes") == 1
    assert listed(text, "Canvas Tote") == 1
    assert listed(text, "Sun Cap") == 1
    assert listed(text, "Silk Scarf") == 0


async def test_indonesian_customer_gets_indonesian_email(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-9", first_name="Budi", locale="id-ID")

    await (await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-9", SHOES, await journeys.now()))).result()

    [mail] = journeys.mail_to("browse-9@example.com")
    assert mail.subject == "Kak Budi, masih kepikiran Running Shoes? 👀"
    assert text_of(mail).startswith("Hai Kak Budi!")
    assert "- Running Shoes: US$450,50" in text_of(mail)
    assert [row["locale"] for row in await journeys.messages(customer)] == ["id"]


# Exits


async def test_carted_product_exits_journey(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-10")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-10", SHOES, start))

    await journeys.env.sleep(timedelta(hours=3))
    await handle.signal("event", await journeys.event("browse-10", "Product Added", start + timedelta(hours=3), **SHOES))
    result = await handle.result()

    assert result.outcome == "exited"
    assert result.reason == "viewed products carted or bought"
    assert await journeys.messages(customer) == []
    assert journeys.mail_to("browse-10@example.com") == []


async def test_bought_product_exits_journey(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-11")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-11", SHOES, start))

    await journeys.env.sleep(timedelta(hours=5))
    order = await journeys.event("browse-11", "Order Completed", start + timedelta(hours=5), order_id="o-11", products=[SHOES])
    await handle.signal("event", order)
    result = await handle.result()

    assert result.outcome == "exited"
    assert result.reason == "viewed products carted or bought"
    assert await journeys.messages(customer) == []


async def test_carted_product_left_out_of_email(journeys: JourneyHarness) -> None:
    await journeys.customer("browse-12")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-12", SHOES, start))
    await handle.signal("event", await view_twice(journeys, "browse-12", TOTE, start + timedelta(minutes=30)))

    await journeys.env.sleep(timedelta(hours=2))
    await handle.signal("event", await journeys.event("browse-12", "Product Added", start + timedelta(hours=2), **TOTE))
    # Viewed again after carting it: still not listed.
    await handle.signal("event", await journeys.event("browse-12", "Product Viewed", start + timedelta(hours=2, minutes=1), **TOTE))
    result = await handle.result()

    assert result.outcome == "completed"
    text = text_of(journeys.mail_to("browse-12@example.com")[0])
    assert listed(text, "Running Shoes") == 1
    assert listed(text, "Canvas Tote") == 0


async def test_order_of_other_product_keeps_email(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-13")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-13", SHOES, start))

    await journeys.env.sleep(timedelta(hours=1))
    await handle.signal("event", await journeys.event("browse-13", "Order Completed", start + timedelta(hours=1), order_id="o-13", products=[CAP]))
    result = await handle.result()

    assert result.outcome == "completed"
    assert [row["status"] for row in await journeys.messages(customer)] == ["sent"]


async def test_order_without_product_list_exits(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-14")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-14", SHOES, start))

    await journeys.env.sleep(timedelta(hours=1))
    await handle.signal("event", await journeys.event("browse-14", "Order Completed", start + timedelta(hours=1), order_id="o-14", total=450.5))
    result = await handle.result()

    assert result.outcome == "exited"
    assert result.reason == "order placed without a readable product list"
    assert await journeys.messages(customer) == []


async def test_cart_add_from_before_entry_ignored(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-15")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-15", SHOES, start))

    # Happened half an hour before the entry, but reaches the journey an hour after it.
    await journeys.env.sleep(timedelta(hours=1))
    await handle.signal("event", await journeys.event("browse-15", "Product Added", start - timedelta(minutes=30), **SHOES))
    result = await handle.result()

    assert result.outcome == "completed"
    assert [row["status"] for row in await journeys.messages(customer)] == ["sent"]


async def test_undelivered_cart_add_exits(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-25")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-25", SHOES, start))

    # Stored at 23 h but still on its way to the journey when the email is due at 24 h.
    await journeys.env.sleep(timedelta(hours=23))
    await journeys.event("browse-25", "Product Added", start + timedelta(hours=23), **SHOES)
    result = await handle.result()

    assert result.outcome == "exited"
    assert result.reason == "viewed products carted or bought"
    assert await journeys.messages(customer) == []
    assert journeys.mail_to("browse-25@example.com") == []


async def test_undelivered_order_exits(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-26")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-26", SHOES, start))

    await journeys.env.sleep(timedelta(hours=23))
    await journeys.event("browse-26", "Order Completed", start + timedelta(hours=23), order_id="o-26", products=[CAP, SHOES])
    result = await handle.result()

    assert result.reason == "viewed products carted or bought"
    assert await journeys.messages(customer) == []


async def test_undelivered_cart_add_leaves_product_out(journeys: JourneyHarness) -> None:
    await journeys.customer("browse-29")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-29", SHOES, start))
    await handle.signal("event", await view_twice(journeys, "browse-29", TOTE, start + timedelta(minutes=30)))

    await journeys.env.sleep(timedelta(hours=23))
    await journeys.event("browse-29", "Product Added", start + timedelta(hours=23), **TOTE)
    result = await handle.result()

    assert result.outcome == "completed"
    text = text_of(journeys.mail_to("browse-29@example.com")[0])
    assert listed(text, "Running Shoes") == 1
    assert listed(text, "Canvas Tote") == 0


async def test_undelivered_unlisted_order_exits(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-30")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-30", SHOES, start))

    await journeys.env.sleep(timedelta(hours=23))
    await journeys.event("browse-30", "Order Completed", start + timedelta(hours=23), order_id="o-30", total=450.5)
    result = await handle.result()

    assert result.reason == "order placed without a readable product list"
    assert await journeys.messages(customer) == []


async def test_undelivered_other_order_keeps_email(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-27")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-27", SHOES, start))

    await journeys.env.sleep(timedelta(hours=23))
    await journeys.event("browse-27", "Order Completed", start + timedelta(hours=23), order_id="o-27", products=[CAP])
    await journeys.event("browse-27", "Product Added", start + timedelta(hours=23), **TOTE)
    result = await handle.result()

    assert result.outcome == "completed"
    assert [row["status"] for row in await journeys.messages(customer)] == ["sent"]


async def test_sold_out_product_not_emailed(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-16")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-16", SHOES, start))

    await journeys.env.sleep(timedelta(hours=6))
    await import_products(journeys.pool, {**{key: SHOES[key] for key in ("product_id", "name", "category", "currency")}, "price": "450.5", "stock": 0})
    result = await handle.result()

    assert result.outcome == "exited"
    assert result.reason == "viewed products out of stock or without a price"
    assert await journeys.messages(customer) == []


async def test_unsubscribe_while_waiting_stops_email(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-17")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-17", SHOES, start))

    await journeys.env.sleep(timedelta(hours=8))
    await SuppressionStore(journeys.pool).suppress(customer, channel="email", reason="unsubscribed", source="link")
    await journeys.env.sleep(timedelta(hours=16, minutes=1))

    assert (await handle.describe()).status.name == "COMPLETED"
    [message] = await journeys.messages(customer)
    assert message["status"] == "suppressed"
    assert message["attempts"] == 1
    assert journeys.mail_to("browse-17@example.com") == []
    run = await last_run(journeys, customer)
    assert run["status"] == "exited"
    assert run["reason"] == "suppressed: unsubscribed"


# The contact policy


async def send_newsletter(journeys: JourneyHarness, settings: Settings, customer_id: str, at: datetime) -> None:
    """Send a marketing email from outside this journey, so it takes a frequency-cap slot."""
    request = SendRequest(
        idempotency_key=f"newsletter:{customer_id}",
        customer_id=customer_id,
        journey="newsletter",
        workflow_id=f"newsletter:{customer_id}",
        step="issue",
        template="browse_abandonment",
        data={"products": [{"name": "Tea", "price": 3.0, "quantity": 1, "image_url": None, "url": None}], "similar": [], "currency": "USD"},
        step_at=at,
    )
    result = await MessagingActivities(journeys.pool, settings).send_message(request)
    assert result.status == "sent"


async def test_capped_email_waits_for_slot(journeys: JourneyHarness, settings: Settings) -> None:
    settings.frequency_caps = "email:1/16h"
    customer = await journeys.customer("browse-22")
    start = await journeys.now()
    await send_newsletter(journeys, settings, customer, start + timedelta(hours=20))
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-22", SHOES, start))

    await journeys.env.sleep(timedelta(hours=36, minutes=1))

    assert (await handle.describe()).status.name == "COMPLETED"
    [browse] = [row for row in await journeys.messages(customer) if row["journey"] == JOURNEY]
    assert browse["status"] == "sent"
    assert hours_between(browse["step_at"], start) == 36


async def test_cart_add_while_deferred_skips_email(journeys: JourneyHarness, settings: Settings) -> None:
    settings.frequency_caps = "email:1/16h"
    customer = await journeys.customer("browse-28")
    start = await journeys.now()
    await send_newsletter(journeys, settings, customer, start + timedelta(hours=20))
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-28", SHOES, start))

    # Due at 24 h, deferred to 36 h by the cap; carted at 30 h while the email waits.
    await journeys.env.sleep(timedelta(hours=30))
    await handle.signal("event", await journeys.event("browse-28", "Product Added", start + timedelta(hours=30), **SHOES))
    await journeys.env.sleep(timedelta(hours=6, minutes=1))

    result = await handle.result()
    assert result.reason == "viewed products carted or bought"
    [browse] = [row for row in await journeys.messages(customer) if row["journey"] == JOURNEY]
    assert browse["status"] == "skipped"
    assert browse["reason"] == "listed products carted or bought"
    assert len(journeys.mail_to("browse-28@example.com")) == 1


async def test_email_past_deadline_dropped(journeys: JourneyHarness, settings: Settings) -> None:
    settings.frequency_caps = "email:1/30h"
    customer = await journeys.customer("browse-23")
    start = await journeys.now()
    await send_newsletter(journeys, settings, customer, start + timedelta(hours=20))
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-23", SHOES, start))

    await journeys.env.sleep(timedelta(hours=24, minutes=1))

    assert (await handle.describe()).status.name == "COMPLETED"
    [browse] = [row for row in await journeys.messages(customer) if row["journey"] == JOURNEY]
    assert browse["status"] == "dropped"
    assert "past its deadline" in browse["reason"]
    run = await last_run(journeys, customer)
    assert run["reason"] == "email dropped by the contact policy"
    assert len(journeys.mail_to("browse-23@example.com")) == 1


async def test_cart_reminder_goes_before_browse_email(journeys: JourneyHarness, settings: Settings) -> None:
    settings.frequency_caps = "email:1/16h"
    customer = await journeys.customer("browse-24")
    start = await journeys.now()
    await send_newsletter(journeys, settings, customer, start + timedelta(hours=20))
    browse = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-24", SHOES, start))
    # Both wait for the slot that opens at 36 h: the browse email from 24 h, the cart reminder from 30 h.
    await journeys.env.sleep(timedelta(hours=26))
    await journeys.deliver("abandoned_cart", await journeys.event("browse-24", "Product Added", start + timedelta(hours=26), **TOTE))

    await journeys.env.sleep(timedelta(hours=10, minutes=1))

    assert (await browse.describe()).status.name == "COMPLETED"
    rows = {row["journey"]: row for row in await journeys.messages(customer)}
    assert rows["abandoned_cart"]["status"] == "sent"
    assert hours_between(rows["abandoned_cart"]["step_at"], start) == 36
    assert rows[JOURNEY]["status"] == "dropped"


# Re-entry


async def test_no_new_entry_within_7_days_of_email(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-18")
    start = await journeys.now()
    first = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-18", SHOES, start))
    # Skip time by hand: awaiting a result lets the test server jump past other tests' timers too.
    await journeys.env.sleep(timedelta(hours=24, minutes=1))
    assert (await first.describe()).status.name == "COMPLETED"

    # The email went out at 24 h; two qualifying views on day 3 may not start the journey again.
    await journeys.env.sleep(timedelta(days=2))
    blocked = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-18", TOTE, await journeys.now()))
    await journeys.env.sleep(timedelta(minutes=1))
    blocked_run = await last_run(journeys, customer)
    await journeys.env.sleep(timedelta(days=5, minutes=1))
    allowed = await (await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-18", TOTE, await journeys.now()))).result()

    assert (await blocked.describe()).status.name == "COMPLETED"
    assert blocked_run["status"] == "exited"
    assert blocked_run["reason"].startswith("re-entry not allowed: last message of this journey at")
    assert allowed.outcome == "completed"
    assert [row["status"] for row in await journeys.messages(customer)] == ["sent", "sent"]
    second_mail = journeys.mail_to("browse-18@example.com")[1]
    assert listed(text_of(second_mail), "Canvas Tote") == 1
    assert listed(text_of(second_mail), "Running Shoes") == 0


async def test_new_entry_right_after_cart_exit(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("browse-19")
    start = await journeys.now()
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-19", SHOES, start))
    await journeys.env.sleep(timedelta(hours=1))
    await handle.signal("event", await journeys.event("browse-19", "Product Added", start + timedelta(hours=1), **SHOES))
    await journeys.env.sleep(timedelta(minutes=1))
    assert (await handle.describe()).status.name == "COMPLETED"

    result = await (await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-19", TOTE, await journeys.now()))).result()

    assert result.outcome == "completed"
    assert [row["status"] for row in await journeys.messages(customer)] == ["sent"]


# The catalog


async def test_product_views_keep_catalog_current(journeys: JourneyHarness) -> None:
    await import_products(journeys.pool, {"product_id": "shoe-1", "name": "Running Shoes", "category": "shoes", "price": "450.5", "stock": 7})
    start = await journeys.now()

    await journeys.event("browse-20", "Product Viewed", start, **{**SHOES, "name": "Running Shoes 2027", "price": 399.0})
    await journeys.event("browse-20", "Product Viewed", start + timedelta(minutes=1), product_id="shoe-1", name="Running Shoes 2027")
    await journeys.event("browse-20", "Product Viewed", start, product_id="hat-1", name="Bucket Hat", category="hats", price=25)

    shoe = await journeys.pool.fetchrow("SELECT * FROM products WHERE product_id = 'shoe-1'")
    assert shoe["name"] == "Running Shoes 2027"
    assert shoe["price"] == Decimal("399.00")
    assert shoe["image_url"] == "https://cdn.example.com/shoe-1.jpg"
    assert shoe["product_url"] == "https://shop.example.com/p/shoe-1"
    assert shoe["stock"] == 7
    hat = await journeys.pool.fetchrow("SELECT * FROM products WHERE product_id = 'hat-1'")
    assert hat["category"] == "hats"
    assert hat["stock"] is None


async def test_email_shows_catalog_price_and_image(journeys: JourneyHarness) -> None:
    await journeys.customer("browse-21")
    start = await journeys.now()
    view = {key: value for key, value in SHOES.items() if key not in ("image_url", "price")}
    handle = await journeys.deliver(JOURNEY, await view_twice(journeys, "browse-21", view, start))

    # The shop imports its catalog while the journey waits: a price and an image arrive.
    await journeys.env.sleep(timedelta(hours=2))
    await import_products(journeys.pool, {"product_id": "shoe-1", "name": "Running Shoes", "category": "shoes", "price": "410", "currency": "USD", "image_url": "https://cdn.example.com/new.jpg", "stock": 3})
    await handle.result()

    [mail] = journeys.mail_to("browse-21@example.com")
    assert "- Running Shoes: $410.00" in text_of(mail)
    assert '<img src="https://cdn.example.com/new.jpg"' in mail.html()


# Templates


@pytest.mark.parametrize("locale", ["en", "id"])
def test_template_renders_without_first_name(locale: str) -> None:
    products = [{"product_id": "p1", "name": "Tas <b>Kanvas</b>", "category": "bags", "price": 125000, "quantity": 1, "image_url": None, "url": None}]
    context = {
        "brand_name": "Toko Bisik",
        "shop_url": "https://shop.example.com",
        "public_url": "http://127.0.0.1:8000",
        "unsubscribe_url": "http://127.0.0.1:8000/u/token",
        "transactional": False,
        "customer": {"first_name": None, "email": None, "traits": {}},
        "products": products,
        "similar": [],
        "currency": "IDR",
    }

    message = TemplateRenderer().render("browse_abandonment", locale, context)

    assert message.text.startswith("Hai Kak!" if locale == "id" else "Hi there,")
    assert "None" not in message.subject + message.text + message.html
    assert "Tas &lt;b&gt;Kanvas&lt;/b&gt;" in message.html
    assert "  https://shop.example.com\n" in message.text
    assert "http://127.0.0.1:8000/u/token" in message.text


# Through the API and the dev server


async def test_two_quick_api_views_one_email(
    api_server: ApiServer,
    pool: asyncpg.Pool,
    temporal_client: Client,
    temporal_settings: Settings,
    mail_sink: MailSink,
) -> None:
    """Two views 50 ms apart through two API requests start one journey and one email listing the product once."""
    temporal_settings.time_scale = 86400  # a day is a second
    temporal_settings.smtp_port = mail_sink.port
    worker = RunningWorker(temporal_client, pool, temporal_settings)
    await worker.start()
    try:
        async with api_server.client() as api:
            identified = await api.post("/v1/identify", json={"userId": "api-browser", "traits": {"email": "api-browser@example.com", "first_name": "Ayu"}})
            assert identified.status_code == 200

            async def view(delay: float) -> int:
                await asyncio.sleep(delay)
                response = await api.post("/v1/track", json={"userId": "api-browser", "event": "Product Viewed", "properties": SHOES})
                return response.status_code

            assert await asyncio.gather(view(0), view(0.05)) == [200, 200]

        customer_id = await pool.fetchval("SELECT customer_id FROM identities WHERE kind = 'user_id' AND value = 'api-browser'")
        views = await pool.fetch("SELECT derived FROM events WHERE name = 'Product Viewed' ORDER BY timestamp")
        assert [row["derived"]["product_views_24h"] for row in views] == [1, 2]

        async def email_sent() -> None:
            assert await pool.fetchval("SELECT count(*) FROM messages WHERE journey = $1 AND status = 'sent'", JOURNEY) == 1

        await assert_eventually(email_sent, timeout=30)
        # Two more scaled days: nothing else may arrive.
        await asyncio.sleep(2)

        browse_mail = [mail for mail in mail_sink.messages if mail.header("X-Bisik-Journey") == JOURNEY]
        assert len(browse_mail) == 1
        assert browse_mail[0].recipients == ["api-browser@example.com"]
        assert browse_mail[0].subject == "Ayu, still thinking about Running Shoes?"
        assert listed(text_of(browse_mail[0]), "Running Shoes") == 1
        assert await pool.fetchval("SELECT count(*) FROM messages WHERE journey = $1", JOURNEY) == 1
        assert await pool.fetchval("SELECT count(*) FROM journey_runs WHERE journey = $1", JOURNEY) == 1
        workflow_id = f"{JOURNEY}:{customer_id}"
        runs = [run async for run in temporal_client.list_workflows(f"WorkflowId = '{workflow_id}'")]
        assert len(runs) == 1
        assert runs[0].status.name == "COMPLETED"
    finally:
        await worker.stop()


async def test_carted_product_views_do_not_qualify(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    product = {"product_id": "carted-1", "name": "Kettle", "category": "kitchen", "price": 20.0}
    await api.post("/v1/track", json={"userId": "cart-first", "event": "Product Added", "properties": product})
    for _ in range(2):
        await api.post("/v1/track", json={"userId": "cart-first", "event": "Product Viewed", "properties": product})

    views = await pool.fetch("SELECT derived FROM events WHERE name = 'Product Viewed' ORDER BY id")
    assert [row["derived"] for row in views] == [
        {"product_views_24h": 1, "product_carted_24h": 1},
        {"product_views_24h": 2, "product_carted_24h": 1},
    ]
    routed = await pool.fetch(
        "SELECT e.name FROM outbox o JOIN events e ON e.id = o.event_id ORDER BY o.event_id"
    )
    assert [row["name"] for row in routed] == ["Product Added"]


async def test_views_by_sku_counted(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    for _ in range(2):
        await api.post("/v1/track", json={"userId": "sku-only", "event": "Product Viewed", "properties": {"sku": "SKU-9", "name": "Mug"}})

    views = await pool.fetch("SELECT derived FROM events WHERE name = 'Product Viewed' ORDER BY id")
    assert [row["derived"]["product_views_24h"] for row in views] == [1, 2]
