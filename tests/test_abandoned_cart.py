"""Abandoned-cart journey on the time-skipping server, sending real email to an SMTP sink."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.journey_fixtures import JourneyHarness

SHOES = {"product_id": "shoe-1", "name": "Running Shoes", "brand": "Lari", "category": "shoes", "price": 450.5, "quantity": 1}
SOCKS = {"product_id": "sock-7", "name": "Wool Socks", "brand": "Hangat", "category": "socks", "price": 25.0, "quantity": 2}


def hours_between(later, earlier) -> float:  # type: ignore[no-untyped-def]
    return round((later - earlier).total_seconds() / 3600, 2)


async def test_reminders_at_4_and_24_hours(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("cart-1", first_name="Sari")
    start = await journeys.now()
    added = await journeys.event("cart-1", "Product Added", start, **SHOES)

    result = await (await journeys.deliver("abandoned_cart", added)).result()

    assert result.outcome == "completed"
    messages = await journeys.messages(customer)
    assert [row["template"] for row in messages] == ["cart_reminder_1", "cart_reminder_2"]
    assert [row["status"] for row in messages] == ["sent", "sent"]
    assert hours_between(messages[0]["step_at"], start) == 4
    assert hours_between(messages[1]["step_at"], start) == 24
    first, second = journeys.mail_to("cart-1@example.com")
    assert first.subject == "Sari, you left something in your cart"
    assert "Running Shoes" in first.text()
    assert "$450.50" in first.text()
    assert "Total: $450.50" in first.text()
    assert "FREESHIP-" in second.text()
    assert "free shipping" in second.subject.lower()


async def test_no_reminder_when_order_comes_at_3_hours(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("cart-2")
    start = await journeys.now()
    handle = await journeys.deliver("abandoned_cart", await journeys.event("cart-2", "Product Added", start, **SHOES))

    await journeys.env.sleep(timedelta(hours=3))
    order = await journeys.event("cart-2", "Order Completed", start + timedelta(hours=3), order_id="o-2")
    await handle.signal("event", order)
    result = await handle.result()

    assert result.outcome == "exited"
    assert result.reason == "goal reached: Order Completed"
    assert await journeys.messages(customer) == []
    assert journeys.mail_to("cart-2@example.com") == []


async def test_late_order_still_cancels_reminder(journeys: JourneyHarness) -> None:
    # The order was placed 20 minutes after the cart and stored, but its event has not
    # reached the journey when the reminder falls due (the relay was behind, say).
    customer = await journeys.customer("cart-3")
    start = await journeys.now()
    handle = await journeys.deliver("abandoned_cart", await journeys.event("cart-3", "Product Added", start, **SHOES))
    await journeys.event("cart-3", "Order Completed", start + timedelta(minutes=20), order_id="o-3")

    result = await handle.result()

    assert result.outcome == "exited"
    assert result.reason == "goal reached: Order Completed"
    [skipped] = await journeys.messages(customer)
    assert skipped["status"] == "skipped"
    assert skipped["reason"] == "goal reached: Order Completed"
    assert journeys.mail_to("cart-3@example.com") == []


async def test_order_from_before_the_cart_does_not_cancel(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("cart-4")
    start = await journeys.now()
    await journeys.event("cart-4", "Order Completed", start - timedelta(days=2), order_id="old")
    handle = await journeys.deliver("abandoned_cart", await journeys.event("cart-4", "Product Added", start, **SHOES))

    await journeys.env.sleep(timedelta(hours=1))
    await handle.signal("event", await journeys.event("cart-4", "Order Completed", start - timedelta(days=1), order_id="older"))
    result = await handle.result()

    assert result.outcome == "completed"
    assert len(await journeys.messages(customer)) == 2


async def test_cart_follows_adds_and_removes(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("cart-5")
    start = await journeys.now()
    handle = await journeys.deliver("abandoned_cart", await journeys.event("cart-5", "Product Added", start, **SHOES))

    for minutes, name, properties in [
        (10, "Product Added", SOCKS),
        (20, "Product Added", SHOES),
        (30, "Product Removed", {"product_id": "sock-7"}),
        (40, "Product Added", {**SOCKS, "quantity": 1}),
        (50, "Product Removed", {"product_id": "shoe-1", "quantity": 1}),
    ]:
        await handle.signal("event", await journeys.event("cart-5", name, start + timedelta(minutes=minutes), **properties))
    await handle.result()

    state = await handle.query("journey_state")
    items = state["cart"]["items"]
    assert {product_id: item["quantity"] for product_id, item in items.items()} == {"shoe-1": 1, "sock-7": 1}
    [first, _] = await journeys.messages(customer)
    assert hours_between(first["step_at"], start) == pytest.approx(4 + 50 / 60, abs=0.01)
    text = journeys.mail_to("cart-5@example.com")[0].text()
    assert "Running Shoes: $450.50" in text
    assert "Wool Socks: $25.00" in text
    assert "Total: $475.50" in text


async def test_emptied_cart_exits_without_reminder(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("cart-6")
    start = await journeys.now()
    handle = await journeys.deliver("abandoned_cart", await journeys.event("cart-6", "Product Added", start, **SHOES))
    await handle.signal("event", await journeys.event("cart-6", "Product Removed", start + timedelta(minutes=5), product_id="shoe-1"))

    result = await handle.result()

    assert result.outcome == "exited"
    assert result.reason == "cart emptied"
    assert await journeys.messages(customer) == []


async def test_duplicate_event_id_changes_nothing(journeys: JourneyHarness) -> None:
    await journeys.customer("cart-7")
    start = await journeys.now()
    added = await journeys.event("cart-7", "Product Added", start, **SHOES)
    handle = await journeys.deliver("abandoned_cart", added)

    await handle.signal("event", added)
    await journeys.deliver("abandoned_cart", added)
    await handle.result()

    state = await handle.query("journey_state")
    assert state["cart"]["items"]["shoe-1"]["quantity"] == 1
    assert "Total: $450.50" in journeys.mail_to("cart-7@example.com")[0].text()


async def test_first_signal_of_signal_with_start_is_first_item(journeys: JourneyHarness) -> None:
    await journeys.customer("cart-8")
    added = await journeys.event("cart-8", "Product Added", **SOCKS)

    handle = await journeys.deliver("abandoned_cart", added)
    await handle.result()

    assert "Wool Socks x 2: $50.00" in journeys.mail_to("cart-8@example.com")[0].text()


async def test_no_new_entry_within_24_hours_of_a_reminder(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("cart-9")
    start = await journeys.now()
    first = await journeys.deliver("abandoned_cart", await journeys.event("cart-9", "Product Added", start, **SHOES))
    # Skip time by hand: awaiting a result lets the test server jump past other tests' timers too.
    await journeys.env.sleep(timedelta(hours=24, minutes=1))
    assert (await first.describe()).status.name == "COMPLETED"

    # Reminder 2 went out at 24 h; a new cart at 30 h may not start the journey again.
    await journeys.env.sleep(timedelta(hours=6))
    blocked = await journeys.deliver("abandoned_cart", await journeys.event("cart-9", "Product Added", **SOCKS))
    await journeys.env.sleep(timedelta(minutes=1))
    blocked_run = await journeys.pool.fetchrow(
        "SELECT status, reason FROM journey_runs WHERE customer_id = $1 ORDER BY id DESC LIMIT 1", customer
    )
    await journeys.env.sleep(timedelta(hours=20))
    allowed = await (await journeys.deliver("abandoned_cart", await journeys.event("cart-9", "Product Added", **SOCKS))).result()

    assert (await blocked.describe()).status.name == "COMPLETED"
    assert blocked_run["status"] == "exited"
    assert blocked_run["reason"].startswith("re-entry not allowed: last message of this journey at")
    assert allowed.outcome == "completed"
    assert [row["template"] for row in await journeys.messages(customer)] == [
        "cart_reminder_1", "cart_reminder_2", "cart_reminder_1", "cart_reminder_2",
    ]


async def test_indonesian_locale_gets_indonesian_reminder(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("cart-10", first_name="Budi", locale="id-ID")
    await (await journeys.deliver("abandoned_cart", await journeys.event("cart-10", "Product Added", **SHOES))).result()

    first = journeys.mail_to("cart-10@example.com")[0]
    assert first.subject == "Kak Budi, keranjangmu masih nungguin nih 🛒"
    assert [row["locale"] for row in await journeys.messages(customer)] == ["id", "id"]


async def test_cart_without_product_ids_exits(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("cart-11")
    start = await journeys.now()
    added = await journeys.event("cart-11", "Product Added", start, name="Mystery item", price=9.99)

    result = await (await journeys.deliver("abandoned_cart", added)).result()

    assert result.outcome == "exited"
    assert result.reason == "no product in the cart"
    assert await journeys.messages(customer) == []
    assert journeys.mail_to("cart-11@example.com") == []
