"""Activities about a customer's state: when they were last active, and sunsetting them."""

from __future__ import annotations

import asyncpg
from temporalio import activity

from datetime import datetime

from activities.suppressions import SuppressionStore
from bisik.models import CustomerActivity, LocalTimeRequest
from bisik.policy import local_instant, zone_or_default


class CustomerActivities:
    def __init__(self, pool: asyncpg.Pool, default_timezone: str = "UTC") -> None:
        self.pool = pool
        self.default_timezone = default_timezone
        self.suppressions = SuppressionStore(pool)

    @activity.defn(name="resolve_local_time")
    async def resolve_local_time(self, request: LocalTimeRequest) -> datetime:
        """Return the instant of a wall-clock time in the customer's time zone (else the account's).

        The zone's rules for that day apply, so a time planned before a clock change lands on the
        intended local hour after it.
        """
        zone_name = await self.pool.fetchval(
            """
            SELECT traits ->> 'timezone' FROM customers
            WHERE id = (SELECT COALESCE(merged_into, id) FROM customers WHERE id = $1)
            """,
            request.customer_id,
        )
        return local_instant(request.day, request.clock, zone_or_default(zone_name, self.default_timezone))

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
