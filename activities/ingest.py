"""Storing incoming events: identity, profile change, event row and outbox row in one transaction.

The API answers 200 only after `EventStore.store` has committed, so an acknowledged event is
never lost. Routing to Temporal happens later, from the outbox, by the relay.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from activities.catalog import CatalogStore
from activities.identity import IdentityResolver, merge_traits
from bisik.models import IncomingEvent, normalize_email
from bisik.logs import get_logger

log = get_logger(__name__)

OUTBOX_CHANNEL = "bisik_outbox"
# A track event that records a customer's consent for one channel (and optionally one topic).
CONSENT_EVENT = "Consent Updated"
CONSENT_CHANNELS = ("email", "whatsapp", "sms")
# Events whose properties describe a product, and so keep the catalog current.
PRODUCT_EVENTS = {"Product Viewed", "Product Added"}
# Source of events Bisik records itself rather than receives from a client.
SYSTEM_SOURCE = "bisik"
# Errors that two concurrent transactions can cause each other; the whole transaction is retried.
RETRYABLE_ERRORS = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.UniqueViolationError,
)
MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class StoreResult:
    stored: int
    duplicates: int
    routed: int


def lock_key(identity: str) -> int:
    """Map an identity such as `user_id:42` to a 64-bit advisory lock key."""
    return int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big", signed=True)


class EventStore:
    def __init__(self, pool: asyncpg.Pool, needs_routing: Callable[[IncomingEvent], bool]) -> None:
        """`needs_routing` tells whether any journey wants an event; only those get an outbox row."""
        self.pool = pool
        self.needs_routing = needs_routing

    async def store(self, events: list[IncomingEvent]) -> StoreResult:
        """Store the events not stored before, in order; return how many were new."""
        unique = list({(event.source, event.message_id): event for event in reversed(events)}.values())
        unique.reverse()
        repeated_in_call = len(events) - len(unique)

        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                result = await self._store_once(unique)
            except RETRYABLE_ERRORS as error:
                if attempt == MAX_ATTEMPTS:
                    raise
                log.warning(
                    "ingest.transaction_retried", attempt=attempt, error=type(error).__name__
                )
                await asyncio.sleep(random.uniform(0.005, 0.05) * attempt)
                continue
            return StoreResult(
                stored=result.stored,
                duplicates=result.duplicates + repeated_in_call,
                routed=result.routed,
            )
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _store_once(self, events: list[IncomingEvent]) -> StoreResult:
        keys = sorted({lock_key(key) for event in events for key in event.identity_keys})
        stored = duplicates = routed = 0

        async with self.pool.acquire() as connection, connection.transaction():
            # Every identifier these events touch is locked up front and in one order, so parallel
            # calls about one person are serialised and two calls cannot deadlock on each other.
            await connection.execute(
                "SELECT pg_advisory_xact_lock(key) FROM unnest($1::bigint[]) AS key ORDER BY key",
                keys,
            )
            already_stored = await self._stored_message_ids(connection, events)
            resolver = IdentityResolver(connection)

            for event in events:
                if (event.source, event.message_id) in already_stored:
                    duplicates += 1
                    continue
                customer_id = await resolver.resolve(event)
                await self._derive(connection, event, customer_id)
                event_id = await self._insert_event(connection, event, customer_id)
                if event_id is None:
                    duplicates += 1
                    continue
                stored += 1
                await self._update_profile(connection, event, customer_id)
                await self._record_contact_events(connection, event, customer_id, event_id)
                if self.needs_routing(event):
                    await connection.execute(
                        "INSERT INTO outbox (event_id, customer_id) VALUES ($1, $2)",
                        event_id,
                        customer_id,
                    )
                    routed += 1

            if routed:
                await connection.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
        return StoreResult(stored=stored, duplicates=duplicates, routed=routed)

    @staticmethod
    async def _record_contact_events(
        connection: asyncpg.Connection, event: IncomingEvent, customer_id: str, event_id: int
    ) -> None:
        """Apply consent changes, hard bounces and spam complaints in the event's own transaction."""
        if event.type != "track":
            return
        properties = event.properties or {}
        if event.name == CONSENT_EVENT:
            await connection.execute(
                """
                INSERT INTO consents (customer_id, channel, topic, granted, source, recorded_at)
                VALUES ($1, $2, $3, $4, $5, $6)
                """,
                customer_id,
                properties["channel"],
                properties.get("topic"),
                properties["granted"],
                str(properties.get("source") or event.source),
                event.timestamp,
            )
            return
        reason = None
        if event.name == "Email Bounced" and str(properties.get("bounce_type", "")).lower() in ("hard", "permanent"):
            reason = "hard_bounce"
        elif event.name == "Email Marked as Spam":
            reason = "complaint"
        if reason is not None:
            # A dead or complaining address gets no more marketing from any journey.
            await connection.execute(
                """
                INSERT INTO suppressions (customer_id, channel, reason, source, message_id)
                VALUES ($1, 'email', $2, 'event', NULL)
                ON CONFLICT (customer_id, channel, COALESCE(topic, ''), reason) DO NOTHING
                """,
                customer_id,
                reason,
            )
            log.info("customer.suppressed", customer_id=customer_id, channel="email", reason=reason, event_id=event_id)

    async def record_system_event(
        self,
        customer_id: str,
        name: str,
        properties: dict[str, Any],
        *,
        message_id: str,
        source: str = SYSTEM_SOURCE,
        counts_as_activity: bool = False,
    ) -> int | None:
        """Store an event Bisik itself observed about a customer (an unsubscribe, an email open).

        Returns the new event id, or None when `message_id` was stored before. Only with
        `counts_as_activity` (opens and clicks) does it move the customer's `last_seen_at`.
        """
        now = datetime.now(UTC)
        async with self.pool.acquire() as connection, connection.transaction():
            customer = await connection.fetchval(
                "SELECT COALESCE(merged_into, id) FROM customers WHERE id = $1", customer_id
            )
            if customer is None:
                raise LookupError(f"customer {customer_id} not found")
            event_id = await connection.fetchval(
                """
                INSERT INTO events (source, message_id, type, name, customer_id, timestamp, received_at, properties, context, payload)
                VALUES ($1, $2, 'track', $3, $4, $5, $5, $6, '{}'::jsonb, $7)
                ON CONFLICT (source, message_id) DO NOTHING
                RETURNING id
                """,
                source,
                message_id,
                name,
                customer,
                now,
                properties,
                {"type": "track", "event": name, "properties": properties, "messageId": message_id},
            )
            if event_id is None:
                return None
            if counts_as_activity:
                await connection.execute(
                    "UPDATE customers SET last_seen_at = GREATEST(last_seen_at, $2) WHERE id = $1", customer, now
                )
            probe = IncomingEvent(
                source=source, message_id=message_id, type="track", name=name, user_id=None,
                anonymous_id=None, email=None, previous_id=None, timestamp=now,
                original_timestamp=None, sent_at=None, received_at=now, properties=properties,
                traits=None, context={}, payload={},
            )  # fmt: skip
            if self.needs_routing(probe):
                await connection.execute(
                    "INSERT INTO outbox (event_id, customer_id) VALUES ($1, $2)", event_id, customer
                )
                await connection.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
        return event_id

    async def _derive(self, connection: asyncpg.Connection, event: IncomingEvent, customer_id: str) -> None:
        """Compute what journeys route on but the client did not send, and update the catalog."""
        if event.type != "track" or event.name not in PRODUCT_EVENTS or not event.properties:
            return
        await CatalogStore.update_from_event(connection, event.properties)
        product_id = event.properties.get("product_id") or event.properties.get("sku")
        if event.name != "Product Viewed" or product_id is None:
            return
        earlier_views = await connection.fetchval(
            """
            SELECT count(*) FROM events
            WHERE customer_id = $1 AND name = 'Product Viewed' AND type = 'track'
              AND properties ->> 'product_id' = $2
              AND timestamp > $3::timestamptz - interval '24 hours' AND timestamp <= $3::timestamptz
            """,
            customer_id,
            str(product_id),
            event.timestamp,
        )
        event.derived["product_views_24h"] = earlier_views + 1

    async def _stored_message_ids(
        self, connection: asyncpg.Connection, events: list[IncomingEvent]
    ) -> set[tuple[str, str]]:
        rows = await connection.fetch(
            """
            SELECT source, message_id FROM events
            WHERE (source, message_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
            """,
            [event.source for event in events],
            [event.message_id for event in events],
        )
        return {(row["source"], row["message_id"]) for row in rows}

    async def _insert_event(
        self, connection: asyncpg.Connection, event: IncomingEvent, customer_id: str
    ) -> int | None:
        return await connection.fetchval(
            """
            INSERT INTO events (
                source, message_id, type, name, customer_id, user_id, anonymous_id, timestamp,
                original_timestamp, sent_at, received_at, properties, traits, context, payload, derived
            ) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
            ON CONFLICT (source, message_id) DO NOTHING
            RETURNING id
            """,
            event.source,
            event.message_id,
            event.type,
            event.name,
            customer_id,
            event.user_id,
            event.anonymous_id,
            event.timestamp,
            event.original_timestamp,
            event.sent_at,
            event.received_at,
            event.properties,
            event.traits,
            event.context,
            event.payload,
            event.derived,
        )

    async def _update_profile(
        self, connection: asyncpg.Connection, event: IncomingEvent, customer_id: str
    ) -> None:
        if event.type != "identify" or not event.traits:
            await connection.execute(
                """
                UPDATE customers SET
                    last_seen_at = GREATEST(last_seen_at, $2),
                    first_seen_at = LEAST(first_seen_at, $2),
                    email = COALESCE(email, $3)
                WHERE id = $1
                """,
                customer_id,
                event.timestamp,
                event.email,
            )
            return

        row = await connection.fetchrow(
            "SELECT traits, trait_timestamps FROM customers WHERE id = $1 FOR UPDATE", customer_id
        )
        traits, timestamps = merge_traits(
            row["traits"], row["trait_timestamps"], event.traits, event.timestamp
        )
        await connection.execute(
            """
            UPDATE customers SET
                traits = $2,
                trait_timestamps = $3,
                email = COALESCE($5, email),
                last_seen_at = GREATEST(last_seen_at, $4),
                first_seen_at = LEAST(first_seen_at, $4),
                updated_at = now()
            WHERE id = $1
            """,
            customer_id,
            traits,
            timestamps,
            event.timestamp,
            normalize_email(traits.get("email")),
        )
