"""The Segment-compatible ingest API over real HTTP and a real PostgreSQL."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from tests.conftest import SECOND_WRITE_KEY, ApiServer


async def count_rows(pool: asyncpg.Pool, table: str) -> int:
    return await pool.fetchval(f"SELECT count(*) FROM {table}")


async def assert_nothing_stored(pool: asyncpg.Pool) -> None:
    assert await count_rows(pool, "events") == 0
    assert await count_rows(pool, "customers") == 0
    assert await count_rows(pool, "identities") == 0
    assert await count_rows(pool, "outbox") == 0


# Accepted calls


@pytest.mark.parametrize(
    ("path", "body", "stored_type", "stored_name"),
    [
        ("/v1/track", {"userId": "u1", "event": "Product Viewed"}, "track", "Product Viewed"),
        ("/v1/identify", {"userId": "u1", "traits": {"plan": "pro"}}, "identify", None),
        ("/v1/page", {"anonymousId": "a1", "name": "Pricing"}, "page", "Pricing"),
        ("/v1/screen", {"anonymousId": "a1", "name": "Home"}, "screen", "Home"),
        ("/v1/group", {"userId": "u1", "groupId": "g1", "traits": {"n": 1}}, "group", None),
        ("/v1/alias", {"userId": "u1", "previousId": "a1"}, "alias", None),
    ],
)
async def test_each_call_type_is_stored(
    api: httpx.AsyncClient,
    pool: asyncpg.Pool,
    path: str,
    body: dict,
    stored_type: str,
    stored_name: str | None,
) -> None:
    response = await api.post(path, json=body)

    assert response.status_code == 200, response.text
    assert response.json() == {"success": True, "stored": 1, "duplicates": 0}
    row = await pool.fetchrow("SELECT type, name, customer_id, message_id FROM events")
    assert row["type"] == stored_type
    assert row["name"] == stored_name
    assert row["customer_id"].startswith("cus_")
    assert row["message_id"]


async def test_context_properties_traits_stored_as_given(
    api: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    properties = {"price": 19.99, "tags": ["a", "b"], "nested": {"deep": [1, {"x": None}]}}
    context = {"ip": "203.0.113.9", "page": {"path": "/cart"}, "library": {"name": "test"}}
    traits = {"email": "Ann@Example.com", "address": {"city": "Bandung"}}

    await api.post("/v1/track", json={"userId": "u1", "event": "Product Added", "properties": properties, "context": context, "extraField": 7})
    await api.post("/v1/identify", json={"userId": "u1", "traits": traits})

    track = await pool.fetchrow("SELECT properties, context, payload FROM events WHERE type = 'track'")
    identify = await pool.fetchrow("SELECT traits FROM events WHERE type = 'identify'")
    assert track["properties"] == properties
    assert track["context"] == context
    assert track["payload"]["extraField"] == 7
    assert identify["traits"] == traits


async def test_message_id_generated_when_absent(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    await api.post("/v1/track", json={"userId": "u1", "event": "A"})
    await api.post("/v1/track", json={"userId": "u1", "event": "A"})

    message_ids = [row["message_id"] for row in await pool.fetch("SELECT message_id FROM events")]
    assert len(message_ids) == 2
    assert len(set(message_ids)) == 2


async def test_sent_at_corrects_client_clock(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    # The client's clock is two hours fast; the event happened 30 seconds before it was sent.
    client_now = datetime.now(UTC) + timedelta(hours=2)
    client_timestamp = client_now - timedelta(seconds=30)
    before = datetime.now(UTC)

    await api.post(
        "/v1/track",
        json={
            "userId": "u1",
            "event": "A",
            "timestamp": client_timestamp.isoformat(),
            "sentAt": client_now.isoformat(),
        },
    )

    row = await pool.fetchrow("SELECT timestamp, original_timestamp, received_at, sent_at FROM events")
    assert row["original_timestamp"] == client_timestamp
    assert row["sent_at"] == client_now
    assert row["timestamp"] == row["received_at"] - timedelta(seconds=30)
    assert before - timedelta(seconds=31) <= row["timestamp"] <= datetime.now(UTC)


async def test_timestamp_without_sent_at_kept(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    await api.post("/v1/track", json={"userId": "u1", "event": "A", "timestamp": "2024-03-01T10:00:00Z"})

    row = await pool.fetchrow("SELECT timestamp, original_timestamp FROM events")
    assert row["timestamp"] == datetime(2024, 3, 1, 10, tzinfo=UTC)
    assert row["original_timestamp"] == datetime(2024, 3, 1, 10, tzinfo=UTC)


async def test_future_timestamp_replaced_by_arrival(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    await api.post("/v1/track", json={"userId": "u1", "event": "A", "timestamp": "2031-01-01T00:00:00Z"})

    row = await pool.fetchrow("SELECT timestamp, original_timestamp, received_at FROM events")
    assert row["timestamp"] == row["received_at"]
    assert row["original_timestamp"] == datetime(2031, 1, 1, tzinfo=UTC)


async def test_batch_uses_batch_sent_at_and_context(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    sent_at = datetime.now(UTC) - timedelta(days=1)
    response = await api.post(
        "/v1/batch",
        json={
            "sentAt": sent_at.isoformat(),
            "context": {"library": {"name": "batcher"}},
            "batch": [
                {"type": "track", "userId": "u1", "event": "A", "timestamp": (sent_at - timedelta(minutes=5)).isoformat()},
                {"type": "page", "anonymousId": "a9", "name": "Home", "context": {"ip": "1.2.3.4"}},
            ],
        },
    )

    assert response.status_code == 200, response.text
    rows = await pool.fetch("SELECT type, timestamp, received_at, context FROM events ORDER BY id")
    assert rows[0]["timestamp"] == rows[0]["received_at"] - timedelta(minutes=5)
    assert rows[0]["context"] == {"library": {"name": "batcher"}}
    assert rows[1]["context"] == {"library": {"name": "batcher"}, "ip": "1.2.3.4"}


async def test_gzip_body_accepted(api_server: ApiServer, pool: asyncpg.Pool) -> None:
    body = gzip.compress(json.dumps({"batch": [{"type": "track", "userId": "u1", "event": "A"}]}).encode())
    async with api_server.client() as client:
        response = await client.post(
            "/v1/batch", content=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    assert response.status_code == 200, response.text
    assert await count_rows(pool, "events") == 1


# Rejected calls


async def test_missing_write_key_rejected(api_server: ApiServer, pool: asyncpg.Pool) -> None:
    async with api_server.client(write_key=None) as client:
        response = await client.post("/v1/track", json={"userId": "u1", "event": "A"})

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Basic realm="bisik"'
    assert response.json() == {
        "code": "unauthorized",
        "message": "missing write key: send it as the HTTP Basic user name or as writeKey in the JSON body",
    }
    await assert_nothing_stored(pool)


async def test_wrong_write_key_rejected(api_server: ApiServer, pool: asyncpg.Pool) -> None:
    async with api_server.client(write_key="not-the-key") as client:
        response = await client.post("/v1/batch", json={"batch": [{"type": "track", "userId": "u1", "event": "A"}]})

    assert response.status_code == 401
    assert response.json()["message"] == "invalid write key"
    await assert_nothing_stored(pool)


async def test_missing_ids_rejected(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    response = await api.post("/v1/track", json={"event": "Product Viewed"})

    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_request"
    assert body["message"] == "body: userId or anonymousId is required; send at least one of them"
    assert body["detail"][0]["type"] == "missing_identity"
    await assert_nothing_stored(pool)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"userId": 4.2, "event": "A"}, "userId", "Input should be a valid string"),
        ({"userId": True, "event": "A"}, "userId", "Input should be a valid string"),
        ({"userId": "u1", "event": ["A"]}, "event", "Input should be a valid string"),
        ({"userId": "u1"}, "event", "Field required"),
        ({"userId": "u1", "event": "A", "properties": [1, 2]}, "properties", "Input should be a valid dictionary"),
        ({"userId": "u1", "event": "A", "timestamp": "yesterday"}, "timestamp", "Input should be a valid datetime"),
        ({"userId": "", "event": "A"}, "userId", "String should have at least 1 character"),
    ],
)
async def test_wrong_types_rejected(
    api: httpx.AsyncClient, pool: asyncpg.Pool, body: dict, field: str, message: str
) -> None:
    response = await api.post("/v1/track", json=body)

    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail[0]["loc"] == [field]
    assert detail[0]["msg"].startswith(message)
    assert response.json()["message"].startswith(f"{field}: {message}")
    await assert_nothing_stored(pool)


async def test_numeric_user_id_read_as_text(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    numeric = await api.post("/v1/track", json={"userId": 42, "event": "A"})
    text = await api.post("/v1/track", json={"userId": "42", "event": "B"})

    assert numeric.status_code == 200
    assert text.status_code == 200
    owners = await pool.fetch("SELECT DISTINCT customer_id FROM events")
    assert len(owners) == 1
    assert await pool.fetchval("SELECT count(*) FROM events") == 2
    assert await pool.fetchval("SELECT value FROM identities WHERE kind = 'user_id'") == "42"


async def test_batch_with_one_bad_call_stores_nothing(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    response = await api.post(
        "/v1/batch",
        json={
            "batch": [
                {"type": "track", "userId": "u1", "event": "A"},
                {"type": "identify", "traits": {"email": "x@example.com"}},
                {"type": "bogus", "userId": "u1"},
            ]
        },
    )

    assert response.status_code == 400
    body = response.json()
    assert body["message"].startswith("batch[1]: userId or anonymousId is required")
    assert [entry["loc"] for entry in body["detail"]] == [["batch", 1], ["batch", 2]]
    assert "bogus" in body["detail"][1]["msg"]
    await assert_nothing_stored(pool)


async def test_type_mismatch_with_path_rejected(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    response = await api.post("/v1/track", json={"type": "identify", "userId": "u1", "event": "A"})

    assert response.status_code == 400
    assert response.json()["message"] == "type: must be 'track' on /v1/track, got 'identify'"
    await assert_nothing_stored(pool)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"userId": "u1", "event": ', "the request body is not valid JSON: Expecting value at line 1 column 27"),
        (b"[1, 2]", "the request body must be a JSON object, got list"),
        (b"\xff\xfe", "the request body is not UTF-8 text"),
    ],
)
async def test_malformed_json_rejected(
    api: httpx.AsyncClient, pool: asyncpg.Pool, content: bytes, message: str
) -> None:
    response = await api.post("/v1/track", content=content, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json()["message"] == message
    await assert_nothing_stored(pool)


@pytest.mark.parametrize("levels", [100, 5000])
async def test_deeply_nested_body_rejected(api: httpx.AsyncClient, pool: asyncpg.Pool, levels: int) -> None:
    nested = "[" * levels + "]" * levels
    content = ('{"userId": "u1", "event": "A", "properties": {"deep": ' + nested + "}}").encode()

    response = await api.post("/v1/track", content=content, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json()["message"] == "the request body nests deeper than 64 levels"
    await assert_nothing_stored(pool)


async def test_oversize_call_rejected(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    body = {"userId": "u1", "event": "A", "properties": {"blob": "x" * (33 * 1024)}}

    response = await api.post("/v1/track", json=body)

    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    assert response.json()["message"].endswith("the limit is 32768 bytes")
    await assert_nothing_stored(pool)


async def test_oversize_call_inside_batch_rejected(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    calls = [
        {"type": "track", "userId": "u1", "event": "A"},
        {"type": "track", "userId": "u1", "event": "B", "properties": {"blob": "x" * (33 * 1024)}},
    ]

    response = await api.post("/v1/batch", json={"batch": calls})

    assert response.status_code == 413
    assert response.json()["message"].startswith("batch[1] is ")
    await assert_nothing_stored(pool)


async def test_oversize_batch_rejected(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    call = {"type": "track", "userId": "u1", "event": "A", "properties": {"blob": "x" * (20 * 1024)}}

    response = await api.post("/v1/batch", json={"batch": [call] * 30})

    assert response.status_code == 413
    assert response.json()["message"].endswith("the limit is 512000 bytes")
    await assert_nothing_stored(pool)


async def test_oversize_gzip_body_rejected(api_server: ApiServer, pool: asyncpg.Pool) -> None:
    # Small on the wire, far over the limit once decompressed.
    body = gzip.compress(json.dumps({"batch": [{"type": "track", "userId": "u1", "event": "A", "properties": {"blob": "x" * 600_000}}]}).encode())
    async with api_server.client() as client:
        response = await client.post("/v1/batch", content=body, headers={"Content-Encoding": "gzip"})

    assert response.status_code == 413
    await assert_nothing_stored(pool)


# Duplicates


async def test_repeated_message_id_stores_nothing_new(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    call = {"userId": "u1", "event": "Signed Up", "messageId": "m-1"}

    first = await api.post("/v1/track", json=call)
    second = await api.post("/v1/track", json={**call, "properties": {"changed": True}})

    assert first.json() == {"success": True, "stored": 1, "duplicates": 0}
    assert second.json() == {"success": True, "stored": 0, "duplicates": 1}
    assert await count_rows(pool, "events") == 1
    assert await count_rows(pool, "outbox") == 1
    assert await pool.fetchval("SELECT properties FROM events") == {}


async def test_batch_keeps_only_new_ids_once(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    def call(message_id: str) -> dict:
        return {"type": "track", "userId": "u1", "event": "Signed Up", "messageId": message_id}

    await api.post("/v1/track", json={k: v for k, v in call("a").items() if k != "type"})
    response = await api.post("/v1/batch", json={"batch": [call("a"), call("b"), call("c"), call("c")]})

    assert response.json() == {"success": True, "stored": 2, "duplicates": 2}
    stored = [row["message_id"] for row in await pool.fetch("SELECT message_id FROM events ORDER BY id")]
    assert stored == ["a", "b", "c"]
    assert await count_rows(pool, "outbox") == 3


async def test_same_message_id_from_other_write_key_stored(
    api_server: ApiServer, pool: asyncpg.Pool
) -> None:
    call = {"userId": "u1", "event": "A", "messageId": "shared-id"}

    async with api_server.client() as first, api_server.client(SECOND_WRITE_KEY) as second:
        assert (await first.post("/v1/track", json=call)).json()["stored"] == 1
        assert (await second.post("/v1/track", json=call)).json()["stored"] == 1

    sources = {row["source"] for row in await pool.fetch("SELECT source FROM events")}
    assert len(sources) == 2


async def test_events_no_journey_wants_get_no_outbox_row(api: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    await api.post("/v1/screen", json={"anonymousId": "a1", "name": "Home"})
    await api.post("/v1/group", json={"anonymousId": "a1", "groupId": "g"})

    assert await count_rows(pool, "events") == 2
    assert await count_rows(pool, "outbox") == 0


async def test_health(api: httpx.AsyncClient) -> None:
    response = await api.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
