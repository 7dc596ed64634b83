"""Unsubscribing: signed links, RFC 8058 one-click, the survey, and journeys that honour it."""

from __future__ import annotations

import re
from datetime import timedelta

import asyncpg
import httpx

from bisik.links import LinkSigner
from bisik.settings import Settings
from tests.journey_fixtures import JourneyHarness

SHOES = {"product_id": "shoe-1", "name": "Running Shoes", "price": 450.5}


def token_in(url: str) -> str:
    return url.rsplit("/u/", 1)[1]


async def suppressions(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT customer_id, channel, reason, source, message_id FROM suppressions ORDER BY id")


async def test_unsubscribe_link_in_reminder_stops_next_reminder(
    journeys: JourneyHarness, api: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    customer = await journeys.customer("unsub-1", first_name="Ayu", locale="id")
    start = await journeys.now()
    handle = await journeys.deliver("abandoned_cart", await journeys.event("unsub-1", "Product Added", start, **SHOES))
    await journeys.env.sleep(timedelta(hours=4, minutes=1))
    [first] = journeys.mail_to("unsub-1@example.com")
    link = re.search(r"http://\S+/u/\S+", first.text()).group(0)

    page = await api.get("/u/" + token_in(link))
    await journeys.env.sleep(timedelta(hours=21))

    assert page.status_code == 200
    assert "Kamu sudah berhenti berlangganan" in page.text
    assert first.header("List-Unsubscribe") == f"<{link}>"
    assert first.raw_header("List-Unsubscribe") == f"<{link}>"
    assert first.header("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
    assert (await handle.describe()).status.name == "COMPLETED"
    messages = await journeys.messages(customer)
    assert [(row["step"], row["status"]) for row in messages] == [("reminder_1", "sent"), ("reminder_2", "suppressed")]
    assert messages[1]["attempts"] == 1
    assert len(journeys.mail_to("unsub-1@example.com")) == 1
    run = await pool.fetchrow("SELECT status, reason FROM journey_runs WHERE customer_id = $1", customer)
    assert run["status"] == "exited"
    assert run["reason"] == "suppressed: unsubscribed"


async def test_one_click_post_unsubscribes(api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings) -> None:
    await api.post("/v1/identify", json={"userId": "one-click", "traits": {"email": "oc@example.com"}})
    customer = await pool.fetchval("SELECT id FROM customers")
    token = LinkSigner(settings.secret_key.get_secret_value()).unsubscribe_token(customer, 7)

    response = await api.post(
        f"/u/{token}", content="List-Unsubscribe=One-Click", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )

    assert response.status_code == 200
    [row] = await suppressions(pool)
    assert (row["customer_id"], row["channel"], row["reason"], row["source"], row["message_id"]) == (
        customer, "email", "unsubscribed", "one_click", 7,
    )


async def test_repeated_unsubscribe_records_once(api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings) -> None:
    await api.post("/v1/identify", json={"userId": "twice", "traits": {"email": "t@example.com"}})
    customer = await pool.fetchval("SELECT id FROM customers")
    token = LinkSigner(settings.secret_key.get_secret_value()).unsubscribe_token(customer, None)

    first = await api.get(f"/u/{token}")
    second = await api.get(f"/u/{token}")

    assert first.status_code == 200
    assert second.status_code == 200
    assert "You&#39;re unsubscribed" in second.text
    assert len(await suppressions(pool)) == 1
    assert await pool.fetchval("SELECT count(*) FROM events WHERE name = 'Unsubscribed'") == 1


async def test_survey_answer_stored_as_event(api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings) -> None:
    await api.post("/v1/identify", json={"userId": "survey", "traits": {"email": "s@example.com"}})
    customer = await pool.fetchval("SELECT id FROM customers")
    token = LinkSigner(settings.secret_key.get_secret_value()).unsubscribe_token(customer, 12)

    response = await api.post(
        f"/u/{token}/survey",
        content="reason=too_many&comment=Three+a+week+is+a+lot",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )

    assert response.status_code == 200
    assert "Thank you for telling us" in response.text
    answer = await pool.fetchrow("SELECT customer_id, properties FROM events WHERE name = 'Unsubscribe Survey Answered'")
    assert answer["customer_id"] == customer
    assert answer["properties"] == {"reason": "too_many", "comment": "Three a week is a lot", "message_id": 12, "channel": "email"}


async def test_survey_rejects_unknown_reason(api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings) -> None:
    await api.post("/v1/identify", json={"userId": "survey-2", "traits": {"email": "s2@example.com"}})
    customer = await pool.fetchval("SELECT id FROM customers")
    token = LinkSigner(settings.secret_key.get_secret_value()).unsubscribe_token(customer, None)

    response = await api.post(f"/u/{token}/survey", content="reason=<script>", headers={"Content-Type": "application/x-www-form-urlencoded"})

    assert response.status_code == 400
    assert response.json()["message"].startswith("reason: must be one of too_many, not_relevant")
    assert await pool.fetchval("SELECT count(*) FROM events WHERE name = 'Unsubscribe Survey Answered'") == 0


async def test_tampered_token_is_404_without_state_change(
    api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    await api.post("/v1/identify", json={"userId": "victim", "traits": {"email": "v@example.com"}})
    customer = await pool.fetchval("SELECT id FROM customers")
    token = LinkSigner(settings.secret_key.get_secret_value()).unsubscribe_token(customer, None)
    forged_by_other_key = LinkSigner("someone-elses-key-" + "x" * 20).unsubscribe_token(customer, None)
    payload, _, signature = token.partition(".")
    tampered = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + signature

    for bad in (tampered, forged_by_other_key, "not-a-token", token + "x"):
        assert (await api.get(f"/u/{bad}")).status_code == 404
        assert (await api.post(f"/u/{bad}", content="List-Unsubscribe=One-Click")).status_code == 404
        assert (await api.post(f"/u/{bad}/survey", content="reason=other")).status_code == 404

    assert await suppressions(pool) == []
    assert await pool.fetchval("SELECT count(*) FROM events WHERE source = 'bisik'") == 0


async def test_unsubscribe_token_for_another_purpose_rejected(
    api: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings
) -> None:
    await api.post("/v1/identify", json={"userId": "purpose", "traits": {"email": "p@example.com"}})
    customer = await pool.fetchval("SELECT id FROM customers")
    other_purpose = LinkSigner(settings.secret_key.get_secret_value()).sign("click", {"c": customer, "m": 1, "ch": "email"})

    response = await api.get(f"/u/{other_purpose}")

    assert response.status_code == 404
    assert await suppressions(pool) == []


async def test_transactional_message_still_sent_after_unsubscribe(
    journeys: JourneyHarness, pool: asyncpg.Pool
) -> None:
    from activities.suppressions import SuppressionStore

    customer = await journeys.customer("unsub-2")
    await SuppressionStore(pool).suppress(customer, channel="email", reason="unsubscribed", source="link")
    order = {"order_id": "o-9", "total": 10.0, "products": [{"product_id": "p", "name": "Tea", "price": 10.0}]}

    handle = await journeys.deliver("post_purchase", await journeys.event("unsub-2", "Order Completed", **order))
    await journeys.env.sleep(timedelta(days=14, minutes=1))

    messages = await journeys.messages(customer)
    assert [(row["template"], row["status"]) for row in messages] == [
        ("order_thank_you", "sent"),
        ("review_request", "suppressed"),
    ]
    assert (await handle.describe()).status.name == "COMPLETED"


async def test_unsubscribe_day_1_stops_day_3_email_not_thank_you(
    journeys: JourneyHarness, api: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """Emails planned for day 0 and day 3; an unsubscribe on day 1 stops the day-3 email (recorded
    as suppressed, attempted once, not retried) while the order thank-you still goes."""
    customer = await journeys.customer("unsub-3", first_name="Dina")
    start = await journeys.now()
    welcome = await journeys.deliver("welcome", await journeys.event("unsub-3", "Signed Up", start))
    await journeys.env.sleep(timedelta(days=1))
    [welcome_mail] = journeys.mail_to("unsub-3@example.com")
    link = re.search(r"http://\S+/u/\S+", welcome_mail.text()).group(0)

    assert (await api.get("/u/" + token_in(link))).status_code == 200
    await journeys.env.sleep(timedelta(days=1))
    order = {"order_id": "o-3", "total": 12.0, "products": [{"product_id": "p", "name": "Tea", "price": 12.0}]}
    await journeys.deliver("post_purchase", await journeys.event("unsub-3", "Order Completed", **order))
    await journeys.env.sleep(timedelta(days=1, hours=1))

    rows = await journeys.messages(customer)
    assert [(row["template"], row["status"]) for row in rows] == [
        ("welcome_1", "sent"),
        ("order_thank_you", "sent"),
        ("welcome_tips", "suppressed"),
    ]
    assert rows[2]["attempts"] == 1
    assert rows[2]["reason"] == "unsubscribed"
    assert [mail.header("X-Bisik-Step") for mail in journeys.mail_to("unsub-3@example.com")] == ["welcome", "thank_you:o-3"]
    assert (await welcome.describe()).status.name == "COMPLETED"
    run = await pool.fetchrow(
        "SELECT status, reason FROM journey_runs WHERE customer_id = $1 AND journey = 'welcome'", customer
    )
    assert (run["status"], run["reason"]) == ("exited", "suppressed: unsubscribed")
