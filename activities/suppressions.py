"""Suppressions: who must not receive marketing on which channel, and why."""

from __future__ import annotations

import asyncpg

from bisik.logs import get_logger

log = get_logger(__name__)


class SuppressionStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def suppress(
        self,
        customer_id: str,
        *,
        channel: str,
        reason: str,
        source: str,
        topic: str | None = None,
        message_id: int | None = None,
    ) -> bool:
        """Record a suppression; return False when the same one was already recorded."""
        inserted = await self.pool.fetchval(
            """
            INSERT INTO suppressions (customer_id, channel, topic, reason, source, message_id)
            VALUES ((SELECT COALESCE(merged_into, id) FROM customers WHERE id = $1), $2, $3, $4, $5, $6)
            ON CONFLICT (customer_id, channel, COALESCE(topic, ''), reason) DO NOTHING
            RETURNING id
            """,
            customer_id,
            channel,
            topic,
            reason,
            source,
            message_id,
        )
        if inserted is not None:
            log.info("customer.suppressed", customer_id=customer_id, channel=channel, reason=reason, source=source)
        return inserted is not None

    async def unsuppress(self, customer_id: str, *, channel: str, reason: str, topic: str | None = None) -> bool:
        """Remove a suppression, such as an unsubscribe the customer takes back; return False when there was none.

        Only the suppression of exactly this channel, topic and reason goes: one for channel
        `all`, or for another reason such as a hard bounce, stays.
        """
        removed = await self.pool.fetchval(
            """
            DELETE FROM suppressions
            WHERE customer_id = (SELECT COALESCE(merged_into, id) FROM customers WHERE id = $1)
              AND channel = $2 AND COALESCE(topic, '') = COALESCE($3, '') AND reason = $4
            RETURNING id
            """,
            customer_id,
            channel,
            topic,
            reason,
        )
        if removed is not None:
            log.info("customer.unsuppressed", customer_id=customer_id, channel=channel, reason=reason)
        return removed is not None

    async def reason_suppressed(self, customer_id: str, channel: str, topic: str | None = None) -> str | None:
        """Return why marketing on `channel` (and `topic`) may not reach the customer, or None."""
        return await self.pool.fetchval(
            """
            SELECT reason FROM suppressions
            WHERE customer_id = (SELECT COALESCE(merged_into, id) FROM customers WHERE id = $1)
              AND channel IN ($2, 'all')
              AND (topic IS NULL OR topic = $3)
            ORDER BY created_at LIMIT 1
            """,
            customer_id,
            channel,
            topic,
        )
