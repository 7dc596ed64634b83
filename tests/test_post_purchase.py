"""Post-purchase journey on the time-skipping server, sending real email to an SMTP sink."""

from __future__ import annotations

from datetime import timedelta

from tests.journey_fixtures import JourneyHarness

ORDER = {
    "order_id": "o-100",
    "total": 475.5,
    "currency": "USD",
    "products": [
        {"product_id": "shoe-1", "name": "Running Shoes", "price": 450.5, "quantity": 1},
        {"product_id": "sock-7", "name": "Wool Socks", "price": 12.5, "quantity": 2},
    ],
}


async def test_thank_you_at_once_and_review_request_after_14_days(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("buyer-1", first_name="Rina")
    start = await journeys.now()

    handle = await journeys.deliver("post_purchase", await journeys.event("buyer-1", "Order Completed", start, **ORDER))
    await handle.result()

    thanks, review = await journeys.messages(customer)
    assert thanks["template"] == "order_thank_you"
    assert thanks["step_at"] - start < timedelta(seconds=5)
    assert thanks["transactional"] is True
    assert review["template"] == "review_request"
    assert review["step_at"] - start - timedelta(days=14) < timedelta(seconds=1)
    thank_mail = journeys.mail_to("buyer-1@example.com")[0]
    assert thank_mail.subject == "Thanks for your order, Rina! (#o-100)"
    assert "Running Shoes: $450.50" in thank_mail.text()
    assert "Wool Socks x 2: $25.00" in thank_mail.text()
    assert "Total: $475.50" in thank_mail.text()


async def test_review_request_skipped_after_review(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("buyer-2")
    start = await journeys.now()
    handle = await journeys.deliver("post_purchase", await journeys.event("buyer-2", "Order Completed", start, **ORDER))

    await journeys.env.sleep(timedelta(days=3))
    await handle.signal("event", await journeys.event("buyer-2", "Review Submitted", start + timedelta(days=3), order_id="o-100"))
    result = await handle.result()

    assert result.outcome == "completed"
    assert [row["template"] for row in await journeys.messages(customer)] == ["order_thank_you"]


async def test_one_thank_you_per_order_id(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("buyer-3")
    start = await journeys.now()
    handle = await journeys.deliver("post_purchase", await journeys.event("buyer-3", "Order Completed", start, **ORDER))

    # The shop sends the same order twice (a retry with a new messageId), then a second order.
    await handle.signal("event", await journeys.event("buyer-3", "Order Completed", start + timedelta(minutes=1), **ORDER))
    await handle.signal("event", await journeys.event("buyer-3", "Order Completed", start + timedelta(days=1), **{**ORDER, "order_id": "o-101"}))
    await handle.result()

    templates = [(row["template"], row["step"]) for row in await journeys.messages(customer)]
    assert templates == [
        ("order_thank_you", "thank_you:o-100"),
        ("order_thank_you", "thank_you:o-101"),
        ("review_request", "review_request:o-100"),
        ("review_request", "review_request:o-101"),
    ]


async def test_same_order_in_a_later_entry_not_thanked_again(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("buyer-4")
    await (await journeys.deliver("post_purchase", await journeys.event("buyer-4", "Order Completed", **ORDER))).result()

    await (await journeys.deliver("post_purchase", await journeys.event("buyer-4", "Order Completed", **ORDER))).result()

    thanks = [row for row in await journeys.messages(customer) if row["template"] == "order_thank_you"]
    assert len(thanks) == 1
    assert len([mail for mail in journeys.mail_to("buyer-4@example.com") if "Thanks" in mail.subject]) == 1


async def test_thank_you_in_indonesian(journeys: JourneyHarness) -> None:
    await journeys.customer("buyer-5", first_name="Dewi", locale="id")

    await (await journeys.deliver("post_purchase", await journeys.event("buyer-5", "Order Completed", **ORDER))).result()

    thank_mail = journeys.mail_to("buyer-5@example.com")[0]
    assert thank_mail.subject == "Makasih udah belanja, Kak Dewi! Pesanan #o-100 sudah kami terima"
    assert "Total: US$475,50" in thank_mail.text()


async def test_review_request_cross_sells_from_catalog(journeys: JourneyHarness) -> None:
    from activities.catalog import CatalogStore, ProductRow

    rows = [
        ProductRow(product_id="shoe-1", name="Running Shoes", category="shoes", price=450.5, stock=3),
        ProductRow(product_id="shoe-2", name="Trail Shoes", category="shoes", price=520, stock=5, image_url="https://cdn.example.com/s2.jpg"),
        ProductRow(product_id="shoe-3", name="Sold Out Shoes", category="shoes", price=300, stock=0),
        ProductRow(product_id="shoe-4", name="Bought Before Shoes", category="shoes", price=310, stock=2),
        ProductRow(product_id="hat-1", name="Sun Hat", category="hats", price=20, stock=9),
    ]
    await CatalogStore(journeys.pool).import_products(rows)
    customer = await journeys.customer("buyer-6")
    start = await journeys.now()
    await journeys.event("buyer-6", "Order Completed", start - timedelta(days=30), order_id="old", products=[{"product_id": "shoe-4", "name": "Bought Before Shoes", "price": 310}])
    order = {"order_id": "o-6", "products": [{"product_id": "shoe-1", "name": "Running Shoes", "category": "shoes", "price": 450.5}]}

    await (await journeys.deliver("post_purchase", await journeys.event("buyer-6", "Order Completed", start, **order))).result()

    review = [mail for mail in journeys.mail_to("buyer-6@example.com") if mail.header("X-Bisik-Step") == "review_request:o-6"][0]
    assert "Trail Shoes: $520.00" in review.text()
    assert "Sold Out Shoes" not in review.text()
    assert "Bought Before Shoes" not in review.text()
    assert "Sun Hat" not in review.text()
    assert 'src="https://cdn.example.com/s2.jpg"' in review.html()
    assert len(await journeys.messages(customer)) >= 2
