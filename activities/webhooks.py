"""Outbound webhooks: journey events posted to a configured URL as signed JSON.

Activities only insert a row into `webhook_deliveries`, in the same breath as the change they
report, so a slow or failing receiver never holds up a journey. The dispatcher, running in the
worker process, posts due rows and retries failures with exponential backoff until
BISIK_WEBHOOK_MAX_ATTEMPTS. Deliveries are at least once and not ordered: receivers should
deduplicate on the `id` field (also sent as the `X-Bisik-Delivery` header).

Signature: `X-Bisik-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` keyed with
BISIK_WEBHOOK_SECRET; receivers recompute it and reject old timestamps to stop replays.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx

from bisik.logs import get_logger
from bisik.settings import Settings
from bisik.urls import UnsafeUrlError, check_public_url

log = get_logger(__name__)

JOURNEY_EVENT_TYPES = ("journey.entered", "journey.exited", "journey.converted", "journey.completed", "message.sent")
BATCH_SIZE = 50
REQUEST_TIMEOUT_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 3600.0


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(secret: str, header: str, body: bytes) -> bool:
    """Check a `X-Bisik-Signature` header; what a receiver does, provided for tests and examples."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if "t" not in fields or "v1" not in fields or not fields["t"].isdigit():
        return False
    expected = sign(secret, int(fields["t"]), body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields["v1"])


async def enqueue(
    executor: asyncpg.Pool | asyncpg.Connection, settings: Settings, event_type: str, data: dict[str, Any]
) -> None:
    """Queue one journey event for the webhook; does nothing when no webhook is configured."""
    if settings.webhook_url is None:
        return
    await executor.execute(
        "INSERT INTO webhook_deliveries (event_type, payload) VALUES ($1, $2)",
        event_type,
        {"type": event_type, "created_at": datetime.now(UTC).isoformat(), "data": data},
    )


class WebhookDispatcher:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self.client = client or httpx.AsyncClient(timeout=REQUEST_TIMEOUT_SECONDS, follow_redirects=False)

    async def run(self, stop: asyncio.Event, poll_seconds: float = 1.0) -> None:
        if self.settings.webhook_url is None:
            return
        log.info("webhooks.started")
        while not stop.is_set():
            try:
                delivered = await self.deliver_due()
            except (OSError, asyncpg.PostgresError) as error:
                log.error("webhooks.database_error", error=str(error))
                delivered = 0
            if delivered == 0:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=poll_seconds)
                except TimeoutError:
                    pass
        await self.client.aclose()
        log.info("webhooks.stopped")

    async def deliver_due(self) -> int:
        """Post every due delivery once; return how many were attempted."""
        async with self.pool.acquire() as connection, connection.transaction():
            # SKIP LOCKED lets several workers share the queue without posting a row twice at once.
            rows = await connection.fetch(
                """
                SELECT id, event_type, payload, attempts FROM webhook_deliveries
                WHERE status = 'pending' AND next_attempt_at <= now()
                ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
                """,
                BATCH_SIZE,
            )
            for row in rows:
                await self._deliver(connection, row)
        return len(rows)

    async def _deliver(self, connection: asyncpg.Connection, row: asyncpg.Record) -> None:
        url = self.settings.webhook_url
        secret = self.settings.webhook_secret
        if url is None or secret is None:
            return
        payload = {"id": str(row["id"]), **row["payload"]}
        body = json.dumps(payload, separators=(",", ":")).encode()
        timestamp = int(time.time())
        attempts = row["attempts"] + 1
        try:
            await check_public_url(url, allow_private=self.settings.allow_private_urls)
            response = await self.client.post(
                url,
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": "Bisik-Webhooks/1",
                    "X-Bisik-Event": row["event_type"],
                    "X-Bisik-Delivery": str(row["id"]),
                    "X-Bisik-Signature": sign(secret.get_secret_value(), timestamp, body),
                },
            )
            error = None if 200 <= response.status_code < 300 else f"receiver answered {response.status_code}"
        except UnsafeUrlError as unsafe:
            await self._fail(connection, row["id"], attempts, str(unsafe), final=True)
            return
        except httpx.HTTPError as http_error:
            error = f"{type(http_error).__name__}: {http_error}"

        if error is None:
            await connection.execute(
                "UPDATE webhook_deliveries SET status = 'delivered', attempts = $2, delivered_at = now(), last_error = NULL WHERE id = $1",
                row["id"],
                attempts,
            )
            log.debug("webhook.delivered", delivery_id=row["id"], event_type=row["event_type"])
            return
        await self._fail(connection, row["id"], attempts, error, final=attempts >= self.settings.webhook_max_attempts)

    async def _fail(self, connection: asyncpg.Connection, delivery_id: int, attempts: int, error: str, *, final: bool) -> None:
        delay = min(5.0 * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS)
        await connection.execute(
            """
            UPDATE webhook_deliveries SET
                status = CASE WHEN $4 THEN 'failed' ELSE 'pending' END,
                attempts = $2,
                last_error = $3,
                next_attempt_at = now() + make_interval(secs => $5)
            WHERE id = $1
            """,
            delivery_id,
            attempts,
            error[:1000],
            final,
            delay,
        )
        log.warning(
            "webhook.failed" if final else "webhook.retry_scheduled",
            delivery_id=delivery_id,
            attempts=attempts,
            retry_in_seconds=None if final else delay,
            error=error,
        )
