"""High-intent journey on the time-skipping server, sending real email to an SMTP sink."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from temporalio.client import WorkflowHandle

from activities.suppressions import SuppressionStore
from bisik.models import JourneyEvent
from tests.helpers import store_call
from tests.journey_fixtures import JourneyHarness
from workflows import high_intent
from workflows.registry import RoutingIndex

# Real time passes between the test's calls, so step times may be off the schedule by a few seconds.
SLACK = timedelta(seconds=5)


@pytest.fixture(autouse=True)
def default_high_intent_pages() -> Iterator[None]:
    """Start and end on the default pages, because `configure` changes them for the whole process."""
    high_intent.configure(high_intent.DEFAULT_HIGH_INTENT_PAGES)
    yield
    high_intent.configure(high_intent.DEFAULT_HIGH_INTENT_PAGES)


async def page_view(
    journeys: JourneyHarness, user_id: str, at: datetime | None = None, *, path: str = "/pricing", name: str | None = None
) -> JourneyEvent:
    """Store a `page` call for `user_id`, stamped `at` (default: the test server's now)."""
    at = at or await journeys.now()
    call = {"type": "page", "userId": user_id, "properties": {"path": path}, "timestamp": at.isoformat()}
    if name is not None:
        call["name"] = name
    return await store_call(journeys.pool, call)


async def view(journeys: JourneyHarness, user_id: str, **page: str) -> WorkflowHandle:
    """Store a page view now and route it to the journey as the relay does."""
    return await journeys.deliver("high_intent", await page_view(journeys, user_id, **page))


async def three_views_an_hour_apart(journeys: JourneyHarness, user_id: str) -> WorkflowHandle:
    handle = await view(journeys, user_id)
    for _ in range(2):
        await journeys.env.sleep(timedelta(hours=1))
        handle = await view(journeys, user_id)
    return handle


async def last_run(journeys: JourneyHarness, customer_id: str):  # type: ignore[no-untyped-def]
    return await journeys.pool.fetchrow(
        "SELECT status, reason, entered_at, ended_at FROM journey_runs WHERE customer_id = $1 ORDER BY id DESC LIMIT 1",
        customer_id,
    )


def close_to(actual: timedelta, expected: timedelta) -> bool:
    return abs(actual - expected) < SLACK


# Counting views


async def test_two_views_send_nothing(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("intent-1")
    start = await journeys.now()
    await view(journeys, "intent-1")
    await journeys.env.sleep(timedelta(days=1))
    handle = await view(journeys, "intent-1")

    result = await handle.result()

    assert result.outcome == "exited"
    assert result.reason == "fewer than 3 views within 7 days"
    assert await journeys.messages(customer) == []
    assert journeys.mail_to("intent-1@example.com") == []
    run = await last_run(journeys, customer)
    # The entry lasts until its last view is 7 days old.
    assert close_to(run["ended_at"] - start, timedelta(days=8))


async def test_three_views_within_7_days_send_both(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("intent-2", first_name="Sari")
    start = await journeys.now()
    await view(journeys, "intent-2")
    await journeys.env.sleep(timedelta(days=2))
    await view(journeys, "intent-2", name="Demo", path="/demo")
    await journeys.env.sleep(timedelta(days=3))
    handle = await view(journeys, "intent-2")

    result = await handle.result()

    assert result.outcome == "completed"
    testimonial, consultation = await journeys.messages(customer)
    assert testimonial["template"] == "high_intent_testimonial"
    assert testimonial["status"] == "sent"
    assert close_to(testimonial["step_at"] - start, timedelta(days=5))
    assert consultation["template"] == "high_intent_consultation"
    assert consultation["status"] == "sent"
    assert close_to(consultation["step_at"] - testimonial["step_at"], timedelta(days=1))


async def test_views_spread_over_9_days_send_nothing(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("intent-3")
    await view(journeys, "intent-3")
    await journeys.env.sleep(timedelta(days=4, hours=12))
    await view(journeys, "intent-3")
    await journeys.env.sleep(timedelta(days=4, hours=12))
    handle = await view(journeys, "intent-3")

    result = await handle.result()

    assert result.outcome == "exited"
    assert result.reason == "fewer than 3 views within 7 days"
    assert await journeys.messages(customer) == []


async def test_window_slides_past_old_views(journeys: JourneyHarness) -> None:
    # Views on days 0, 5, 9 and 11: days 5, 9 and 11 fall within 7 days of each other.
    customer = await journeys.customer("intent-4")
    start = await journeys.now()
    handle = await view(journeys, "intent-4")
    for gap in (5, 4, 2):
        await journeys.env.sleep(timedelta(days=gap))
        handle = await view(journeys, "intent-4")

    result = await handle.result()

    assert result.outcome == "completed"
    testimonial, _ = await journeys.messages(customer)
    assert close_to(testimonial["step_at"] - start, timedelta(days=11))


async def test_journey_counts_every_routed_page(journeys: JourneyHarness) -> None:
    # "/plans" is not a default page. The router sends it here under this configuration, and the
    # workflow must count it without checking the pages again.
    high_intent.configure(["/plans"])
    customer = await journeys.customer("intent-5")

    handle = await view(journeys, "intent-5", path="/plans")
    for _ in range(2):
        await journeys.env.sleep(timedelta(hours=1))
        handle = await view(journeys, "intent-5", path="/plans")
    result = await handle.result()

    assert result.outcome == "completed"
    assert [row["template"] for row in await journeys.messages(customer)] == [
        "high_intent_testimonial", "high_intent_consultation",
    ]


# Content


async def test_testimonial_and_offer_content(journeys: JourneyHarness) -> None:
    await journeys.customer("intent-6", first_name="Sari")

    await (await three_views_an_hour_apart(journeys, "intent-6")).result()

    testimonial, consultation = journeys.mail_to("intent-6@example.com")
    assert testimonial.subject == "Sari, still weighing it up?"
    assert testimonial.text().startswith("Hi Sari,")
    assert "here's what one of our customers told us" in testimonial.text()
    assert "- a Bisik Demo Store customer" in testimonial.text()
    assert "Unsubscribe here:" in testimonial.text()
    assert testimonial.header("X-Bisik-Journey") == "high_intent"
    assert testimonial.header("X-Bisik-Step") == "testimonial"
    assert consultation.subject == "Sari, how about a free consultation?"
    assert "reply to this email with a couple of times that suit you" in consultation.text()
    assert "Unsubscribe here:" in consultation.text()
    assert consultation.header("List-Unsubscribe") is not None


async def test_missing_first_name_falls_back(journeys: JourneyHarness) -> None:
    await journeys.customer("intent-7")

    await (await three_views_an_hour_apart(journeys, "intent-7")).result()

    testimonial, consultation = journeys.mail_to("intent-7@example.com")
    assert testimonial.subject == "Still weighing it up?"
    assert testimonial.text().startswith("Hi there,")
    assert consultation.subject == "How about a free consultation?"


async def test_indonesian_locale_gets_indonesian_emails(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("intent-8", first_name="Dewi", locale="id")

    await (await three_views_an_hour_apart(journeys, "intent-8")).result()

    testimonial, consultation = journeys.mail_to("intent-8@example.com")
    assert testimonial.subject == "Kak Dewi, masih mikir-mikir? Dengerin cerita pelanggan kami dulu yuk"
    assert testimonial.text().startswith("Hai Kak Dewi!")
    assert consultation.subject == "Kak Dewi, mau konsultasi gratis bareng tim kami? ☕"
    assert "balas email ini" in consultation.text()
    assert [row["locale"] for row in await journeys.messages(customer)] == ["id", "id"]


# Exits


async def test_booking_cancels_consultation_offer(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("intent-9")
    handle = await three_views_an_hour_apart(journeys, "intent-9")

    await journeys.env.sleep(timedelta(hours=3))
    await handle.signal("event", await journeys.event("intent-9", "Consultation Booked"))
    result = await handle.result()

    assert result.outcome == "exited"
    assert result.reason == "goal reached: Consultation Booked"
    assert [row["template"] for row in await journeys.messages(customer)] == ["high_intent_testimonial"]
    assert len(journeys.mail_to("intent-9@example.com")) == 1


async def test_demo_request_ends_counting(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("intent-10")
    handle = await view(journeys, "intent-10")
    await journeys.env.sleep(timedelta(hours=1))
    await view(journeys, "intent-10")

    await journeys.env.sleep(timedelta(hours=1))
    await handle.signal("event", await journeys.event("intent-10", "Demo Requested"))
    result = await handle.result()

    assert result.outcome == "exited"
    assert result.reason == "goal reached: Demo Requested"
    assert await journeys.messages(customer) == []


async def test_unsubscribe_while_waiting_stops_offer(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("intent-11")
    handle = await three_views_an_hour_apart(journeys, "intent-11")
    await journeys.env.sleep(timedelta(hours=2))
    assert (await handle.describe()).status.name == "RUNNING"

    await SuppressionStore(journeys.pool).suppress(customer, channel="email", reason="unsubscribed", source="link")
    await journeys.env.sleep(timedelta(days=1))

    assert (await handle.describe()).status.name == "COMPLETED"
    result = await handle.result()
    assert result.outcome == "exited"
    assert result.reason == "suppressed: unsubscribed"
    testimonial, consultation = await journeys.messages(customer)
    assert testimonial["status"] == "sent"
    assert consultation["status"] == "suppressed"
    assert consultation["attempts"] == 1
    assert len(journeys.mail_to("intent-11@example.com")) == 1


# Re-entry


async def test_no_second_send_within_30_days(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("intent-12")
    first = await three_views_an_hour_apart(journeys, "intent-12")
    # Skip time by hand: awaiting a result lets the test server jump past other tests' timers too.
    await journeys.env.sleep(timedelta(days=1, hours=1))
    assert (await first.describe()).status.name == "COMPLETED"

    # The offer went out 26 hours after the first view; three views on day 10 start nothing.
    await journeys.env.sleep(timedelta(days=9))
    blocked_runs = []
    for _ in range(3):
        blocked = await view(journeys, "intent-12")
        await journeys.env.sleep(timedelta(minutes=1))
        assert (await blocked.describe()).status.name == "COMPLETED"
        blocked_runs.append(await last_run(journeys, customer))

    # On day 32 the last message is more than 30 days old.
    await journeys.env.sleep(timedelta(days=22))
    allowed = await (await three_views_an_hour_apart(journeys, "intent-12")).result()

    assert [run["status"] for run in blocked_runs] == ["exited"] * 3
    for run in blocked_runs:
        assert run["reason"].startswith("re-entry not allowed: last message of this journey at")
    assert allowed.outcome == "completed"
    assert [row["template"] for row in await journeys.messages(customer)] == [
        "high_intent_testimonial", "high_intent_consultation",
        "high_intent_testimonial", "high_intent_consultation",
    ]


async def test_entry_without_send_does_not_block(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("intent-13")
    await view(journeys, "intent-13")
    await journeys.env.sleep(timedelta(hours=1))
    lapsed = await (await view(journeys, "intent-13")).result()

    allowed = await (await three_views_an_hour_apart(journeys, "intent-13")).result()

    assert lapsed.reason == "fewer than 3 views within 7 days"
    assert allowed.outcome == "completed"
    assert len(await journeys.messages(customer)) == 2


# Routing


def page_event(*, path: str | None = None, name: str | None = None, url: str | None = None) -> JourneyEvent:
    properties = {key: value for key, value in (("path", path), ("url", url)) if value is not None}
    return JourneyEvent(
        id=1,
        message_id="m-1",
        type="page",
        name=name,
        customer_id="c-1",
        timestamp="2026-12-01T00:00:00Z",  # type: ignore[arg-type]
        received_at="2026-12-01T00:00:00Z",  # type: ignore[arg-type]
        properties=properties,
    )


def starts_high_intent(index: RoutingIndex, event: JourneyEvent) -> bool:
    return any(route.journey.name == "high_intent" and route.starts for route in index.routes(event))


def test_router_uses_default_pages() -> None:
    index = RoutingIndex()

    assert starts_high_intent(index, page_event(path="/pricing"))
    assert starts_high_intent(index, page_event(path="/demo"))
    assert starts_high_intent(index, page_event(name="Pricing", path="/plans"))
    assert not starts_high_intent(index, page_event(path="/docs", name="Docs"))


def test_router_uses_configured_pages() -> None:
    high_intent.configure(["/plans/", "Book a Call"])
    index = RoutingIndex()

    assert starts_high_intent(index, page_event(path="/plans"))
    assert starts_high_intent(index, page_event(path="/plans/"))
    assert starts_high_intent(index, page_event(path="/plans?tier=team#faq"))
    assert starts_high_intent(index, page_event(url="https://shop.example.com/plans?tier=team"))
    assert starts_high_intent(index, page_event(name="book a call", path="/contact"))
    assert not starts_high_intent(index, page_event(path="/plans/enterprise"))
    assert not starts_high_intent(index, page_event(path="/Plans"))
    assert not starts_high_intent(index, page_event(path="/pricing"))
    assert not starts_high_intent(index, page_event(name="Pricing"))
    assert not starts_high_intent(index, page_event(name="Demo", path="/demo"))


def test_router_ignores_other_event_types() -> None:
    index = RoutingIndex()
    tracked = page_event(path="/pricing", name="Pricing").model_copy(update={"type": "track"})
    screen = page_event(path="/pricing", name="Pricing").model_copy(update={"type": "screen"})

    assert not starts_high_intent(index, tracked)
    assert not starts_high_intent(index, screen)


def test_empty_page_list_routes_nothing() -> None:
    high_intent.configure([])
    index = RoutingIndex()

    assert not starts_high_intent(index, page_event(path="/pricing", name="Pricing"))


def test_configure_rejects_a_url() -> None:
    with pytest.raises(ValueError, match="invalid BISIK_HIGH_INTENT_PAGES entry 'https://shop.example.com/pricing'"):
        high_intent.configure(["https://shop.example.com/pricing"])
