"""The worker process: runs journey workflows and their activities, and the outbox relay."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import asyncpg
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.catalog import CatalogActivities
from activities.customers import CustomerActivities
from activities.db import create_pool
from activities.journeys import JourneyRunActivities
from activities.messaging import MessagingActivities
from activities.webhooks import WebhookDispatcher
from bisik import temporal
from bisik.logs import get_logger
from bisik.settings import Settings
from workers.relay import OutboxRelay
from workflows.registry import JOURNEYS, RoutingIndex, configure_journeys
from workflows.toolkit import Journey

log = get_logger(__name__)

# Our event names are the whole log message; the workflow's ids travel as structured fields.
workflow.logger.workflow_info_on_message = False


def journey_activities(
    pool: asyncpg.Pool, settings: Settings, messaging: MessagingActivities | None = None
) -> list[Any]:
    """Every activity a journey may call, bound to the pool and settings."""
    runs = JourneyRunActivities(pool, settings)
    messaging = messaging or MessagingActivities(pool, settings)
    catalog = CatalogActivities(pool)
    customers = CustomerActivities(pool, settings.default_timezone)
    return [
        runs.record_journey_run,
        runs.check_reentry,
        messaging.load_profile,
        messaging.send_message,
        catalog.find_similar_products,
        catalog.load_products,
        catalog.find_carted_or_bought,
        customers.load_activity,
        customers.mark_sunset,
        customers.resolve_local_time,
    ]


def build_worker(
    client: Client,
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    task_queue: str | None = None,
    journeys: Sequence[type[Journey]] = JOURNEYS,
    messaging: MessagingActivities | None = None,
) -> Worker:
    return Worker(
        client,
        task_queue=task_queue or settings.temporal_task_queue,
        workflows=list(journeys),
        activities=journey_activities(pool, settings, messaging),
        max_cached_workflows=settings.worker_max_cached_workflows,
        max_concurrent_workflow_task_polls=settings.worker_workflow_task_pollers,
        max_concurrent_activities=settings.worker_max_concurrent_activities,
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules("pydantic", "bisik")
        ),
    )


async def run_worker(settings: Settings, stop: asyncio.Event) -> None:
    """Run until `stop` is set. Waits for Temporal when it is not reachable yet."""
    if settings.database_url is None:
        raise ValueError(
            "BISIK_DATABASE_URL is not set; run `bisik dev` for the embedded stack or point it at PostgreSQL"
        )
    configure_journeys(settings)
    pool = await create_pool(
        settings.database_url,
        min_size=settings.database_pool_min_size,
        max_size=settings.database_pool_max_size,
    )
    try:
        client = await temporal.connect_with_retry(settings, stop)
        if client is None:
            return
        messaging = MessagingActivities(pool, settings)
        worker = build_worker(client, pool, settings, messaging=messaging)
        tasks = [asyncio.create_task(worker.run(), name="temporal-worker")]
        if settings.worker_runs_relay:
            relay = OutboxRelay(pool, client, settings, RoutingIndex())
            tasks.append(asyncio.create_task(relay.run(stop), name="outbox-relay"))
        if settings.webhook_url is not None:
            dispatcher = WebhookDispatcher(pool, settings)
            tasks.append(asyncio.create_task(dispatcher.run(stop), name="webhook-dispatcher"))
        log.info(
            "worker.started",
            task_queue=settings.temporal_task_queue,
            journeys=sorted(journey.name for journey in JOURNEYS),
            relay=settings.worker_runs_relay,
        )
        stop_task = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({*tasks, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop_task and task.exception() is not None:
                log.error("worker.task_failed", task=task.get_name(), exc_info=task.exception())
        stop.set()
        await worker.shutdown()
        await asyncio.gather(*tasks, return_exceptions=True)
        stop_task.cancel()
        await messaging.close()
        log.info("worker.stopped")
    finally:
        await pool.close()
