"""At most one email per idempotency key: retries, SMTP timeouts, and a worker killed mid-send.

Every case counts what a real SMTP server received.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client

from activities.messaging import MessagingActivities
from bisik.models import SendRequest
from bisik.settings import Settings
from tests.helpers import assert_eventually, store_call
from tests.journey_fixtures import JourneyHarness
from workers.relay import signal_with_start
from workers.stack import MailSink, ReceivedMail, TemporalDevServer, free_port

ORDER = {"order_id": "o-1", "total": 10.0, "products": [{"product_id": "p", "name": "Tea", "price": 10.0}]}


class HoldingSink(MailSink):
    """An SMTP sink that can hold its reply to RCPT or DATA, and fail RCPT a number of times."""

    def __init__(self, port: int, *, hold_rcpt: float = 0, hold_data: float = 0, fail_rcpt: int = 0) -> None:
        super().__init__("127.0.0.1", port)
        self.hold_rcpt = hold_rcpt
        self.hold_data = hold_data
        self.fail_rcpt = fail_rcpt
        self.rcpt_seen = threading.Event()
        self.data_seen = threading.Event()

    async def before_rcpt_reply(self, recipient: str) -> str | None:
        self.rcpt_seen.set()
        if self.fail_rcpt > 0:
            self.fail_rcpt -= 1
            return "451 4.3.0 Try again later"
        hold, self.hold_rcpt = self.hold_rcpt, 0  # only the first RCPT is held
        await asyncio.sleep(hold)
        return None

    async def before_data_reply(self, mail: ReceivedMail) -> None:
        self.data_seen.set()
        hold, self.hold_data = self.hold_data, 0  # only the first DATA is held
        await asyncio.sleep(hold)


@pytest.fixture
def holding_sink_factory():  # type: ignore[no-untyped-def]
    sinks: list[MailSink] = []

    def start(**options: float) -> HoldingSink:
        sink = HoldingSink(free_port(), **options)  # type: ignore[arg-type]
        sink.start()
        sinks.append(sink)
        return sink

    yield start
    for sink in sinks:
        sink.stop()


async def make_request(pool: asyncpg.Pool, user_id: str, key: str) -> SendRequest:
    event = await store_call(pool, {"type": "identify", "userId": user_id, "traits": {"email": f"{user_id}@example.com"}})
    return SendRequest(
        idempotency_key=key,
        customer_id=event.customer_id,
        journey="post_purchase",
        workflow_id=f"post_purchase:{event.customer_id}",
        step="thank_you:o-1",
        template="order_thank_you",
        transactional=True,
        data={"order": {"order_id": "o-1", "items": [], "total": 10.0, "currency": "USD"}},
        step_at=datetime.now(UTC),
    )


async def test_same_key_sent_once_when_called_again(pool: asyncpg.Pool, settings: Settings, mail_sink: MailSink) -> None:
    settings.smtp_port = mail_sink.port
    activities = MessagingActivities(pool, settings)
    request = await make_request(pool, "once-1", "key-once-1")

    first = await activities.send_message(request)
    second = await activities.send_message(request)

    assert first.status == "sent"
    assert second == first
    assert len(mail_sink.messages) == 1
    row = await pool.fetchrow("SELECT status, attempts, provider_message_id FROM messages")
    assert row["status"] == "sent"
    assert row["attempts"] == 2
    assert mail_sink.messages[0].header("Message-ID") == row["provider_message_id"]


async def test_lost_data_reply_recorded_unknown_and_never_resent(
    pool: asyncpg.Pool, settings: Settings, holding_sink_factory
) -> None:  # type: ignore[no-untyped-def]
    sink = holding_sink_factory(hold_data=3)
    settings.smtp_port = sink.port
    settings.smtp_timeout_seconds = 1
    activities = MessagingActivities(pool, settings)
    request = await make_request(pool, "once-2", "key-once-2")

    first = await activities.send_message(request)
    retried = await activities.send_message(request)
    await asyncio.sleep(2.5)

    assert first.status == "unknown"
    assert first.reason.startswith("no reply to DATA")
    assert retried.status == "unknown"
    assert len(sink.messages) == 1


async def test_temporary_smtp_failure_retried_by_temporal_sends_once(
    journeys: JourneyHarness, settings: Settings, holding_sink_factory
) -> None:  # type: ignore[no-untyped-def]
    sink = holding_sink_factory(fail_rcpt=2)
    settings.smtp_port = sink.port
    customer = await journeys.customer("once-3")

    handle = await journeys.deliver("post_purchase", await journeys.event("once-3", "Order Completed", **ORDER))
    await handle.result()

    thanks = [row for row in await journeys.messages(customer) if row["template"] == "order_thank_you"]
    assert len(thanks) == 1
    assert thanks[0]["status"] == "sent"
    assert thanks[0]["attempts"] == 3
    assert len([mail for mail in sink.messages if "Thanks" in mail.subject]) == 1


async def test_data_timeout_inside_journey_sends_once(
    journeys: JourneyHarness, settings: Settings, holding_sink_factory
) -> None:  # type: ignore[no-untyped-def]
    sink = holding_sink_factory(hold_data=3)
    settings.smtp_port = sink.port
    settings.smtp_timeout_seconds = 1
    customer = await journeys.customer("once-4")

    handle = await journeys.deliver("post_purchase", await journeys.event("once-4", "Order Completed", **ORDER))
    await handle.result()
    await asyncio.sleep(2.5)

    thanks = [row for row in await journeys.messages(customer) if row["template"] == "order_thank_you"]
    assert [row["status"] for row in thanks] == ["unknown"]
    assert len([mail for mail in sink.messages if "Thanks" in mail.subject]) == 1


class WorkerProcess:
    """`bisik worker` in its own process, so a test can kill it the way a crash would."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.environment = {
            **os.environ,
            "BISIK_DATABASE_URL": settings.database_url or "",
            "BISIK_TEMPORAL_ADDRESS": settings.temporal_address,
            "BISIK_TEMPORAL_TASK_QUEUE": settings.temporal_task_queue,
            "BISIK_SMTP_PORT": str(settings.smtp_port),
            "BISIK_SMTP_TIMEOUT_SECONDS": "30",
            "BISIK_WORKER_RUNS_RELAY": "false",
            "BISIK_LOG_FORMAT": "json",
        }
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bisik.cli", "worker", env=self.environment, stdout=output, stderr=output
            )

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()


async def start_order_journey(client: Client, pool: asyncpg.Pool, settings: Settings, user_id: str) -> str:
    await store_call(pool, {"type": "identify", "userId": user_id, "traits": {"email": f"{user_id}@example.com"}})
    order = await store_call(pool, {"type": "track", "userId": user_id, "event": "Order Completed", "properties": ORDER})
    await signal_with_start(
        client,
        journey="post_purchase",
        event=order,
        task_queue=settings.temporal_task_queue,
        send_timeout_seconds=3,
        search_attributes=False,
    )
    return order.customer_id


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("hold", "expected_status"),
    [
        # Killed while the message body is with the server: may have been delivered, never resent.
        ("data", "unknown"),
        # Killed before the body left: the next attempt sends it, once.
        ("rcpt", "sent"),
    ],
)
async def test_worker_killed_mid_send_sends_at_most_once(
    temporal_server: TemporalDevServer,
    temporal_client: Client,
    pool: asyncpg.Pool,
    temporal_settings: Settings,
    holding_sink_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    hold: str,
    expected_status: str,
) -> None:
    sink = holding_sink_factory(**{f"hold_{hold}": 8})
    temporal_settings.smtp_port = sink.port
    first = WorkerProcess(temporal_settings, tmp_path / "worker-1.log")
    second = WorkerProcess(temporal_settings, tmp_path / "worker-2.log")
    try:
        await first.start()
        customer_id = await start_order_journey(temporal_client, pool, temporal_settings, f"killed-{hold}")
        seen = sink.data_seen if hold == "data" else sink.rcpt_seen
        assert await asyncio.to_thread(seen.wait, 60), (tmp_path / "worker-1.log").read_text()[-2000:]

        await first.kill()
        await second.start()

        async def settled() -> None:
            row = await pool.fetchrow("SELECT status, attempts FROM messages WHERE customer_id = $1", customer_id)
            assert row is not None
            assert row["status"] == expected_status

        await assert_eventually(settled, timeout=60, interval=0.5)
        await asyncio.sleep(9)  # the held reply ends; nothing more may arrive
        row = await pool.fetchrow("SELECT status, attempts FROM messages WHERE customer_id = $1", customer_id)
        assert row["status"] == expected_status
        assert row["attempts"] == 2
        assert len(sink.messages) == 1
    finally:
        await first.kill()
        await second.kill()
