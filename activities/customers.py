"""Activities about a customer's state: when they were last active, and sunsetting them."""

from __future__ import annotations

import asyncpg
from temporalio import activity

from activities.suppressions import SuppressionStore
from bisik.models import CustomerActivity


class CustomerActivities:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.suppressions = SuppressionStore(pool)

    @activity.defn(name="load_activity")
    async def load_activity(self, customer_id: str) -> CustomerActivity:
        """Return when the customer was last seen: any event of theirs, email opens and clicks included."""
        last_seen = await self.pool.fetchval(
            "SELECT last_seen_at FROM customers WHERE id = (SELECT COALESCE(merged_into, id) FROM customers WHERE id = $1)",
            customer_id,
        )
        return CustomerActivity(
            customer_id=customer_id,
            last_seen_at=last_seen,
            suppressed=await self.suppressions.reason_suppressed(customer_id, "email"),
        )

    @activity.defn(name="mark_sunset")
    async def mark_sunset(self, customer_id: str) -> None:
        """Stop all marketing to a customer who stayed away after the last win-back message."""
        await self.suppressions.suppress(customer_id, channel="all", reason="sunset", source="re_engagement")
