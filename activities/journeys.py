"""Activities that keep the journey run log in PostgreSQL."""

from __future__ import annotations

import asyncpg
from temporalio import activity

from bisik.logs import get_logger
from bisik.models import JourneyRunRecord

log = get_logger(__name__)


class JourneyRunActivities:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @activity.defn(name="record_journey_run")
    async def record_journey_run(self, record: JourneyRunRecord) -> None:
        """Open or close the run log entry of one journey entry.

        The relay opens the entry when it starts the workflow, so a later event for the journey
        sees it as active at once; the workflow's own record then fills in the run id.
        """
        if record.status == "active":
            await self.pool.execute(
                """
                INSERT INTO journey_runs (journey, customer_id, workflow_id, run_id, status)
                VALUES ($1, $2, $3, $4, 'active')
                ON CONFLICT (journey, customer_id) WHERE status = 'active'
                DO UPDATE SET run_id = EXCLUDED.run_id
                """,
                record.journey,
                record.customer_id,
                record.workflow_id,
                record.run_id,
            )
            return

        closed = await self.pool.execute(
            """
            UPDATE journey_runs SET status = $3, reason = $4, run_id = $5, ended_at = now()
            WHERE journey = $1 AND customer_id = $2 AND status = 'active'
            """,
            record.journey,
            record.customer_id,
            record.status,
            record.reason,
            record.run_id,
        )
        if closed == "UPDATE 0":
            # The open entry is missing, for example when the database was restored; keep the record.
            await self.pool.execute(
                """
                INSERT INTO journey_runs (journey, customer_id, workflow_id, run_id, status, reason, ended_at)
                VALUES ($1, $2, $3, $4, $5, $6, now())
                """,
                record.journey,
                record.customer_id,
                record.workflow_id,
                record.run_id,
                record.status,
                record.reason,
            )
