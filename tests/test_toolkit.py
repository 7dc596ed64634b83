"""The journey toolkit on Temporal's time-skipping test server."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from bisik.models import JourneyEvent, JourneyInput, JourneyResult
from bisik.settings import Settings
from tests.journeys import Probe
from workers.relay import journey_workflow_id, signal_with_start
from workers.worker import build_worker
from workflows.welcome import Welcome

event_ids = itertools.count(1)


def make_event(
    name: str, customer_id: str, at: datetime, *, event_type: str = "track", event_id: int | None = None, **traits: object
) -> JourneyEvent:
    event_id = next(event_ids) if event_id is None else event_id
    return JourneyEvent(
        id=event_id,
        message_id=f"m-{event_id}",
        type=event_type,  # type: ignore[arg-type]
        name=name,
        customer_id=customer_id,
        timestamp=at,
        received_at=at,
        traits=traits,
    )


@pytest.fixture
async def journey_worker(
    time_skipping_env: WorkflowEnvironment, pool: asyncpg.Pool, settings: Settings
) -> AsyncIterator[Worker]:
    worker = build_worker(
        time_skipping_env.client, pool, settings, journeys=[Probe, Welcome]
    )
    async with worker:
        yield worker


async def deliver(client: Client, worker: Worker, journey: str, event: JourneyEvent) -> WorkflowHandle:
    return await signal_with_start(
        client, journey=journey, event=event, task_queue=worker.task_queue, search_attributes=False
    )


async def test_first_signal_of_signal_with_start_kept(
    time_skipping_env: WorkflowEnvironment, journey_worker: Worker
) -> None:
    client = time_skipping_env.client
    now = await time_skipping_env.get_current_time()
    customer = "cus_" + uuid.uuid4().hex
    start = make_event("Probe Started", customer, now)

    handle = await deliver(client, journey_worker, "probe", start)

    assert await handle.query(Probe.seen_event_ids) == [start.id]
    result = await handle.result()
    assert result.outcome == "completed"
    assert result.events_received == 1


async def test_duplicate_event_id_changes_nothing(
    time_skipping_env: WorkflowEnvironment, journey_worker: Worker
) -> None:
    client = time_skipping_env.client
    now = await time_skipping_env.get_current_time()
    customer = "cus_" + uuid.uuid4().hex
    ping = make_event("Probe Ping", customer, now + timedelta(minutes=1))

    handle = await deliver(client, journey_worker, "probe", make_event("Probe Started", customer, now))
    await handle.signal(Probe.receive_event, ping)
    await handle.signal(Probe.receive_event, ping)
    await deliver(client, journey_worker, "probe", ping)

    result = await handle.result()
    state = await handle.query(Probe.journey_state)
    assert result.events_received == 2
    assert state["pings"] == 1
    assert state["ping_ids"] == [ping.id]


async def test_goal_ends_journey_by_event_time(
    time_skipping_env: WorkflowEnvironment, journey_worker: Worker
) -> None:
    client = time_skipping_env.client
    now = await time_skipping_env.get_current_time()
    customer = "cus_" + uuid.uuid4().hex

    handle = await deliver(client, journey_worker, "probe", make_event("Probe Started", customer, now))
    await handle.signal(Probe.receive_event, make_event("Probe Goal", customer, now + timedelta(minutes=20)))

    result = await handle.result()
    assert result.outcome == "exited"
    assert result.reason == "goal reached: Probe Goal"


async def test_goal_from_before_entry_ignored(
    time_skipping_env: WorkflowEnvironment, journey_worker: Worker
) -> None:
    client = time_skipping_env.client
    now = await time_skipping_env.get_current_time()
    customer = "cus_" + uuid.uuid4().hex

    handle = await deliver(client, journey_worker, "probe", make_event("Probe Started", customer, now))
    # A purchase from yesterday that only now reaches the journey does not count as its goal.
    await handle.signal(Probe.receive_event, make_event("Probe Goal", customer, now - timedelta(days=1)))

    result = await handle.result()
    assert result.outcome == "completed"


async def test_timer_waits_from_last_event_time(
    time_skipping_env: WorkflowEnvironment, journey_worker: Worker
) -> None:
    client = time_skipping_env.client
    now = await time_skipping_env.get_current_time()
    customer = "cus_" + uuid.uuid4().hex

    handle = await deliver(client, journey_worker, "probe", make_event("Probe Started", customer, now))
    await handle.signal(Probe.receive_event, make_event("Probe Ping", customer, now + timedelta(minutes=40)))
    await handle.result()

    state = await handle.query(Probe.journey_state)
    quiet_at = datetime.fromisoformat(state["quiet_at"])
    assert quiet_at - now == pytest.approx(timedelta(minutes=100), abs=timedelta(seconds=5))


async def test_time_scale_divides_delays(
    time_skipping_env: WorkflowEnvironment, journey_worker: Worker
) -> None:
    client = time_skipping_env.client
    now = await time_skipping_env.get_current_time()
    customer = "cus_" + uuid.uuid4().hex
    start = make_event("Probe Started", customer, now)

    handle = await signal_with_start(
        client, journey="probe", event=start, task_queue=journey_worker.task_queue,
        time_scale=60, search_attributes=False,
    )
    await handle.result()

    state = await handle.query(Probe.journey_state)
    assert datetime.fromisoformat(state["quiet_at"]) - now == pytest.approx(timedelta(minutes=1), abs=timedelta(seconds=5))


async def test_many_events_continue_as_new_keeping_state(
    time_skipping_env: WorkflowEnvironment, journey_worker: Worker
) -> None:
    client = time_skipping_env.client
    now = await time_skipping_env.get_current_time()
    customer = "cus_" + uuid.uuid4().hex
    start = make_event("Probe Started", customer, now)
    handle = await client.start_workflow(
        "probe",
        JourneyInput(customer_id=customer, journey="probe", history_limit=100),
        id=journey_workflow_id("probe", customer),
        task_queue=journey_worker.task_queue,
        start_signal="event",
        start_signal_args=[start],
        result_type=JourneyResult,
    )
    first_run = (await handle.describe()).run_id

    pings = [make_event("Probe Ping", customer, now + timedelta(seconds=i)) for i in range(300)]
    for ping in pings:
        await handle.signal(Probe.receive_event, ping)
    result = await handle.result()

    state = await handle.query(Probe.journey_state)
    assert state["pings"] == 300
    assert state["ping_ids"] == [ping.id for ping in pings]
    assert (await handle.describe()).run_id != first_run
    assert result.outcome == "completed"


async def test_welcome_starts_on_subscribing_identify(
    time_skipping_env: WorkflowEnvironment, journey_worker: Worker, pool: asyncpg.Pool
) -> None:
    client = time_skipping_env.client
    now = await time_skipping_env.get_current_time()
    customer = "cus_" + uuid.uuid4().hex

    handle = await deliver(
        client, journey_worker, "welcome",
        make_event("identify", customer, now, event_type="identify", email="sari@example.com", subscribed=True),
    )
    result = await handle.result()

    assert result.outcome == "completed"
    run = await pool.fetchrow("SELECT status, workflow_id FROM journey_runs WHERE customer_id = $1", customer)
    assert run["status"] == "completed"
    assert run["workflow_id"] == f"welcome:{customer}"
