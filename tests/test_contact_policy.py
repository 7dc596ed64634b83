"""The contact policy: frequency caps, priorities, quiet hours across DST, consent, bounces."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest

from activities.db import create_pool
from activities.messaging import MessagingActivities
from bisik.models import SendRequest
from bisik.policy import FrequencyCap, QuietHours, earliest_within_caps, local_instant, parse_caps
from bisik.settings import Settings
from tests.helpers import store_call
from tests.journey_fixtures import JourneyHarness
from workers.stack import MailSink

T0 = datetime(2024, 5, 6, 3, 0, tzinfo=UTC)  # 10:00 in Jakarta
PARIS = ZoneInfo("Europe/Paris")


# The arithmetic


def test_parse_caps_reads_channels_and_windows() -> None:
    caps = parse_caps("email:1/16h, all:3/7d, sms:2/30m")

    assert caps == [
        FrequencyCap("email", 1, timedelta(hours=16)),
        FrequencyCap("all", 3, timedelta(days=7)),
        FrequencyCap("sms", 2, timedelta(minutes=30)),
    ]


@pytest.mark.parametrize("text", ["email:1", "fax:1/1h", "email:0/1h", "email:1/16w"])
def test_parse_caps_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="invalid frequency cap"):
        parse_caps(text)


def test_caps_push_messages_to_next_free_slots() -> None:
    caps = parse_caps("email:1/16h,email:3/7d")
    sent = [(T0, "email"), (T0 + timedelta(hours=16), "email"), (T0 + timedelta(hours=32), "email")]

    assert earliest_within_caps(T0, sent[:1], caps, "email") == T0 + timedelta(hours=16)
    assert earliest_within_caps(T0, sent[:2], caps, "email") == T0 + timedelta(hours=32)
    assert earliest_within_caps(T0, sent, caps, "email") == T0 + timedelta(days=7)
    assert earliest_within_caps(T0, sent, caps, "whatsapp") == T0


def test_scheduled_local_hour_survives_clock_change() -> None:
    # Planned on 2024-10-24 (New York on daylight time) for 14:00 local on 2024-11-08 (standard time).
    assert local_instant(date(2024, 11, 8), time(14), ZoneInfo("America/New_York")) == datetime(2024, 11, 8, 19, tzinfo=UTC)


def test_quiet_hours_twice_occurring_time_opens_once() -> None:
    window = QuietHours.parse("22:00-07:00")  # sending window 07:00-22:00
    first = datetime(2024, 10, 27, 2, 30, tzinfo=PARIS, fold=0)
    second = datetime(2024, 10, 27, 2, 30, tzinfo=PARIS, fold=1)

    assert window.next_allowed(first.astimezone(UTC), PARIS) == datetime(2024, 10, 27, 6, tzinfo=UTC)
    assert window.next_allowed(second.astimezone(UTC), PARIS) == datetime(2024, 10, 27, 6, tzinfo=UTC)


def test_quiet_hours_skipped_local_time_handled() -> None:
    window = QuietHours.parse("22:00-07:00")
    skipped = local_instant(date(2024, 3, 31), time(2, 30), PARIS)

    assert skipped == datetime(2024, 3, 31, 1, 30, tzinfo=UTC)  # read as 03:30 summer time
    assert window.next_allowed(skipped, PARIS) == datetime(2024, 3, 31, 5, tzinfo=UTC)


def test_quiet_hours_outside_window_unchanged() -> None:
    window = QuietHours.parse("21:00-08:00")
    noon_jakarta = datetime(2024, 5, 6, 5, tzinfo=UTC)

    assert window.next_allowed(noon_jakarta, ZoneInfo("Asia/Jakarta")) == noon_jakarta


@pytest.mark.parametrize("text", ["21-08", "25:00-08:00", "08:00-08:00"])
def test_quiet_hours_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="invalid quiet hours"):
        QuietHours.parse(text)


# Against the message log


@pytest.fixture
def policy_settings(settings: Settings, mail_sink: MailSink) -> Settings:
    settings.smtp_port = mail_sink.port
    settings.frequency_caps = "email:1/16h,email:3/7d"
    settings.quiet_hours = "off"
    return settings


async def customer(pool: asyncpg.Pool, user_id: str, **traits: object) -> str:
    event = await store_call(pool, {"type": "identify", "userId": user_id, "traits": {"email": f"{user_id}@example.com", **traits}})
    return event.customer_id


def request(customer_id: str, journey: str, at: datetime, **overrides: object) -> SendRequest:
    fields = {
        "idempotency_key": f"{journey}:{customer_id}:step",
        "customer_id": customer_id,
        "journey": journey,
        "workflow_id": f"{journey}:{customer_id}",
        "step": "step",
        "template": "cart_reminder_1",
        "data": {"cart": {"items": [{"name": "Tea", "price": 3.0, "quantity": 1, "image_url": None, "url": None}], "total": 3.0, "currency": "USD"}},
        "step_at": at,
    }
    return SendRequest(**{**fields, **overrides})


async def test_three_journeys_within_an_hour_send_one_defer_two(
    pool: asyncpg.Pool, policy_settings: Settings, mail_sink: MailSink
) -> None:
    customer_id = await customer(pool, "capped")
    activities = MessagingActivities(pool, policy_settings)

    first = await activities.send_message(request(customer_id, "welcome", T0))
    second = await activities.send_message(request(customer_id, "high_intent", T0 + timedelta(minutes=20)))
    third = await activities.send_message(request(customer_id, "abandoned_cart", T0 + timedelta(minutes=40)))

    assert first.status == "sent"
    assert second.status == "deferred"
    assert second.deferred_until == T0 + timedelta(hours=16)
    assert third.status == "deferred"
    assert third.deferred_until == T0 + timedelta(hours=32)
    assert second.reason == f"deferred until {(T0 + timedelta(hours=16)).isoformat()} by frequency caps email:1/16h, email:3/7d"
    assert len(mail_sink.messages) == 1

    # When their moments come, each goes out; earlier is still too early.
    early = await activities.send_message(request(customer_id, "high_intent", T0 + timedelta(hours=15)))
    on_time = await activities.send_message(request(customer_id, "high_intent", T0 + timedelta(hours=16)))
    assert early.status == "deferred"
    assert on_time.status == "sent"
    rows = await pool.fetch("SELECT journey, status, deferred_until, decision FROM messages ORDER BY id")
    assert [(row["journey"], row["status"]) for row in rows] == [
        ("welcome", "sent"), ("high_intent", "sent"), ("abandoned_cart", "deferred"),
    ]
    assert rows[2]["decision"].startswith("deferred until")


async def test_higher_priority_goes_first(pool: asyncpg.Pool, policy_settings: Settings) -> None:
    customer_id = await customer(pool, "priorities")
    activities = MessagingActivities(pool, policy_settings)
    await activities.send_message(request(customer_id, "welcome", T0))

    low = await activities.send_message(request(customer_id, "browse_abandonment", T0 + timedelta(minutes=1), priority=3))
    high = await activities.send_message(request(customer_id, "abandoned_cart", T0 + timedelta(minutes=2), priority=8))
    low_again = await activities.send_message(request(customer_id, "browse_abandonment", T0 + timedelta(minutes=3), priority=3))

    assert low.deferred_until == T0 + timedelta(hours=16)
    assert high.deferred_until == T0 + timedelta(hours=16)
    assert low_again.deferred_until == T0 + timedelta(hours=32)


async def test_droppable_message_dropped_not_deferred(pool: asyncpg.Pool, policy_settings: Settings) -> None:
    customer_id = await customer(pool, "droppable")
    activities = MessagingActivities(pool, policy_settings)
    await activities.send_message(request(customer_id, "welcome", T0))

    dropped = await activities.send_message(request(customer_id, "high_intent", T0 + timedelta(hours=1), droppable=True))
    past_deadline = await activities.send_message(
        request(customer_id, "abandoned_cart", T0 + timedelta(hours=1), deadline=T0 + timedelta(hours=10))
    )

    assert dropped.status == "dropped"
    assert past_deadline.status == "dropped"
    assert "past its deadline" in past_deadline.reason


async def test_transactional_bypasses_and_does_not_count(
    pool: asyncpg.Pool, policy_settings: Settings, mail_sink: MailSink
) -> None:
    customer_id = await customer(pool, "transactional")
    activities = MessagingActivities(pool, policy_settings)
    order = {"order": {"order_id": "o", "items": [], "total": 1.0, "currency": "USD"}}

    thanks = await activities.send_message(request(customer_id, "post_purchase", T0, template="order_thank_you", transactional=True, data=order))
    marketing = await activities.send_message(request(customer_id, "welcome", T0 + timedelta(minutes=1)))

    assert thanks.status == "sent"
    assert marketing.status == "sent"
    assert len(mail_sink.messages) == 2


async def test_two_workers_racing_pass_cap_once(
    pool: asyncpg.Pool, policy_settings: Settings, database_url: str, mail_sink: MailSink
) -> None:
    customer_id = await customer(pool, "racing")
    other_pool = await create_pool(database_url, min_size=1, max_size=4)
    try:
        worker_a = MessagingActivities(pool, policy_settings)
        worker_b = MessagingActivities(other_pool, policy_settings)
        results = await asyncio.gather(
            *(
                worker.send_message(request(customer_id, f"journey_{number}", T0))
                for number, worker in enumerate([worker_a, worker_b] * 3)
            )
        )
    finally:
        await other_pool.close()

    statuses = sorted(result.status for result in results)
    assert statuses == ["deferred"] * 5 + ["sent"]
    assert len(mail_sink.messages) == 1


async def test_quiet_hours_defer_to_local_morning(
    pool: asyncpg.Pool, policy_settings: Settings, mail_sink: MailSink
) -> None:
    policy_settings.frequency_caps = ""
    policy_settings.quiet_hours = "22:00-07:00"
    customer_id = await customer(pool, "paris", timezone="Europe/Paris")
    activities = MessagingActivities(pool, policy_settings)
    first_0230 = datetime(2024, 10, 27, 2, 30, tzinfo=PARIS, fold=0).astimezone(UTC)
    second_0230 = datetime(2024, 10, 27, 2, 30, tzinfo=PARIS, fold=1).astimezone(UTC)

    at_first = await activities.send_message(request(customer_id, "welcome", first_0230))
    at_second = await activities.send_message(request(customer_id, "welcome", second_0230))
    at_opening = await activities.send_message(request(customer_id, "welcome", datetime(2024, 10, 27, 6, tzinfo=UTC)))
    again = await activities.send_message(request(customer_id, "welcome", datetime(2024, 10, 27, 6, 5, tzinfo=UTC)))

    assert at_first.deferred_until == datetime(2024, 10, 27, 6, tzinfo=UTC)
    assert at_second.deferred_until == datetime(2024, 10, 27, 6, tzinfo=UTC)
    assert "quiet hours 22:00-07:00 in Europe/Paris" in at_first.reason
    assert at_opening.status == "sent"
    assert again.status == "sent"
    assert len(mail_sink.messages) == 1


async def test_quiet_hours_skipped_local_time_sends_without_error(
    pool: asyncpg.Pool, policy_settings: Settings
) -> None:
    policy_settings.quiet_hours = "22:00-07:00"
    customer_id = await customer(pool, "spring", timezone="Europe/Paris")
    activities = MessagingActivities(pool, policy_settings)

    result = await activities.send_message(request(customer_id, "welcome", local_instant(date(2024, 3, 31), time(2, 30), PARIS)))

    assert result.status == "deferred"
    assert result.deferred_until == datetime(2024, 3, 31, 5, tzinfo=UTC)


async def test_unknown_time_zone_uses_account_zone(pool: asyncpg.Pool, policy_settings: Settings) -> None:
    policy_settings.frequency_caps = ""
    policy_settings.quiet_hours = "21:00-08:00"
    customer_id = await customer(pool, "nowhere", timezone="Mars/Olympus_Mons")
    activities = MessagingActivities(pool, policy_settings)

    result = await activities.send_message(request(customer_id, "welcome", datetime(2024, 5, 6, 15, tzinfo=UTC)))

    assert result.deferred_until == datetime(2024, 5, 7, 1, tzinfo=UTC)  # 08:00 in Jakarta


# Inside a journey


async def test_cart_reminder_waits_for_cap_then_sends(
    journeys: JourneyHarness, policy_settings: Settings
) -> None:
    customer_id = await journeys.customer("cart-capped")
    start = await journeys.now()
    activities = MessagingActivities(journeys.pool, policy_settings)
    await activities.send_message(request(customer_id, "newsletter", start + timedelta(hours=3)))

    handle = await journeys.deliver("abandoned_cart", await journeys.event("cart-capped", "Product Added", start, product_id="p", name="Tea", price=3.0))
    await journeys.env.sleep(timedelta(hours=36))

    rows = await journeys.messages(customer_id)
    cart = [row for row in rows if row["journey"] == "abandoned_cart"]
    assert [row["status"] for row in cart] == ["sent", "sent"]
    assert abs(cart[0]["step_at"] - start - timedelta(hours=19)) < timedelta(seconds=1)
    assert abs(cart[1]["step_at"] - start - timedelta(hours=35)) < timedelta(seconds=1)
    assert (await handle.describe()).status.name == "COMPLETED"


# Consent and bounces, through the API


async def test_consent_updated_recorded(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    response = await api.post(
        "/v1/track",
        json={"userId": "consenting", "event": "Consent Updated", "properties": {"channel": "whatsapp", "granted": True, "source": "checkout"}},
    )

    assert response.status_code == 200
    row = await pool.fetchrow("SELECT channel, topic, granted, source FROM consents")
    assert dict(row) == {"channel": "whatsapp", "topic": None, "granted": True, "source": "checkout"}


@pytest.mark.parametrize(
    ("properties", "message"),
    [
        ({"channel": "fax", "granted": True}, "properties.channel must be email, whatsapp or sms, got 'fax'"),
        ({"channel": "sms", "granted": "yes"}, "properties.granted must be true or false"),
        ({"channel": "sms", "granted": True, "topic": ""}, "properties.topic must be a string of 1 to 100 characters"),
    ],
)
async def test_consent_updated_validated(
    api: httpx.AsyncClient, pool: asyncpg.Pool, properties: dict, message: str
) -> None:
    response = await api.post("/v1/track", json={"userId": "u", "event": "Consent Updated", "properties": properties})

    assert response.status_code == 400
    assert response.json()["message"] == f"body: {message}"
    assert await pool.fetchval("SELECT count(*) FROM events") == 0


async def test_whatsapp_needs_consent_email_does_not(pool: asyncpg.Pool, policy_settings: Settings) -> None:
    policy_settings.frequency_caps = ""
    customer_id = await customer(pool, "consent")
    activities = MessagingActivities(pool, policy_settings)

    refusal = await activities.policy.consent_refusal(customer_id, "whatsapp", None)
    email = await activities.policy.consent_refusal(customer_id, "email", None)
    await store_call(pool, {"type": "track", "userId": "consent", "event": "Consent Updated", "properties": {"channel": "whatsapp", "granted": True}})
    granted = await activities.policy.consent_refusal(customer_id, "whatsapp", None)
    await store_call(pool, {"type": "track", "userId": "consent", "event": "Consent Updated", "properties": {"channel": "whatsapp", "granted": False, "topic": "promotions"}})
    topic_revoked = await activities.policy.consent_refusal(customer_id, "whatsapp", "promotions")
    other_topic = await activities.policy.consent_refusal(customer_id, "whatsapp", "restock")

    assert refusal == "no consent: whatsapp marketing needs the customer's consent"
    assert email is None
    assert granted is None
    assert topic_revoked == "no consent: whatsapp consent withdrawn"
    assert other_topic is None


async def test_hard_bounce_suppresses_address_in_every_journey(
    api: httpx.AsyncClient, pool: asyncpg.Pool, policy_settings: Settings, mail_sink: MailSink
) -> None:
    await api.post("/v1/identify", json={"userId": "bouncer", "traits": {"email": "gone@example.com"}})
    await api.post("/v1/track", json={"userId": "bouncer", "event": "Email Bounced", "properties": {"bounce_type": "hard", "email_id": "m-1"}})
    customer_id = await pool.fetchval("SELECT id FROM customers")
    activities = MessagingActivities(pool, policy_settings)

    results = [await activities.send_message(request(customer_id, journey, T0)) for journey in ("welcome", "abandoned_cart", "browse_abandonment")]

    assert [result.status for result in results] == ["suppressed"] * 3
    assert [result.reason for result in results] == ["hard_bounce"] * 3
    assert mail_sink.messages == []


async def test_soft_bounce_does_not_suppress(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    await api.post("/v1/track", json={"userId": "soft", "event": "Email Bounced", "properties": {"bounce_type": "soft"}})
    await api.post("/v1/track", json={"userId": "spam", "event": "Email Marked as Spam", "properties": {}})

    reasons = [row["reason"] for row in await pool.fetch("SELECT reason FROM suppressions")]
    assert reasons == ["complaint"]


async def test_channel_withdrawal_outranks_topic_grant(pool: asyncpg.Pool, policy_settings: Settings) -> None:
    customer_id = await customer(pool, "withdrawn")
    activities = MessagingActivities(pool, policy_settings)
    await store_call(pool, {"type": "track", "userId": "withdrawn", "event": "Consent Updated", "properties": {"channel": "whatsapp", "granted": True, "topic": "promotions"}})
    await store_call(pool, {"type": "track", "userId": "withdrawn", "event": "Consent Updated", "properties": {"channel": "whatsapp", "granted": False}})

    refusal = await activities.policy.consent_refusal(customer_id, "whatsapp", "promotions")

    assert refusal == "no consent: whatsapp consent withdrawn"


async def test_local_hour_planned_before_clock_change_lands_after_it(
    time_skipping_env, pool: asyncpg.Pool, settings: Settings
) -> None:  # type: ignore[no-untyped-def]
    from tests.journeys import LocalProbe
    from workers.relay import signal_with_start
    from workers.worker import build_worker

    # 14:00 in New York on the Monday after clocks go back next year, planned today: the shared
    # test server's clock may be anywhere, so the date is taken relative to it.
    now = await time_skipping_env.get_current_time()
    clocks_go_back = date(now.year + 1, 11, 1)
    while clocks_go_back.weekday() != 6:  # the first Sunday of November
        clocks_go_back += timedelta(days=1)
    target_day = clocks_go_back + timedelta(days=1)
    expected = datetime(target_day.year, target_day.month, target_day.day, 19, tzinfo=UTC)  # 14:00 EST
    await store_call(pool, {"type": "identify", "userId": "new-york", "traits": {"email": "ny@example.com", "timezone": "America/New_York"}})
    start = await store_call(
        pool,
        {"type": "track", "userId": "new-york", "event": "Local Probe Started",
         "properties": {"day": target_day.isoformat(), "clock": "14:00"}, "timestamp": now.isoformat()},
    )  # fmt: skip
    async with build_worker(time_skipping_env.client, pool, settings, journeys=[LocalProbe]) as worker:
        handle = await signal_with_start(
            time_skipping_env.client, journey="local_probe", event=start, task_queue=worker.task_queue, search_attributes=False
        )
        await handle.result()
        state = await handle.query("journey_state")

    assert datetime.fromisoformat(state["planned_for"]) == expected
    assert datetime.fromisoformat(state["woke_at"]) >= expected
    assert datetime.fromisoformat(state["woke_at"]) - expected < timedelta(seconds=5)
