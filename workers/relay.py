"""The outbox relay: routes stored events into journey workflows, in order, once.

The API writes an outbox row in the same transaction as each event some journey wants. The
relay reads due rows, and for each matching journey either signal-with-starts the workflow
`<journey>:<customer id>` (events that start the journey) or signals it when a run is active
(events it only listens to). A row is deleted once every journey has the event; a journey that
already got it is noted on the row, so a retry after a partial failure does not deliver twice.

A journey that began before its customer was merged into another (an anonymous shopper who
logs in) keeps following the person. While the surviving customer has no run of that journey
open, their events go to the open run of a customer merged into them. Starting a second run
would give the person the same journey twice.

Ordering: one relay is active at a time (a PostgreSQL advisory lock elects it, others wait),
each customer's events are dispatched one after another, and a customer whose earliest event
is backing off gets nothing newer until that one succeeds.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import replace
from datetime import timedelta
from typing import Any

import asyncpg
from temporalio.client import Client, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDReusePolicy,
)
from temporalio.service import RPCError, RPCStatusCode

from activities.ingest import OUTBOX_CHANNEL
from bisik.logs import get_logger
from bisik.models import (
    CUSTOMER_ID_ATTRIBUTE,
    EVENT_SIGNAL,
    JOURNEY_ATTRIBUTE,
    JourneyEvent,
    JourneyInput,
    JourneyResult,
)
from bisik.settings import Settings
from workflows.registry import Route, RoutingIndex

log = get_logger(__name__)

# Key of the session-level advisory lock held by the active relay.
RELAY_LOCK_KEY = 0x6269_7369_6B02
UNAVAILABLE_CODES = {RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED}

DUE_ROWS_QUERY = """
SELECT o.event_id, o.attempts, o.delivered_to,
       COALESCE(c.merged_into, c.id) AS customer_id,
       o.customer_id AS routed_customer_id,
       e.message_id, e.type, e.name, e.timestamp, e.received_at, e.properties, e.traits, e.derived
FROM outbox o
JOIN events e ON e.id = o.event_id
JOIN customers c ON c.id = o.customer_id
WHERE o.next_attempt_at <= now()
  AND NOT EXISTS (
      SELECT 1 FROM outbox earlier
      WHERE earlier.customer_id = o.customer_id
        AND earlier.event_id < o.event_id
        AND earlier.next_attempt_at > now()
  )
ORDER BY o.event_id
LIMIT $1
"""


# For one journey and customer, in one round trip: whether an entry has ended, and whose open run
# follows the customer, their own first, else the latest of a customer merged into them.
RUNS_QUERY = """
SELECT
    EXISTS (
        SELECT 1 FROM journey_runs WHERE journey = $1 AND customer_id = $2 AND status <> 'active'
    ) AS finished,
    (
        SELECT customer_id FROM (
            SELECT customer_id, 0 AS rank, entered_at FROM journey_runs
            WHERE journey = $1 AND customer_id = $2 AND status = 'active'
            UNION ALL
            SELECT r.customer_id, 1 AS rank, r.entered_at
            FROM customers c
            JOIN journey_runs r ON r.customer_id = c.id AND r.journey = $1 AND r.status = 'active'
            WHERE c.merged_into = $2
        ) open_runs
        ORDER BY rank, entered_at DESC
        LIMIT 1
    ) AS active_for
"""


def journey_workflow_id(journey: str, customer_id: str) -> str:
    return f"{journey}:{customer_id}"


async def signal_with_start(
    client: Client,
    *,
    journey: str,
    event: JourneyEvent,
    task_queue: str,
    time_scale: float = 1.0,
    send_timeout_seconds: float = 60.0,
    search_attributes: bool = True,
) -> WorkflowHandle[Any, Any]:
    """Deliver `event` to the journey's workflow for its customer, starting a run if none is open."""
    attributes = None
    if search_attributes:
        attributes = TypedSearchAttributes(
            [
                SearchAttributePair(CUSTOMER_ID_ATTRIBUTE, event.customer_id),
                SearchAttributePair(JOURNEY_ATTRIBUTE, journey),
            ]
        )
    return await client.start_workflow(
        journey,
        JourneyInput(
            customer_id=event.customer_id,
            journey=journey,
            time_scale=time_scale,
            send_timeout_seconds=send_timeout_seconds,
        ),
        id=journey_workflow_id(journey, event.customer_id),
        task_queue=task_queue,
        start_signal=EVENT_SIGNAL,
        start_signal_args=[event],
        # A customer who finished a journey may enter it again; the journey's own rules decide.
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        search_attributes=attributes,
        result_type=JourneyResult,
    )


class TemporalUnavailable(Exception):
    """Temporal did not answer; the whole pass stops and the relay backs off."""


class OutboxRelay:
    def __init__(
        self, pool: asyncpg.Pool, client: Client, settings: Settings, routing: RoutingIndex
    ) -> None:
        self.pool = pool
        self.client = client
        self.settings = settings
        self.routing = routing
        self.max_start_delay = timedelta(hours=settings.start_max_delay_hours)
        self._wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set: wait to become the active relay, then drain continuously."""
        async with self.pool.acquire() as lock_connection:
            if not await self._become_active(lock_connection, stop):
                return
            await lock_connection.add_listener(OUTBOX_CHANNEL, self._on_notify)
            log.info("relay.started")
            try:
                await self._drain_forever(stop)
            finally:
                await lock_connection.remove_listener(OUTBOX_CHANNEL, self._on_notify)
                await lock_connection.execute("SELECT pg_advisory_unlock($1)", RELAY_LOCK_KEY)
                log.info("relay.stopped")

    async def drain(self) -> int:
        """Dispatch due rows until none are left; return how many events were routed."""
        total = 0
        while True:
            routed, fetched = await self.drain_once()
            total += routed
            if fetched < self.settings.relay_batch_size:
                return total

    async def drain_once(self) -> tuple[int, int]:
        """Dispatch one batch of due rows; return (events routed, rows fetched)."""
        rows = await self.pool.fetch(DUE_ROWS_QUERY, self.settings.relay_batch_size)
        if not rows:
            return 0, 0
        started = time.perf_counter()
        by_customer: dict[str, list[asyncpg.Record]] = defaultdict(list)
        for row in rows:
            by_customer[row["routed_customer_id"]].append(row)

        semaphore = asyncio.Semaphore(self.settings.relay_concurrency)

        async def dispatch_customer(customer_rows: list[asyncpg.Record]) -> int:
            async with semaphore:
                return await self._dispatch_in_order(customer_rows)

        results = await asyncio.gather(
            *(dispatch_customer(customer_rows) for customer_rows in by_customer.values()),
            return_exceptions=True,
        )
        unavailable = [result for result in results if isinstance(result, TemporalUnavailable)]
        unexpected = [
            result
            for result in results
            if isinstance(result, BaseException) and not isinstance(result, TemporalUnavailable)
        ]
        for error in unexpected:
            log.error("relay.pass_failed", exc_info=error)
        routed = sum(result for result in results if isinstance(result, int))
        log.debug(
            "relay.pass_done",
            rows=len(rows),
            routed=routed,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        if unavailable:
            raise unavailable[0]
        return routed, len(rows)

    async def _drain_forever(self, stop: asyncio.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            self._wake.clear()
            try:
                routed = await self.drain()
                backoff = 0.5
            except TemporalUnavailable as error:
                log.warning("relay.temporal_unavailable", error=str(error), retry_in_seconds=backoff)
                await self._sleep(stop, backoff)
                backoff = min(backoff * 2, self.settings.relay_max_backoff_seconds)
                continue
            except (OSError, asyncpg.PostgresError) as error:
                log.error("relay.database_error", error=str(error), retry_in_seconds=backoff)
                await self._sleep(stop, backoff)
                backoff = min(backoff * 2, self.settings.relay_max_backoff_seconds)
                continue
            if routed:
                log.info("relay.routed", events=routed)
            await self._wait_for_work(stop)

    async def _dispatch_in_order(self, rows: list[asyncpg.Record]) -> int:
        routed = 0
        for row in rows:
            try:
                await self._dispatch(row)
            except TemporalUnavailable:
                await self._postpone(row, "Temporal unavailable")
                raise
            except Exception as error:  # noqa: BLE001 - any failure postpones this customer's events
                log.warning(
                    "relay.dispatch_failed",
                    event_id=row["event_id"],
                    customer_id=row["customer_id"],
                    attempts=row["attempts"] + 1,
                    error=str(error),
                    exc_info=error,
                )
                await self._postpone(row, str(error))
                return routed
            routed += 1
        return routed

    async def _dispatch(self, row: asyncpg.Record) -> None:
        event = JourneyEvent.from_row(row, id_column="event_id")
        delivered = set(row["delivered_to"])
        for route in self.routing.routes(event):
            if route.journey.name in delivered:
                continue
            await self._deliver(route, event)
            await self.pool.execute(
                "UPDATE outbox SET delivered_to = array_append(delivered_to, $2) WHERE event_id = $1",
                event.id,
                route.journey.name,
            )
        await self.pool.execute("DELETE FROM outbox WHERE event_id = $1", event.id)

    async def _deliver(self, route: Route, event: JourneyEvent) -> None:
        journey = route.journey.name
        workflow_id = journey_workflow_id(journey, event.customer_id)
        if route.starts and event.received_at - event.timestamp > self.max_start_delay:
            # Measured from arrival, not from now, so events held back by a Temporal outage still start.
            log.debug("relay.late_event_starts_nothing", event_id=event.id, customer_id=event.customer_id, journey=journey)
            route = replace(route, starts=False)
        try:
            runs = await self.pool.fetchrow(RUNS_QUERY, journey, event.customer_id)
            if route.starts and route.journey.reentry.kind == "never" and runs["finished"]:
                # Such an entry would end at once; a site that sends `subscribed: true` with every
                # identify would otherwise start a workflow per call.
                return
            active_for = runs["active_for"]
            if active_for is not None and active_for != event.customer_id:
                if await self._signal_merged_run(journey, active_for, event):
                    return
                if not route.starts:
                    return
            if route.starts:
                await signal_with_start(
                    self.client,
                    journey=journey,
                    event=event,
                    task_queue=self.settings.temporal_task_queue,
                    time_scale=self.settings.time_scale,
                    send_timeout_seconds=self.settings.send_timeout_seconds,
                    search_attributes=self.settings.temporal_search_attributes,
                )
                await self._open_run(journey, event.customer_id, workflow_id)
            elif active_for is not None:
                await self.client.get_workflow_handle(workflow_id).signal(EVENT_SIGNAL, event)
        except RPCError as error:
            if error.status in UNAVAILABLE_CODES:
                raise TemporalUnavailable(str(error)) from error
            if error.status == RPCStatusCode.NOT_FOUND and not route.starts:
                # The run ended after the log still showed it active. A run of a customer merged
                # into this one may still want the event; otherwise it has nowhere to go.
                await self._close_stale_run(journey, event.customer_id)
                runs = await self.pool.fetchrow(RUNS_QUERY, journey, event.customer_id)
                if runs["active_for"] is not None:
                    await self._signal_merged_run(journey, runs["active_for"], event)
                return
            raise

    async def _signal_merged_run(self, journey: str, customer_id: str, event: JourneyEvent) -> bool:
        """Signal the open run of `journey` for `customer_id`, merged into the event's customer.

        Return False when that run has ended meanwhile, after closing it in the run log.
        """
        workflow_id = journey_workflow_id(journey, customer_id)
        try:
            await self.client.get_workflow_handle(workflow_id).signal(EVENT_SIGNAL, event)
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise
            await self._close_stale_run(journey, customer_id)
            return False
        log.info(
            "relay.routed_to_merged_run",
            event_id=event.id,
            customer_id=event.customer_id,
            merged_customer_id=customer_id,
            journey=journey,
            workflow_id=workflow_id,
        )
        return True

    async def _open_run(self, journey: str, customer_id: str, workflow_id: str) -> None:
        await self.pool.execute(
            """
            INSERT INTO journey_runs (journey, customer_id, workflow_id, status)
            VALUES ($1, $2, $3, 'active')
            ON CONFLICT (journey, customer_id) WHERE status = 'active' DO NOTHING
            """,
            journey,
            customer_id,
            workflow_id,
        )

    async def _close_stale_run(self, journey: str, customer_id: str) -> None:
        await self.pool.execute(
            """
            UPDATE journey_runs SET status = 'exited', reason = 'workflow not found', ended_at = now()
            WHERE journey = $1 AND customer_id = $2 AND status = 'active'
            """,
            journey,
            customer_id,
        )

    async def _postpone(self, row: asyncpg.Record, error: str) -> None:
        """Back off this row and every later row of the same customer, keeping their order."""
        attempts = row["attempts"] + 1
        delay = min(0.5 * 2 ** min(attempts, 20), self.settings.relay_max_backoff_seconds)
        await self.pool.execute(
            """
            UPDATE outbox SET
                attempts = CASE WHEN event_id = $1 THEN $3 ELSE attempts END,
                last_error = CASE WHEN event_id = $1 THEN $4 ELSE last_error END,
                next_attempt_at = now() + make_interval(secs => $5)
            WHERE customer_id = $2 AND event_id >= $1
            """,
            row["event_id"],
            row["routed_customer_id"],
            attempts,
            error[:1000],
            delay,
        )

    async def _become_active(self, connection: asyncpg.Connection, stop: asyncio.Event) -> bool:
        announced = False
        while not stop.is_set():
            if await connection.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK_KEY):
                return True
            if not announced:
                log.info("relay.standing_by", reason="another relay is active")
                announced = True
            await self._sleep(stop, 5.0)
        return False

    def _on_notify(self, *_args: Any) -> None:
        self._wake.set()

    async def _wait_for_work(self, stop: asyncio.Event) -> None:
        stop_task = asyncio.ensure_future(stop.wait())
        wake_task = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait(
                {stop_task, wake_task},
                timeout=self.settings.relay_poll_interval_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stop_task.cancel()
            wake_task.cancel()

    @staticmethod
    async def _sleep(stop: asyncio.Event, seconds: float) -> None:
        try:
            await asyncio.wait_for(stop.wait(), timeout=seconds)
        except TimeoutError:
            pass
