"""From HTTP to journey workflows: the outbox relay against a real Temporal dev server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
from segment.analytics import Client as SegmentClient
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from bisik.models import CUSTOMER_ID_ATTRIBUTE, JOURNEY_ATTRIBUTE, JourneyEvent
from bisik.settings import Settings
from tests.conftest import WRITE_KEY, ApiServer, RunningWorker
from tests.helpers import assert_eventually
from workers.relay import OutboxRelay
from workers.stack import MailSink, TemporalDevServer, free_port
from workflows.matching import track
from workflows.registry import RoutingIndex
from workflows.welcome import Welcome


async def customer_id_of(pool: asyncpg.Pool, user_id: str) -> str:
    return await pool.fetchval("SELECT customer_id FROM identities WHERE kind = 'user_id' AND value = $1", user_id)


async def event_ids_of(pool: asyncpg.Pool, customer_id: str) -> list[int]:
    rows = await pool.fetch("SELECT id FROM events WHERE customer_id = $1 ORDER BY id", customer_id)
    return [row["id"] for row in rows]


async def workflow_runs(client: Client, workflow_id: str) -> int:
    return len([run async for run in client.list_workflows(f"WorkflowId = '{workflow_id}'")])


async def wait_for_outbox_empty(pool: asyncpg.Pool, timeout: float = 30.0) -> None:
    async def check() -> None:
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0

    await assert_eventually(check, timeout=timeout)


def test_routing_index_matches_by_type_and_name() -> None:
    index = RoutingIndex()

    identify = JourneyEvent(id=1, message_id="m", type="identify", customer_id="c", timestamp="2024-01-01T00:00:00Z", received_at="2024-01-01T00:00:00Z", traits={"email": "a@example.com", "subscribed": True})
    identify_without_subscription = identify.model_copy(update={"traits": {"email": "a@example.com"}})
    signed_up = identify.model_copy(update={"type": "track", "name": "Signed Up", "traits": {}})
    screen = identify.model_copy(update={"type": "screen", "name": "Home"})

    assert [(route.journey.name, route.starts) for route in index.routes(identify)] == [("welcome", True)]
    assert index.routes(identify_without_subscription) == []
    assert [(route.journey.name, route.starts) for route in index.routes(signed_up)] == [("welcome", True), ("re_engagement", True)]
    assert index.routes(screen) == []
    assert track("Signed Up").matches(signed_up)


async def test_segment_library_events_reach_journey(
    api_server: ApiServer, running_worker: RunningWorker, pool: asyncpg.Pool, temporal_client: Client
) -> None:
    errors: list[Exception] = []
    segment = SegmentClient(
        WRITE_KEY,
        host=api_server.url,
        upload_size=50,
        max_retries=3,
        on_error=lambda error, _batch: errors.append(error),
    )

    def send() -> None:
        segment.identify("seg-user", {"email": "Seg.User@Example.com", "first_name": "Dewi", "subscribed": True})
        segment.track("seg-user", "Product Viewed", {"product_id": "p1"})
        segment.page("seg-user", "Docs", "Pricing", {"path": "/pricing"})
        for number in range(120):
            segment.page("seg-user", "Docs", f"Page {number}", {"path": f"/docs/{number}"})
        segment.flush()
        segment.join()

    await asyncio.to_thread(send)

    assert errors == []
    customer_id = await customer_id_of(pool, "seg-user")
    stored = await event_ids_of(pool, customer_id)
    assert len(stored) == 123
    types = await pool.fetch("SELECT type, count(*) FROM events GROUP BY type ORDER BY type")
    assert [(row["type"], row["count"]) for row in types] == [("identify", 1), ("page", 121), ("track", 1)]
    library = await pool.fetchval("SELECT context -> 'library' ->> 'name' FROM events LIMIT 1")
    assert library == "analytics-python"

    handle = temporal_client.get_workflow_handle(f"welcome:{customer_id}")

    # Welcome follows page views but not product views.
    wanted = [row["id"] for row in await pool.fetch("SELECT id FROM events WHERE type <> 'track' ORDER BY id")]

    async def journey_has_everything() -> None:
        assert await handle.query(Welcome.seen_event_ids) == wanted

    await assert_eventually(journey_has_everything)
    description = await handle.describe()
    assert description.typed_search_attributes.get(CUSTOMER_ID_ATTRIBUTE) == customer_id
    assert description.typed_search_attributes.get(JOURNEY_ATTRIBUTE) == "welcome"


async def test_parallel_identify_starts_one_journey(
    api: httpx.AsyncClient, running_worker: RunningWorker, pool: asyncpg.Pool, temporal_client: Client
) -> None:
    calls = [
        api.post("/v1/identify", json={"userId": "parallel", "traits": {"email": "Par.Allel@Example.com", "subscribed": True}})
        for _ in range(50)
    ]
    await asyncio.gather(*calls)
    await wait_for_outbox_empty(pool)

    customer_id = await customer_id_of(pool, "parallel")
    workflow_id = f"welcome:{customer_id}"
    assert await workflow_runs(temporal_client, workflow_id) == 1
    assert await pool.fetchval("SELECT count(*) FROM customers") == 1
    assert await pool.fetchval("SELECT count(*) FROM journey_runs") == 1
    handle = temporal_client.get_workflow_handle(workflow_id)
    assert len(await handle.query(Welcome.seen_event_ids)) == 50


async def test_listen_only_event_without_active_run_starts_nothing(
    api: httpx.AsyncClient, running_worker: RunningWorker, pool: asyncpg.Pool, temporal_client: Client
) -> None:
    # Welcome listens to page views but does not start on them.
    await api.post("/v1/page", json={"userId": "browser", "name": "Home"})
    await wait_for_outbox_empty(pool)

    customer_id = await customer_id_of(pool, "browser")
    assert await workflow_runs(temporal_client, f"welcome:{customer_id}") == 0
    assert await pool.fetchval("SELECT count(*) FROM journey_runs") == 0


async def test_events_reach_journey_in_customer_order(
    api: httpx.AsyncClient, running_worker: RunningWorker, pool: asyncpg.Pool, temporal_client: Client
) -> None:
    await api.post("/v1/identify", json={"userId": "ordered", "traits": {"email": "o@example.com", "subscribed": True}})
    batch = [{"type": "page", "userId": "ordered", "name": f"Step {n}"} for n in range(40)]
    await api.post("/v1/batch", json={"batch": batch})
    await wait_for_outbox_empty(pool)

    customer_id = await customer_id_of(pool, "ordered")
    handle = temporal_client.get_workflow_handle(f"welcome:{customer_id}")
    assert await handle.query(Welcome.seen_event_ids) == await event_ids_of(pool, customer_id)


async def test_events_accepted_while_temporal_down_all_arrive_once(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path, mail_sink: MailSink
) -> None:
    # A Temporal of this test's own, so it can be stopped and started again on its own file.
    server = TemporalDevServer(port=free_port(), ui_port=None, db_file=tmp_path / "temporal.sqlite")
    settings.temporal_address = server.address
    settings.smtp_port = mail_sink.port
    await server.start()
    client = await Client.connect(server.address, data_converter=pydantic_data_converter)
    api_server = ApiServer(settings)
    await api_server.start()
    worker = RunningWorker(client, pool, settings)
    await worker.start()
    try:
        # Temporal goes away; the API keeps accepting and the relay keeps trying.
        await server.stop()
        users = [f"offline-{n}" for n in range(50)]
        async with api_server.client() as api:
            for user in users:
                for call in (
                    {"type": "identify", "userId": user, "traits": {"email": f"{user}@example.com", "subscribed": True}},
                    {"type": "page", "userId": user, "name": "Pricing"},
                ):
                    response = await api.post("/v1/batch", json={"batch": [call]})
                    assert response.status_code == 200
        assert await pool.fetchval("SELECT count(*) FROM events") == 100

        async def relay_tried_and_kept_everything() -> None:
            assert await pool.fetchval("SELECT max(attempts) FROM outbox") >= 1
            assert await pool.fetchval("SELECT count(*) FROM outbox") == 100

        await assert_eventually(relay_tried_and_kept_everything, timeout=60)

        await server.start()
        await wait_for_outbox_empty(pool, timeout=90)

        for user in users:
            customer_id = await customer_id_of(pool, user)
            workflow_id = f"welcome:{customer_id}"
            assert await workflow_runs(client, workflow_id) == 1, workflow_id
            seen = await client.get_workflow_handle(workflow_id).query(Welcome.seen_event_ids)
            assert seen == await event_ids_of(pool, customer_id)
    finally:
        await worker.stop()
        await api_server.stop()
        await server.stop()


async def test_relay_standby_waits_for_active_relay(
    running_worker: RunningWorker, pool: asyncpg.Pool, temporal_client: Client, temporal_settings: Settings
) -> None:
    second = OutboxRelay(pool, temporal_client, temporal_settings, RoutingIndex())
    stop = asyncio.Event()
    task = asyncio.create_task(second.run(stop))
    await asyncio.sleep(0.5)

    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, timeout=10)


async def test_redelivered_outbox_row_not_delivered_twice(
    api: httpx.AsyncClient, running_worker: RunningWorker, pool: asyncpg.Pool, temporal_client: Client
) -> None:
    await api.post("/v1/identify", json={"userId": "again", "traits": {"email": "again@example.com", "subscribed": True}, "messageId": "again-1"})
    await wait_for_outbox_empty(pool)
    customer_id = await customer_id_of(pool, "again")
    event_id = (await event_ids_of(pool, customer_id))[0]

    # As after a relay crash between signalling and deleting the row.
    await pool.execute("INSERT INTO outbox (event_id, customer_id) VALUES ($1, $2)", event_id, customer_id)
    await pool.execute("SELECT pg_notify('bisik_outbox', '')")
    await wait_for_outbox_empty(pool)

    handle = temporal_client.get_workflow_handle(f"welcome:{customer_id}")
    assert await handle.query(Welcome.seen_event_ids) == [event_id]
    assert await workflow_runs(temporal_client, f"welcome:{customer_id}") == 1


async def cart_then_login(api: httpx.AsyncClient, pool: asyncpg.Pool, user_id: str, device: str) -> tuple[str, str]:
    """Fill a cart anonymously on `device`, then log in there as the known `user_id`.

    Return the device's customer, merged away by the login and owning the cart run, and the known one.
    """
    await api.post("/v1/identify", json={"userId": user_id, "traits": {"email": f"{user_id}@example.com"}})
    await api.post("/v1/track", json={"anonymousId": device, "event": "Product Added", "properties": {"product_id": "p-1", "price": 10}})
    await wait_for_outbox_empty(pool)
    device_customer = await pool.fetchval("SELECT customer_id FROM identities WHERE kind = 'anonymous_id' AND value = $1", device)
    known = await customer_id_of(pool, user_id)
    await api.post("/v1/track", json={"userId": user_id, "anonymousId": device, "event": "Signed In"})
    await wait_for_outbox_empty(pool)
    return device_customer, known


async def test_merged_shopper_keeps_one_cart_run(
    api: httpx.AsyncClient, running_worker: RunningWorker, pool: asyncpg.Pool, temporal_client: Client
) -> None:
    tablet, known = await cart_then_login(api, pool, "shopper", "tablet")

    # The cart carries on in the tablet's run.
    await api.post("/v1/track", json={"userId": "shopper", "event": "Product Added", "properties": {"product_id": "p-2", "price": 5}})
    await wait_for_outbox_empty(pool)

    assert await workflow_runs(temporal_client, f"abandoned_cart:{known}") == 0
    handle = temporal_client.get_workflow_handle(f"abandoned_cart:{tablet}")
    state = await handle.query("journey_state")
    assert sorted(state["cart"]["items"]) == ["p-1", "p-2"]
    runs = await pool.fetch("SELECT customer_id, status FROM journey_runs WHERE journey = 'abandoned_cart'")
    assert [(row["customer_id"], row["status"]) for row in runs] == [(tablet, "active")]

    # An order, which the journey only listens to, reaches the same run and ends it.
    await api.post("/v1/track", json={"userId": "shopper", "event": "Order Completed", "properties": {"order_id": "o-1", "products": [{"product_id": "p-1"}]}})
    result = await asyncio.wait_for(handle.result(), 30)
    assert result["outcome"] == "exited"


async def test_merged_run_ended_new_run_starts(
    api: httpx.AsyncClient, running_worker: RunningWorker, pool: asyncpg.Pool, temporal_client: Client
) -> None:
    laptop, known = await cart_then_login(api, pool, "returner", "laptop")
    # The run ends while the log still shows it open.
    await temporal_client.get_workflow_handle(f"abandoned_cart:{laptop}").terminate(reason="test")

    await api.post("/v1/track", json={"userId": "returner", "event": "Product Added", "properties": {"product_id": "p-2", "price": 5}})
    await wait_for_outbox_empty(pool)

    state = await temporal_client.get_workflow_handle(f"abandoned_cart:{known}").query("journey_state")
    assert sorted(state["cart"]["items"]) == ["p-2"]
    closed = await pool.fetchrow("SELECT status, reason FROM journey_runs WHERE customer_id = $1", laptop)
    assert (closed["status"], closed["reason"]) == ("exited", "workflow not found")


async def test_stale_run_falls_back_to_merged(
    api: httpx.AsyncClient, running_worker: RunningWorker, pool: asyncpg.Pool, temporal_client: Client
) -> None:
    phone, known = await cart_then_login(api, pool, "phone-user", "phone")
    # The run log still shows a run of the known customer whose workflow is gone.
    await pool.execute(
        "INSERT INTO journey_runs (journey, customer_id, workflow_id, status) VALUES ('abandoned_cart', $1, $2, 'active')",
        known,
        f"abandoned_cart:{known}",
    )

    await api.post("/v1/track", json={"userId": "phone-user", "event": "Product Removed", "properties": {"product_id": "p-1"}})
    await wait_for_outbox_empty(pool)

    result = await asyncio.wait_for(temporal_client.get_workflow_handle(f"abandoned_cart:{phone}").result(), 30)
    assert result["outcome"] == "exited"
    stale = await pool.fetchrow("SELECT status, reason FROM journey_runs WHERE customer_id = $1", known)
    assert (stale["status"], stale["reason"]) == ("exited", "workflow not found")


async def test_backfilled_event_starts_no_journey(
    api: httpx.AsyncClient, running_worker: RunningWorker, pool: asyncpg.Pool, temporal_client: Client
) -> None:
    now = datetime.now(UTC)
    product = {"product_id": "p-1", "price": 10}
    await api.post("/v1/track", json={"userId": "backfill", "event": "Product Added", "properties": product, "timestamp": (now - timedelta(days=10)).isoformat()})
    await api.post("/v1/track", json={"userId": "late", "event": "Product Added", "properties": product, "timestamp": (now - timedelta(hours=5)).isoformat()})
    await wait_for_outbox_empty(pool)

    assert await workflow_runs(temporal_client, f"abandoned_cart:{await customer_id_of(pool, 'backfill')}") == 0
    assert await workflow_runs(temporal_client, f"abandoned_cart:{await customer_id_of(pool, 'late')}") == 1
