"""The contact policy, applied to one marketing message against the customer's message log.

Order of checks, each recorded on the message row as its `decision`:

1. Consent: WhatsApp and SMS marketing need the customer's consent for that channel (and topic).
   Email needs it only with BISIK_EMAIL_REQUIRES_CONSENT, though an explicit email opt-out always
   counts. Without consent the message is `suppressed`.
2. Frequency caps (BISIK_FREQUENCY_CAPS) across every journey, counting marketing messages sent
   or holding a slot. Higher-priority deferred messages, and earlier ones of equal priority,
   hold their slots, so when two journeys compete the higher priority goes first.
3. Quiet hours (BISIK_QUIET_HOURS) in the customer's time zone, else the account's.

Messages that may go now are marked `reserved`, which holds their slot; others are `deferred`
to the first moment caps and quiet hours allow (`dropped` instead when the journey said they
may be, or when that moment is past the journey's deadline). The whole decision runs under a
per-customer advisory lock, so two workers racing for one customer cannot both pass a cap.
Transactional messages skip the policy and do not count towards caps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from bisik.models import Profile, SendRequest
from bisik.policy import FrequencyCap, QuietHours, earliest_within_caps, parse_caps, zone_or_default
from bisik.settings import Settings

# Slots that count towards the caps.
HOLDING_SLOT = ("reserved", "sending", "sent", "unknown")


@dataclass(frozen=True)
class Decision:
    action: str  # "send", "defer", "drop" or "suppress"
    reason: str
    until: datetime | None = None


def customer_lock_key(customer_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"policy:{customer_id}".encode()).digest()[:8], "big", signed=True)


class ContactPolicy:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings

    @property
    def caps(self) -> list[FrequencyCap]:
        return parse_caps(self.settings.frequency_caps)

    @property
    def quiet_hours(self) -> QuietHours | None:
        return QuietHours.parse(self.settings.quiet_hours)

    async def consent_refusal(self, customer_id: str, channel: str, topic: str | None) -> str | None:
        """Return why the customer's consent does not allow marketing on `channel`, or None.

        The latest consent for the channel as a whole decides first: withdrawn there means no
        topic of the channel either. Then the latest consent for the topic, if one was recorded.
        """
        if channel == "webhook":
            return None
        rows = await self.pool.fetch(
            """
            SELECT DISTINCT ON (topic IS NULL) topic IS NULL AS whole_channel, granted FROM consents
            WHERE customer_id = (SELECT COALESCE(merged_into, id) FROM customers WHERE id = $1)
              AND channel = $2 AND (topic IS NULL OR topic = $3)
            ORDER BY topic IS NULL, recorded_at DESC
            """,
            customer_id,
            channel,
            topic,
        )
        latest = {row["whole_channel"]: row["granted"] for row in rows}
        if latest.get(True) is False or latest.get(False) is False:
            return f"no consent: {channel} consent withdrawn"
        needs_consent = channel in ("whatsapp", "sms") or self.settings.email_requires_consent
        if needs_consent and not latest:
            return f"no consent: {channel} marketing needs the customer's consent"
        return None

    async def decide(self, message_row: int, request: SendRequest, profile: Profile) -> Decision:
        """Decide now, or when, this marketing message may go; record the decision on its row."""
        now = request.step_at
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", customer_lock_key(profile.customer_id))
            taken = await self._slots(connection, message_row, request, profile.customer_id)
            when, because = self._earliest(now, taken, request, profile)

            if when <= now:
                decision = Decision("send", "within caps and outside quiet hours")
                await connection.execute(
                    """
                    UPDATE messages SET status = 'reserved', step_at = $2, deferred_until = NULL,
                        decision = $3, priority = $4, topic = $5, droppable = $6, deadline = $7, updated_at = now()
                    WHERE id = $1
                    """,
                    message_row, now, decision.reason, request.priority, request.topic, request.droppable, request.deadline,
                )  # fmt: skip
                return decision

            if request.droppable or (request.deadline is not None and when > request.deadline):
                why = "droppable" if request.droppable else f"past its deadline {request.deadline.isoformat()}"
                decision = Decision("drop", f"dropped ({why}): {because} until {when.isoformat()}", when)
                status, deferred_until = "dropped", None
            else:
                decision = Decision("defer", f"deferred until {when.isoformat()} by {because}", when)
                status, deferred_until = "deferred", when
            await connection.execute(
                """
                UPDATE messages SET status = $2, step_at = $3, deferred_until = $4, decision = $5, reason = $5,
                    priority = $6, topic = $7, droppable = $8, deadline = $9, updated_at = now()
                WHERE id = $1
                """,
                message_row, status, now, deferred_until, decision.reason, request.priority,
                request.topic, request.droppable, request.deadline,
            )  # fmt: skip
            return decision

    async def _slots(
        self, connection: asyncpg.Connection, message_row: int, request: SendRequest, customer_id: str
    ) -> list[tuple[datetime, str]]:
        rows = await connection.fetch(
            """
            SELECT COALESCE(deferred_until, step_at) AS at, channel FROM messages
            WHERE customer_id = $1 AND NOT transactional AND id <> $2
              AND (
                  status = ANY($3::text[])
                  OR (status = 'deferred' AND (priority > $4 OR (priority = $4 AND id < $2)))
              )
            """,
            customer_id,
            message_row,
            list(HOLDING_SLOT),
            request.priority,
        )
        return [(row["at"], row["channel"]) for row in rows]

    def _earliest(
        self, now: datetime, taken: list[tuple[datetime, str]], request: SendRequest, profile: Profile
    ) -> tuple[datetime, str]:
        """Return the first moment caps and quiet hours allow, and what held it back."""
        reasons = []
        caps, quiet_hours = self.caps, self.quiet_hours
        when = earliest_within_caps(now, taken, caps, request.channel, request.time_scale)
        if when > now:
            reasons.append("frequency caps " + ", ".join(str(cap) for cap in caps if cap.applies_to(request.channel)))
        # Quiet hours are clock hours of the customer's day, which a time scale cannot shrink.
        if quiet_hours is None or request.time_scale != 1:
            return when, " and ".join(reasons)
        zone = zone_or_default(profile.timezone, self.settings.default_timezone)
        for _ in range(16):
            after_quiet = quiet_hours.next_allowed(when, zone)
            if after_quiet == when:
                break
            reasons.append(f"quiet hours {self.settings.quiet_hours} in {zone.key}")
            when = earliest_within_caps(after_quiet, taken, caps, request.channel, request.time_scale)
        return when, " and ".join(dict.fromkeys(reasons))
