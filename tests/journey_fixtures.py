"""Fixtures for journey tests: a worker on the time-skipping server that sends real email."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from temporalio.client import WorkflowHandle
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from bisik.models import JourneyEvent
from bisik.settings import Settings
from tests.helpers import store_call
from workers.relay import signal_with_start
from workers.stack import MailSink
from workers.worker import build_worker
from workflows.registry import JOURNEYS


@dataclass
class JourneyHarness:
    """Drives journeys on the time-skipping server against real PostgreSQL and SMTP."""

    env: WorkflowEnvironment
    worker: Worker
    pool: asyncpg.Pool
    mail: MailSink
    time_scale: float = 1.0
    handles: list[WorkflowHandle] = field(default_factory=list)

    async def now(self) -> datetime:
        return await self.env.get_current_time()

    async def customer(self, user_id: str, **traits: Any) -> str:
        """Create a customer through an identify call; return its customer id."""
        traits.setdefault("email", f"{user_id}@example.com")
        event = await store_call(self.pool, {"type": "identify", "userId": user_id, "traits": traits, "timestamp": (await self.now()).isoformat()})
        return event.customer_id

    async def event(
        self, user_id: str, event_name: str, at: datetime | None = None, /, **properties: Any
    ) -> JourneyEvent:
        """Store a track call for `user_id`, stamped `at` (default: the test server's now)."""
        at = at or await self.now()
        call = {"type": "track", "userId": user_id, "event": event_name, "properties": properties, "timestamp": at.isoformat()}
        return await store_call(self.pool, call)

    async def deliver(self, journey: str, event: JourneyEvent) -> WorkflowHandle:
        """Route `event` to `journey` the way the relay does: signal-with-start."""
        handle = await signal_with_start(
            self.env.client,
            journey=journey,
            event=event,
            task_queue=self.worker.task_queue,
            time_scale=self.time_scale,
            search_attributes=False,
        )
        self.handles.append(handle)
        return handle

    async def terminate_open_workflows(self) -> None:
        """End workflows a test left waiting: the time-skipping server is shared, and an open
        workflow whose worker is gone would stop it from skipping time in the next test."""
        for handle in self.handles:
            try:
                await handle.terminate(reason="test finished")
            except RPCError:
                pass  # already closed

    async def messages(self, customer_id: str) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT * FROM messages WHERE customer_id = $1 ORDER BY step_at, id", customer_id
        )

    def mail_to(self, address: str) -> list:
        return [mail for mail in self.mail.messages if address in mail.recipients]


@pytest.fixture
async def journeys(
    time_skipping_env: WorkflowEnvironment, pool: asyncpg.Pool, settings: Settings, mail_sink: MailSink
) -> AsyncIterator[JourneyHarness]:
    settings.smtp_port = mail_sink.port
    worker = build_worker(time_skipping_env.client, pool, settings, journeys=JOURNEYS)
    async with worker:
        harness = JourneyHarness(time_skipping_env, worker, pool, mail_sink)
        yield harness
        await harness.terminate_open_workflows()
