"""Identity resolution and profile merging, through the HTTP API into a real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import httpx

from activities.identity import combine_traits, merge_traits


async def customer_of(pool: asyncpg.Pool, kind: str, value: str) -> str | None:
    return await pool.fetchval(
        "SELECT customer_id FROM identities WHERE kind = $1 AND value = $2", kind, value
    )


async def event_owners(pool: asyncpg.Pool) -> dict[str, str]:
    rows = await pool.fetch("SELECT message_id, customer_id FROM events")
    return {row["message_id"]: row["customer_id"] for row in rows}


async def test_parallel_identify_creates_one_profile(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    emails = ["Mixed.Case@Example.COM", " mixed.case@example.com", "MIXED.CASE@EXAMPLE.COM "]
    calls = [
        api.post(
            "/v1/identify",
            json={"userId": "user-50", "traits": {"email": emails[i % 3], "first_name": "Sari"}},
        )
        for i in range(50)
    ]

    responses = await asyncio.gather(*calls)

    assert [response.status_code for response in responses] == [200] * 50
    assert await pool.fetchval("SELECT count(*) FROM customers") == 1
    customer = await pool.fetchrow("SELECT id, user_id, email FROM customers")
    assert customer["user_id"] == "user-50"
    assert customer["email"] == "mixed.case@example.com"
    identities = await pool.fetch("SELECT kind, value, customer_id FROM identities ORDER BY kind")
    assert [(row["kind"], row["value"]) for row in identities] == [
        ("email", "mixed.case@example.com"),
        ("user_id", "user-50"),
    ]
    assert {row["customer_id"] for row in identities} == {customer["id"]}
    assert await pool.fetchval("SELECT count(*) FROM events") == 50


async def test_identify_attaches_anonymous_history(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    await api.post("/v1/page", json={"anonymousId": "anon-1", "name": "Home", "messageId": "p1"})
    await api.post("/v1/track", json={"anonymousId": "anon-1", "event": "Product Viewed", "messageId": "t1"})
    anonymous_customer = await customer_of(pool, "anonymous_id", "anon-1")

    await api.post("/v1/identify", json={"userId": "ann", "anonymousId": "anon-1", "messageId": "i1"})

    assert await customer_of(pool, "user_id", "ann") == anonymous_customer
    assert set((await event_owners(pool)).values()) == {anonymous_customer}
    assert await pool.fetchval("SELECT count(*) FROM customers") == 1


async def test_returning_user_merges_new_device_history(
    api: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await api.post("/v1/identify", json={"userId": "ann", "traits": {"plan": "pro"}, "timestamp": "2024-01-01T00:00:00Z"})
    known = await customer_of(pool, "user_id", "ann")
    await api.post("/v1/identify", json={"anonymousId": "phone", "traits": {"city": "Medan"}, "messageId": "phone-1"})
    phone_customer = await customer_of(pool, "anonymous_id", "phone")
    assert phone_customer != known

    await api.post("/v1/track", json={"userId": "ann", "anonymousId": "phone", "event": "Signed In"})

    assert await customer_of(pool, "anonymous_id", "phone") == known
    assert set((await event_owners(pool)).values()) == {known}
    profile = await pool.fetchrow("SELECT traits FROM customers WHERE id = $1", known)
    assert profile["traits"] == {"plan": "pro", "city": "Medan"}
    merged = await pool.fetchrow("SELECT merged_into FROM customers WHERE id = $1", phone_customer)
    assert merged["merged_into"] == known


async def test_known_users_never_merged_through_shared_anonymous_id(
    api: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    # Two people share a laptop: same anonymous id, two accounts.
    await api.post("/v1/identify", json={"userId": "ann", "anonymousId": "laptop", "messageId": "ann-1"})
    await api.post("/v1/track", json={"anonymousId": "laptop", "event": "Product Viewed", "messageId": "ann-2"})
    ann = await customer_of(pool, "user_id", "ann")

    await api.post("/v1/identify", json={"userId": "budi", "anonymousId": "laptop", "messageId": "budi-1"})
    await api.post("/v1/track", json={"anonymousId": "laptop", "event": "Product Viewed", "messageId": "budi-2"})
    budi = await customer_of(pool, "user_id", "budi")

    assert ann != budi
    assert await customer_of(pool, "anonymous_id", "laptop") == budi
    owners = await event_owners(pool)
    assert owners == {"ann-1": ann, "ann-2": ann, "budi-1": budi, "budi-2": budi}
    assert await pool.fetchval("SELECT merged_into FROM customers WHERE id = $1", ann) is None


async def test_known_users_never_merged_through_shared_email(
    api: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await api.post("/v1/identify", json={"userId": "ann", "traits": {"email": "family@example.com"}})
    await api.post("/v1/identify", json={"userId": "budi", "traits": {"email": "Family@example.com"}})

    ann = await customer_of(pool, "user_id", "ann")
    budi = await customer_of(pool, "user_id", "budi")
    assert ann != budi
    assert await customer_of(pool, "email", "family@example.com") == budi


async def test_anonymous_call_with_known_email_joins_that_customer(
    api: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await api.post("/v1/identify", json={"userId": "ann", "traits": {"email": "ann@example.com"}})
    await api.post("/v1/page", json={"anonymousId": "tablet", "name": "Home"})

    await api.post("/v1/identify", json={"anonymousId": "tablet", "traits": {"email": "ANN@example.com"}})

    ann = await customer_of(pool, "user_id", "ann")
    assert await customer_of(pool, "anonymous_id", "tablet") == ann
    assert set((await event_owners(pool)).values()) == {ann}


async def test_traits_merge_by_event_timestamp(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    await api.post(
        "/v1/identify",
        json={"userId": "ann", "timestamp": "2024-05-02T10:00:00Z", "traits": {"plan": "pro", "email": "new@example.com"}},
    )
    # Arrives later but happened earlier: must not undo the newer values.
    await api.post(
        "/v1/identify",
        json={"userId": "ann", "timestamp": "2024-05-01T10:00:00Z", "traits": {"plan": "free", "email": "old@example.com", "city": "Solo"}},
    )

    profile = await pool.fetchrow("SELECT traits, email FROM customers")
    assert profile["traits"] == {"plan": "pro", "email": "new@example.com", "city": "Solo"}
    assert profile["email"] == "new@example.com"


async def test_alias_links_previous_id(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    await api.post("/v1/track", json={"anonymousId": "anon-9", "event": "Product Viewed"})
    anonymous_customer = await customer_of(pool, "anonymous_id", "anon-9")

    response = await api.post("/v1/alias", json={"previousId": "anon-9", "userId": "citra"})

    assert response.status_code == 200
    assert await customer_of(pool, "user_id", "citra") == anonymous_customer


async def test_alias_merges_two_known_customers(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    await api.post("/v1/identify", json={"userId": "old-id", "traits": {"tier": "gold"}})
    await api.post("/v1/identify", json={"userId": "new-id", "traits": {"city": "Depok"}})
    old = await customer_of(pool, "user_id", "old-id")
    new = await customer_of(pool, "user_id", "new-id")

    await api.post("/v1/alias", json={"previousId": "old-id", "userId": "new-id"})

    assert await customer_of(pool, "user_id", "old-id") == new
    assert set((await event_owners(pool)).values()) == {new}
    assert await pool.fetchval("SELECT merged_into FROM customers WHERE id = $1", old) == new


def test_merge_traits_keeps_newer_values() -> None:
    at_noon = datetime(2024, 1, 1, 12, tzinfo=UTC)
    at_nine = datetime(2024, 1, 1, 9, tzinfo=UTC)
    traits, stamps = merge_traits({}, {}, {"plan": "pro"}, at_noon)

    traits, stamps = merge_traits(traits, stamps, {"plan": "free", "city": "Bogor"}, at_nine)

    assert traits == {"plan": "pro", "city": "Bogor"}
    assert stamps == {"plan": at_noon.isoformat(), "city": at_nine.isoformat()}


def test_combine_traits_takes_each_from_latest_setter() -> None:
    earlier = ({"plan": "pro", "city": "Bogor"}, {"plan": "2024-01-03T00:00:00+00:00", "city": "2024-01-01T00:00:00+00:00"})
    later = ({"plan": "free", "city": "Solo"}, {"plan": "2024-01-02T00:00:00+00:00", "city": "2024-01-02T00:00:00+00:00"})

    traits, _ = combine_traits(earlier, later)

    assert traits == {"plan": "pro", "city": "Solo"}


def test_merge_traits_compares_instants_across_offsets() -> None:
    jakarta = datetime.fromisoformat("2024-01-01T12:00:00+07:00")  # 05:00 UTC
    utc_later = datetime(2024, 1, 1, 6, tzinfo=UTC)
    traits, stamps = merge_traits({}, {}, {"plan": "pro"}, jakarta)

    traits, _ = merge_traits(traits, stamps, {"plan": "free"}, utc_later)

    assert traits == {"plan": "free"}
