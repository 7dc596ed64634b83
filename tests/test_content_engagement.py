"""Content engagement journey on the time-skipping server, sending real email to an SMTP sink."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from activities.catalog import CatalogStore, ProductRow
from activities.suppressions import SuppressionStore
from bisik.models import JourneyEvent
from tests.journey_fixtures import JourneyHarness
from workflows.content_engagement import ContentEngagement, content_from
from workflows.matching import matches_any

EBOOK = {
    "title": "Trail Running 101",
    "topic": "Trail running",
    "url": "https://shop.example.com/guides/trail-running-101",
}


def hours_between(later: datetime, earlier: datetime) -> float:
    return round((later - earlier).total_seconds() / 3600, 2)


def track_event(name: str, /, **properties: Any) -> JourneyEvent:
    return JourneyEvent(
        id=1, message_id="m-1", type="track", name=name, customer_id="c",
        timestamp="2026-12-01T00:00:00Z", received_at="2026-12-01T00:00:00Z", properties=properties,
    )


async def last_run(journeys: JourneyHarness, customer: str):  # type: ignore[no-untyped-def]
    return await journeys.pool.fetchrow(
        "SELECT status, reason FROM journey_runs WHERE customer_id = $1 ORDER BY id DESC LIMIT 1", customer
    )


@pytest.mark.parametrize(
    ("name", "properties", "starts"),
    [
        ("E-book Downloaded", {}, True),
        ("Video Completed", {}, True),
        ("Video Completed", {"percent_complete": 95}, True),
        ("Video Completed", {"percent_complete": 90}, True),
        ("Video Completed", {"percent_complete": 89.9}, False),
        ("Video Completed", {"percent_complete": "97"}, True),
        ("Video Completed", {"percent_complete": 50, "position": 300, "total_length": 300}, False),
        ("Video Completed", {"position": 270, "total_length": 300}, True),
        ("Video Completed", {"position": 120, "total_length": 300}, False),
        ("Video Completed", {"position": 120}, True),
        ("Video Completed", {"position": 120, "total_length": 0}, True),
        ("Video Completed", {"percent_complete": True, "position": 10, "total_length": 300}, False),
        ("Video Content Completed", {"position": 299, "total_length": 300}, True),
        ("Video Content Completed", {"position": 30, "total_length": 300}, False),
        ("Video Playback Completed", {}, False),
        ("Video Started", {}, False),
    ],
)
def test_trigger_rule_for_videos(name: str, properties: dict, starts: bool) -> None:
    assert matches_any(track_event(name, **properties), ContentEngagement.starts_on) is starts


@pytest.mark.parametrize(
    ("properties", "topic", "title"),
    [
        ({"topic": "Trail running", "category": "shoes", "title": "Trail Running 101"}, "Trail running", "Trail Running 101"),
        ({"category": "shoes", "genre": "Sport", "title": "Lacing 101"}, "shoes", "Lacing 101"),
        ({"genre": "Sport", "title": "Lacing 101"}, "Sport", "Lacing 101"),
        ({"topic": "  ", "name": "Lacing 101"}, "Lacing 101", "Lacing 101"),
        ({"topic": None, "url": "https://example.com/v"}, None, None),
        ({"topic": "x" * 200}, "x" * 79 + "…", None),
    ],
)
def test_topic_from_properties_in_order(properties: dict, topic: str | None, title: str | None) -> None:
    content = content_from(track_event("E-book Downloaded", **properties))

    assert content.topic == topic
    assert content.title == title


def test_content_links_are_safe() -> None:
    content = content_from(track_event("E-book Downloaded", topic="Trail & road", url="javascript:alert(1)"))

    assert content.url is None
    assert content.more_path == "/search?q=Trail%20%26%20road"


async def test_ebook_download_gets_three_emails(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("content-1", first_name="Sari")
    start = await journeys.now()

    handle = await journeys.deliver("content_engagement", await journeys.event("content-1", "E-book Downloaded", start, **EBOOK))
    result = await handle.result()

    assert result.outcome == "completed"
    messages = await journeys.messages(customer)
    assert [row["template"] for row in messages] == ["content_deeper_1", "content_deeper_2", "content_picks"]
    assert [row["status"] for row in messages] == ["sent", "sent", "sent"]
    assert [hours_between(row["step_at"], start) for row in messages] == [24, 3 * 24, 7 * 24]
    assert [row["priority"] for row in messages] == [3, 3, 3]
    first, second, third = journeys.mail_to("content-1@example.com")
    assert first.subject == "More on Trail running, Sari"
    assert "Thanks for downloading Trail Running 101." in first.text()
    assert "https://shop.example.com/guides/trail-running-101" in first.text()
    assert "https://shop.example.com/search?q=Trail%20running" in first.text()
    assert second.subject == "Putting Trail running into practice"
    assert "A few days ago you downloaded Trail Running 101." in second.text()
    assert third.subject == "Still curious about Trail running?"
    assert "That's the last note in this little series." in third.text()
    assert "Unsubscribe here:" in third.text()


async def test_video_watched_to_end_starts_series(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("content-2")
    video = {"title": "Lacing for Long Runs", "genre": "Running", "position": 290, "total_length": 300}

    await (await journeys.deliver("content_engagement", await journeys.event("content-2", "Video Completed", **video))).result()

    assert len(await journeys.messages(customer)) == 3
    first = journeys.mail_to("content-2@example.com")[0]
    assert first.subject == "More on Running"
    assert first.text().startswith("Hi there,")
    assert "Thanks for watching Lacing for Long Runs all the way to the end." in first.text()


async def test_picks_show_catalog_products(journeys: JourneyHarness) -> None:
    await CatalogStore(journeys.pool).import_products(
        [
            ProductRow(product_id="shoe-1", name="Trail Shoes", category="running", price=120, currency="USD", stock=4, image_url="https://cdn.example.com/shoe.jpg"),
            ProductRow(product_id="sock-1", name="Running Socks", category="running", price=12.5, currency="USD"),
            ProductRow(product_id="vest-1", name="Hydration Vest", category="running", price=80, currency="USD", stock=0),
            ProductRow(product_id="mat-1", name="Yoga Mat", category="yoga", price=30, currency="USD"),
        ]
    )
    customer = await journeys.customer("content-3")
    ebook = {"title": "Trail Running 101", "category": "running"}

    await (await journeys.deliver("content_engagement", await journeys.event("content-3", "E-book Downloaded", **ebook))).result()

    assert [row["template"] for row in await journeys.messages(customer)][-1] == "content_picks"
    picks = journeys.mail_to("content-3@example.com")[-1]
    assert picks.subject == "Picked for you: running"
    assert "- Trail Shoes: $120.00" in picks.text()
    assert "- Running Socks: $12.50" in picks.text()
    assert "Hydration Vest" not in picks.text()
    assert "Yoga Mat" not in picks.text()
    assert 'src="https://cdn.example.com/shoe.jpg"' in picks.html()


async def test_unsubscribe_while_waiting_stops_series(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("content-4")
    start = await journeys.now()
    handle = await journeys.deliver("content_engagement", await journeys.event("content-4", "E-book Downloaded", start, **EBOOK))

    await journeys.env.sleep(timedelta(days=2))
    await SuppressionStore(journeys.pool).suppress(customer, channel="email", reason="unsubscribed", source="link")
    await journeys.env.sleep(timedelta(days=1, minutes=1))

    assert (await handle.describe()).status.name == "COMPLETED"
    first, second = await journeys.messages(customer)
    assert first["status"] == "sent"
    assert second["template"] == "content_deeper_2"
    assert second["status"] == "suppressed"
    assert second["attempts"] == 1
    assert hours_between(second["step_at"], start) == 3 * 24
    assert len(journeys.mail_to("content-4@example.com")) == 1
    run = await last_run(journeys, customer)
    assert run["status"] == "exited"
    assert run["reason"] == "suppressed: unsubscribed"


async def test_no_new_series_within_7_days(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("content-5")
    start = await journeys.now()
    first = await journeys.deliver("content_engagement", await journeys.event("content-5", "E-book Downloaded", start, **EBOOK))
    # Skip time by hand: awaiting a result lets the test server jump past other tests' timers too.
    await journeys.env.sleep(timedelta(days=7, minutes=1))
    assert (await first.describe()).status.name == "COMPLETED"

    # The last message went out on day 7, so a download on day 10 starts nothing.
    await journeys.env.sleep(timedelta(days=3))
    blocked = await journeys.deliver("content_engagement", await journeys.event("content-5", "E-book Downloaded", topic="Yoga"))
    await journeys.env.sleep(timedelta(minutes=1))
    blocked_run = await last_run(journeys, customer)
    await journeys.env.sleep(timedelta(days=4))
    allowed = await (await journeys.deliver("content_engagement", await journeys.event("content-5", "E-book Downloaded", topic="Yoga"))).result()

    assert (await blocked.describe()).status.name == "COMPLETED"
    assert blocked_run["status"] == "exited"
    assert blocked_run["reason"].startswith("re-entry not allowed: last message of this journey at")
    assert allowed.outcome == "completed"
    assert len(await journeys.messages(customer)) == 6
    assert journeys.mail_to("content-5@example.com")[3].subject == "More on Yoga"


async def test_download_during_series_starts_nothing(journeys: JourneyHarness) -> None:
    await journeys.customer("content-6")
    start = await journeys.now()
    handle = await journeys.deliver("content_engagement", await journeys.event("content-6", "E-book Downloaded", start, **EBOOK))

    await journeys.env.sleep(timedelta(days=2))
    second = await journeys.deliver("content_engagement", await journeys.event("content-6", "E-book Downloaded", topic="Yoga"))
    assert (await second.describe()).run_id == (await handle.describe()).run_id
    result = await handle.result()

    # The series ends on day 7. The download left over then tries a new entry, which the rule blocks.
    assert result.outcome == "exited"
    assert result.reason.startswith("re-entry not allowed: last message of this journey at")
    subjects = [mail.subject for mail in journeys.mail_to("content-6@example.com")]
    assert subjects == ["More on Trail running", "Putting Trail running into practice", "Still curious about Trail running?"]


async def test_series_in_indonesian(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("content-7", first_name="Budi", locale="id")

    await (await journeys.deliver("content_engagement", await journeys.event("content-7", "E-book Downloaded", **EBOOK))).result()

    first, second, third = journeys.mail_to("content-7@example.com")
    assert first.subject == "Lanjut bahas Trail running yuk, Kak Budi ✨"
    assert first.text().startswith("Hai Kak Budi!")
    assert second.subject == "Yuk, praktikin Trail running, Kak Budi 💪"
    assert third.subject == "Masih penasaran soal Trail running?"
    assert [row["locale"] for row in await journeys.messages(customer)] == ["id", "id", "id"]
