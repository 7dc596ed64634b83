"""Activities that keep the journey run log in PostgreSQL and apply re-entry rules."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
from temporalio import activity

from bisik.logs import get_logger
from activities import webhooks
from bisik.models import JourneyRunRecord, ReentryCheck, ReentryDecision
from bisik.settings import Settings

log = get_logger(__name__)


def _webhook_event(record: JourneyRunRecord) -> str:
    if record.status == "active":
        return "journey.entered"
    if record.status == "completed":
        return "journey.completed"
    if (record.reason or "").startswith("goal reached"):
        return "journey.converted"
    return "journey.exited"


class JourneyRunActivities:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings

    @activity.defn(name="record_journey_run")
    async def record_journey_run(self, record: JourneyRunRecord) -> None:
        """Open or close the run log entry of one journey entry.

        The relay opens the entry when it starts the workflow, so a later event for the journey
        sees it as active at once; the workflow's own record then fills in the run id and the
        entry time on the journey's clock.
        """
        await webhooks.enqueue(self.pool, self.settings, _webhook_event(record), record.model_dump(mode="json"))
        if record.status == "active":
            await self.pool.execute(
                """
                INSERT INTO journey_runs (journey, customer_id, workflow_id, run_id, status, entered_at)
                VALUES ($1, $2, $3, $4, 'active', $5)
                ON CONFLICT (journey, customer_id) WHERE status = 'active'
                DO UPDATE SET run_id = EXCLUDED.run_id, entered_at = EXCLUDED.entered_at
                """,
                record.journey,
                record.customer_id,
                record.workflow_id,
                record.run_id,
                record.at,
            )
            return

        closed = await self.pool.execute(
            """
            UPDATE journey_runs SET status = $3, reason = $4, run_id = $5, ended_at = $6
            WHERE journey = $1 AND customer_id = $2 AND status = 'active'
            """,
            record.journey,
            record.customer_id,
            record.status,
            record.reason,
            record.run_id,
            record.at,
        )
        if closed == "UPDATE 0":
            # The open entry is missing, for example when the database was restored; keep the record.
            await self.pool.execute(
                """
                INSERT INTO journey_runs (journey, customer_id, workflow_id, run_id, status, reason, entered_at, ended_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
                """,
                record.journey,
                record.customer_id,
                record.workflow_id,
                record.run_id,
                record.status,
                record.reason,
                record.at,
            )

    @activity.defn(name="check_reentry")
    async def check_reentry(self, check: ReentryCheck) -> ReentryDecision:
        """Decide whether a new entry may begin, from earlier entries and messages of this journey."""
        rule = check.rule
        if rule.kind == "always":
            return ReentryDecision(allowed=True)

        if rule.kind == "never":
            earlier = await self.pool.fetchval(
                "SELECT count(*) FROM journey_runs WHERE journey = $1 AND customer_id = $2 AND status <> 'active'",
                check.journey,
                check.customer_id,
            )
            if earlier:
                return ReentryDecision(allowed=False, reason="already went through this journey")
            return ReentryDecision(allowed=True)

        since = check.now - timedelta(seconds=rule.cooldown_seconds) / check.time_scale
        if rule.kind == "after_last_message":
            last = await self.pool.fetchval(
                """
                SELECT max(step_at) FROM messages
                WHERE journey = $1 AND customer_id = $2 AND status IN ('sent', 'sending', 'unknown')
                """,
                check.journey,
                check.customer_id,
            )
            if last is not None and last > since:
                return ReentryDecision(allowed=False, reason=f"last message of this journey at {last.isoformat()}")
            return ReentryDecision(allowed=True)

        last_entry = await self.pool.fetchval(
            "SELECT max(entered_at) FROM journey_runs WHERE journey = $1 AND customer_id = $2 AND status <> 'active'",
            check.journey,
            check.customer_id,
        )
        if last_entry is not None and last_entry > since:
            return ReentryDecision(allowed=False, reason=f"last entry at {last_entry.isoformat()}")
        return ReentryDecision(allowed=True)
