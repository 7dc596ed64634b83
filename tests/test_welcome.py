"""Welcome series on the time-skipping server, sending real email to an SMTP sink."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest

from activities.suppressions import SuppressionStore
from bisik.models import JourneyEvent
from bisik.settings import Settings
from tests.helpers import store_call
from tests.journey_fixtures import JourneyHarness
from workflows.matching import matches_any
from workflows.welcome import Welcome


def hours_between(later: datetime, earlier: datetime) -> float:
    return round((later - earlier).total_seconds() / 3600, 2)


async def page_view(journeys: JourneyHarness, user_id: str, at: datetime, name: str = "Home") -> JourneyEvent:
    return await store_call(journeys.pool, {"type": "page", "userId": user_id, "name": name, "timestamp": at.isoformat()})


async def subscribing_identify(journeys: JourneyHarness, user_id: str, **traits: object) -> JourneyEvent:
    traits.setdefault("email", f"{user_id}@example.com")
    call = {"type": "identify", "userId": user_id, "traits": traits, "timestamp": (await journeys.now()).isoformat()}
    return await store_call(journeys.pool, call)


async def last_run(journeys: JourneyHarness, customer: str):  # type: ignore[no-untyped-def]
    return await journeys.pool.fetchrow(
        "SELECT status, reason FROM journey_runs WHERE customer_id = $1 ORDER BY id DESC LIMIT 1", customer
    )


async def test_quiet_subscriber_gets_three_emails(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("welcome-1", first_name="Sari")
    start = await journeys.now()

    handle = await journeys.deliver("welcome", await journeys.event("welcome-1", "Signed Up", start))
    result = await handle.result()

    assert result.outcome == "completed"
    messages = await journeys.messages(customer)
    assert [row["template"] for row in messages] == ["welcome_1", "welcome_tips", "welcome_offer"]
    assert [row["status"] for row in messages] == ["sent", "sent", "sent"]
    assert hours_between(messages[0]["step_at"], start) == 0
    assert hours_between(messages[1]["step_at"], start) == 3 * 24
    assert hours_between(messages[2]["step_at"], start) == 7 * 24
    assert [row["priority"] for row in messages] == [7, 5, 5]
    welcome, tips, offer = journeys.mail_to("welcome-1@example.com")
    assert welcome.subject == "Welcome to Bisik Demo Store, Sari!"
    assert welcome.text().startswith("Hi Sari,")
    assert tips.subject == "Sari, three tips for shopping at Bisik Demo Store"
    assert "we'll send you a reminder" in tips.text()
    assert offer.subject == "A welcome gift for you, Sari: 10% off your first order"
    code = (await handle.query("journey_state"))["offer_code"]
    assert re.fullmatch(r"WELCOME-[A-HJ-NP-Z2-9]{6}", code)
    assert f"Use code {code} at checkout." in offer.text()
    assert code in offer.html()
    assert "Unsubscribe here:" in offer.text()


@pytest.mark.parametrize("trait", ["subscribed", "newsletter"])
async def test_subscribing_identify_starts_welcome(journeys: JourneyHarness, trait: str) -> None:
    customer = await journeys.customer(f"welcome-2-{trait}")
    signed_up = await subscribing_identify(journeys, f"welcome-2-{trait}", **{trait: True})

    result = await (await journeys.deliver("welcome", signed_up)).result()

    assert result.outcome == "completed"
    templates = [row["template"] for row in await journeys.messages(customer)]
    assert templates == ["welcome_1", "welcome_tips", "welcome_offer"]


@pytest.mark.parametrize("traits", [{}, {"subscribed": False}, {"newsletter": "yes"}, {"subscribed": None}])
def test_identify_without_subscribing_starts_nothing(traits: dict) -> None:
    identify = JourneyEvent(
        id=1, message_id="m-1", type="identify", customer_id="c", timestamp="2026-12-01T00:00:00Z",
        received_at="2026-12-01T00:00:00Z", traits={"email": "a@example.com", **traits},
    )

    assert not matches_any(identify, Welcome.starts_on)


async def test_page_view_brings_tips_forward(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("welcome-3")
    start = await journeys.now()
    handle = await journeys.deliver("welcome", await journeys.event("welcome-3", "Signed Up", start))

    await journeys.env.sleep(timedelta(hours=5))
    await handle.signal("event", await page_view(journeys, "welcome-3", start + timedelta(hours=5)))
    # A visit after the tips changes nothing: the offer keeps its four days after the tips.
    await journeys.env.sleep(timedelta(days=2))
    await handle.signal("event", await page_view(journeys, "welcome-3", start + timedelta(days=2, hours=5)))
    result = await handle.result()

    assert result.outcome == "completed"
    welcome, tips, offer = await journeys.messages(customer)
    assert tips["template"] == "welcome_tips"
    assert hours_between(tips["step_at"], start) == 5
    assert offer["template"] == "welcome_offer"
    assert hours_between(offer["step_at"], start) == 5 + 4 * 24


async def test_link_click_brings_tips_forward(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("welcome-4")
    start = await journeys.now()
    handle = await journeys.deliver("welcome", await journeys.event("welcome-4", "Signed Up", start))

    # A click counts even within the sign-up visit: it is a click in an email.
    await journeys.env.sleep(timedelta(minutes=12))
    await handle.signal("event", await journeys.event("welcome-4", "Email Link Clicked", start + timedelta(minutes=12)))
    await handle.result()

    welcome, tips, offer = await journeys.messages(customer)
    assert hours_between(tips["step_at"], start) == 0.2
    assert hours_between(offer["step_at"], start) == 0.2 + 4 * 24


async def test_capped_tips_keep_offer_spacing(journeys: JourneyHarness, settings: Settings) -> None:
    settings.frequency_caps = "email:1/16h"
    customer = await journeys.customer("welcome-12")
    start = await journeys.now()
    handle = await journeys.deliver("welcome", await journeys.event("welcome-12", "Signed Up", start))

    await journeys.env.sleep(timedelta(minutes=12))
    await handle.signal("event", await journeys.event("welcome-12", "Email Link Clicked", start + timedelta(minutes=12)))
    await handle.result()

    # The click brings the tips forward, but the cap defers them until 16 hours after the welcome,
    # and the offer's four days count from then.
    welcome, tips, offer = await journeys.messages(customer)
    assert tips["status"] == "sent"
    assert hours_between(tips["step_at"], start) == 16
    assert offer["status"] == "sent"
    assert hours_between(offer["step_at"], start) == 16 + 4 * 24


async def test_sign_up_visit_pages_do_not_count(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("welcome-5")
    start = await journeys.now()
    handle = await journeys.deliver("welcome", await journeys.event("welcome-5", "Signed Up", start))

    await handle.signal("event", await page_view(journeys, "welcome-5", start + timedelta(minutes=2), "Thanks for signing up"))
    await handle.signal("event", await page_view(journeys, "welcome-5", start + timedelta(minutes=29)))
    await handle.result()

    welcome, tips, offer = await journeys.messages(customer)
    assert hours_between(tips["step_at"], start) == 3 * 24
    assert hours_between(offer["step_at"], start) == 7 * 24


async def test_order_before_tips_skips_offer(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("welcome-6")
    start = await journeys.now()
    handle = await journeys.deliver("welcome", await journeys.event("welcome-6", "Signed Up", start))

    await journeys.env.sleep(timedelta(days=2))
    await handle.signal("event", await journeys.event("welcome-6", "Order Completed", start + timedelta(days=2), order_id="o-6"))
    result = await handle.result()

    assert result.outcome == "exited"
    assert result.reason == "ordered since signing up, so no offer"
    messages = await journeys.messages(customer)
    assert [row["template"] for row in messages] == ["welcome_1", "welcome_tips"]
    assert hours_between(messages[1]["step_at"], start) == 3 * 24
    assert len(journeys.mail_to("welcome-6@example.com")) == 2


async def test_order_after_tips_ends_journey_at_once(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("welcome-7")
    start = await journeys.now()
    handle = await journeys.deliver("welcome", await journeys.event("welcome-7", "Signed Up", start))

    await journeys.env.sleep(timedelta(days=4))
    await handle.signal("event", await journeys.event("welcome-7", "Order Completed", start + timedelta(days=4), order_id="o-7"))
    await journeys.env.sleep(timedelta(minutes=1))

    assert (await handle.describe()).status.name == "COMPLETED"
    run = await last_run(journeys, customer)
    assert run["status"] == "exited"
    assert run["reason"] == "ordered since signing up, so no offer"
    assert [row["template"] for row in await journeys.messages(customer)] == ["welcome_1", "welcome_tips"]


async def test_order_from_before_sign_up_keeps_offer(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("welcome-8")
    start = await journeys.now()
    handle = await journeys.deliver("welcome", await journeys.event("welcome-8", "Signed Up", start))

    await journeys.env.sleep(timedelta(hours=1))
    await handle.signal("event", await journeys.event("welcome-8", "Order Completed", start - timedelta(days=1), order_id="old"))
    result = await handle.result()

    assert result.outcome == "completed"
    templates = [row["template"] for row in await journeys.messages(customer)]
    assert templates == ["welcome_1", "welcome_tips", "welcome_offer"]


async def test_welcome_reentry_never(journeys: JourneyHarness) -> None:
    """Welcome with re-entry never: a customer who finished, left and came back 10 days later gets
    nothing new; two sign-up events while a run is active give one run."""
    customer = await journeys.customer("welcome-9")
    start = await journeys.now()
    first = await journeys.deliver("welcome", await journeys.event("welcome-9", "Signed Up", start))

    # Skip time by hand: awaiting a result lets the test server jump past other tests' timers too.
    await journeys.env.sleep(timedelta(hours=1))
    second = await journeys.deliver("welcome", await journeys.event("welcome-9", "Signed Up"))
    first_run_id = (await first.describe()).run_id
    assert (await second.describe()).run_id == first_run_id
    assert await journeys.pool.fetchval("SELECT count(*) FROM journey_runs WHERE customer_id = $1", customer) == 1

    await journeys.env.sleep(timedelta(days=7))
    assert (await first.describe()).status.name == "COMPLETED"
    assert (await last_run(journeys, customer))["status"] == "completed"

    await journeys.env.sleep(timedelta(days=10))
    back = await journeys.deliver("welcome", await journeys.event("welcome-9", "Signed Up"))
    await journeys.env.sleep(timedelta(minutes=1))

    assert (await back.describe()).run_id != first_run_id
    assert (await back.describe()).status.name == "COMPLETED"
    run = await last_run(journeys, customer)
    assert run["status"] == "exited"
    assert run["reason"] == "re-entry not allowed: already went through this journey"
    templates = [row["template"] for row in await journeys.messages(customer)]
    assert templates == ["welcome_1", "welcome_tips", "welcome_offer"]
    assert len(journeys.mail_to("welcome-9@example.com")) == 3


async def test_unsubscribe_while_waiting_for_tips(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("welcome-10")
    start = await journeys.now()
    handle = await journeys.deliver("welcome", await journeys.event("welcome-10", "Signed Up", start))

    await journeys.env.sleep(timedelta(days=1))
    await SuppressionStore(journeys.pool).suppress(customer, channel="email", reason="unsubscribed", source="link")
    await journeys.env.sleep(timedelta(days=2, minutes=1))

    assert (await handle.describe()).status.name == "COMPLETED"
    welcome, tips = await journeys.messages(customer)
    assert welcome["status"] == "sent"
    assert tips["template"] == "welcome_tips"
    assert tips["status"] == "suppressed"
    assert tips["attempts"] == 1
    assert hours_between(tips["step_at"], start) == 3 * 24
    assert len(journeys.mail_to("welcome-10@example.com")) == 1
    run = await last_run(journeys, customer)
    assert run["status"] == "exited"
    assert run["reason"] == "suppressed: unsubscribed"


async def test_welcome_in_indonesian_without_name(journeys: JourneyHarness) -> None:
    customer = await journeys.customer("welcome-11", locale="id-ID")

    await (await journeys.deliver("welcome", await journeys.event("welcome-11", "Signed Up"))).result()

    welcome, tips, offer = journeys.mail_to("welcome-11@example.com")
    assert welcome.subject == "Selamat datang di Bisik Demo Store! 👋"
    assert welcome.text().startswith("Hai Kak!")
    assert tips.subject == "3 tips biar belanja di Bisik Demo Store makin asyik ✨"
    assert offer.subject == "Hadiah kecil buat kamu: diskon 10% belanja pertama 🎁"
    assert "Pakai kode WELCOME-" in offer.text()
    assert [row["locale"] for row in await journeys.messages(customer)] == ["id", "id", "id"]


async def test_stored_order_not_yet_delivered_skips_offer(journeys: JourneyHarness) -> None:
    # The order reached Bisik on day 5 but the relay has not delivered it to the journey.
    customer = await journeys.customer("welcome-late-order")
    start = await journeys.now()
    handle = await journeys.deliver("welcome", await journeys.event("welcome-late-order", "Signed Up", start))
    await journeys.event("welcome-late-order", "Order Completed", start + timedelta(days=5), order_id="o-late")

    await journeys.env.sleep(timedelta(days=7, hours=1))

    messages = await journeys.messages(customer)
    assert [(row["template"], row["status"]) for row in messages] == [
        ("welcome_1", "sent"), ("welcome_tips", "sent"), ("welcome_offer", "skipped"),
    ]
    assert messages[2]["reason"] == "Order Completed stored since the journey began"
    assert (await handle.describe()).status.name == "COMPLETED"
