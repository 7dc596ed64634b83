"""Storing incoming events: identity, profile change, event row and outbox row in one transaction.

The API returns 200 only after `EventStore.store` has committed, so an acknowledged event is
never lost. Routing to Temporal happens later, from the outbox, by the relay.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from collections import defaultdict
from datetime import UTC, datetime, timedelta
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
VIEW_WINDOW = timedelta(hours=24)
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
        """`needs_routing` returns whether any journey wants an event; only those get an outbox row."""
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

        async with self.pool.acquire() as connection, connection.transaction():
            # Every identifier these events touch is locked up front and in one order, so parallel
            # calls about one person are serialised and two calls cannot deadlock on each other.
            await connection.execute(
                "SELECT pg_advisory_xact_lock(key) FROM unnest($1::bigint[]) AS key ORDER BY key",
                keys,
            )
            already_stored = await self._stored_message_ids(connection, events)
            new_events = [event for event in events if (event.source, event.message_id) not in already_stored]

            # Identities first, event by event, since one event can decide who the next one is.
            resolver = IdentityResolver(connection)
            customers = [await resolver.resolve(event) for event in new_events]
            # A later event of this call may have merged an earlier event's customer away.
            customers = [resolver.canonical(customer_id) for customer_id in customers]

            await self._derive(connection, new_events, customers)
            event_ids = await self._insert_events(connection, new_events, customers)
            inserted = [
                (event, customer_id, event_ids[(event.source, event.message_id)])
                for event, customer_id in zip(new_events, customers, strict=True)
                if (event.source, event.message_id) in event_ids
            ]

            await self._update_profiles(connection, [(event, customer_id) for event, customer_id, _ in inserted])
            for event, customer_id, event_id in inserted:
                await self._record_contact_events(connection, event, customer_id, event_id)
            routed = [(event_id, customer_id) for event, customer_id, event_id in inserted if self.needs_routing(event)]
            if routed:
                await connection.execute(
                    "INSERT INTO outbox (event_id, customer_id) SELECT * FROM unnest($1::bigint[], $2::text[])",
                    [event_id for event_id, _ in routed],
                    [customer_id for _, customer_id in routed],
                )
                await connection.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
        return StoreResult(
            stored=len(inserted), duplicates=len(events) - len(inserted), routed=len(routed)
        )

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

        Returns the new event id, or None when `message_id` was stored before. Consent changes
        and bounces apply in the same transaction, as for ingested events. Only with
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
            await self._record_contact_events(connection, probe, customer, event_id)
            if self.needs_routing(probe):
                await connection.execute(
                    "INSERT INTO outbox (event_id, customer_id) VALUES ($1, $2)", event_id, customer
                )
                await connection.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
        return event_id

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

    async def _derive(
        self, connection: asyncpg.Connection, events: list[IncomingEvent], customers: list[str]
    ) -> None:
        """Compute what journeys route on but the client did not send, and update the catalog.

        Sets on each `Product Viewed` the views (`product_views_24h`, this one included) and cart
        adds (`product_carted_24h`) of that product by that customer in the 24 hours up to it,
        stored before or earlier in this call; a product is matched by `product_id`, else `sku`.
        """
        catalog: dict[str, dict[str, Any]] = {}
        earlier_in_call: dict[tuple[str, str, str], list[datetime]] = defaultdict(list)
        for event, customer_id in zip(events, customers, strict=True):
            if event.type != "track" or event.name not in PRODUCT_EVENTS or not event.properties:
                continue
            product_id = event.properties.get("product_id") or event.properties.get("sku")
            if product_id is None:
                continue
            product_id = str(product_id)
            # Later events of the call win, field by field, as they would one call after another.
            catalog[product_id] = {**catalog.get(product_id, {}), **event.properties}
            earlier_in_call[(customer_id, product_id, event.name or "")].append(event.timestamp)
            if event.name != "Product Viewed":
                continue
            stored = await connection.fetchrow(
                """
                SELECT count(*) FILTER (WHERE name = 'Product Viewed') AS views,
                       count(*) FILTER (WHERE name = 'Product Added') AS adds
                FROM events
                WHERE customer_id = $1 AND type = 'track' AND name IN ('Product Viewed', 'Product Added')
                  AND COALESCE(properties ->> 'product_id', properties ->> 'sku') = $2
                  AND timestamp > $3::timestamptz - interval '24 hours' AND timestamp <= $3::timestamptz
                """,
                customer_id,
                product_id,
                event.timestamp,
            )
            window_start = event.timestamp - VIEW_WINDOW

            def in_call(name: str) -> int:
                return sum(
                    1 for seen in earlier_in_call[(customer_id, product_id, name)] if window_start < seen <= event.timestamp
                )

            # This view is among the in-call views already.
            event.derived["product_views_24h"] = stored["views"] + in_call("Product Viewed")
            event.derived["product_carted_24h"] = stored["adds"] + in_call("Product Added")
        for properties in catalog.values():
            await CatalogStore.update_from_event(connection, properties)

    async def _insert_events(
        self, connection: asyncpg.Connection, events: list[IncomingEvent], customers: list[str]
    ) -> dict[tuple[str, str], int]:
        """Insert the events in one statement; return the ids of those not stored concurrently."""
        if not events:
            return {}
        rows = await connection.fetch(
            """
            INSERT INTO events (
                source, message_id, type, name, customer_id, user_id, anonymous_id, timestamp,
                original_timestamp, sent_at, received_at, properties, traits, context, payload, derived
            )
            SELECT source, message_id, type, name, customer_id, user_id, anonymous_id, timestamp,
                   original_timestamp, sent_at, received_at, properties, traits, context, payload, derived
            FROM unnest(
                $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::timestamptz[], $9::timestamptz[], $10::timestamptz[], $11::timestamptz[],
                $12::jsonb[], $13::jsonb[], $14::jsonb[], $15::jsonb[], $16::jsonb[]
            ) WITH ORDINALITY AS call (
                source, message_id, type, name, customer_id, user_id, anonymous_id, timestamp,
                original_timestamp, sent_at, received_at, properties, traits, context, payload, derived, position
            )
            -- Ids follow the order of the call, which is the order the relay routes events in.
            ORDER BY position
            ON CONFLICT (source, message_id) DO NOTHING
            RETURNING id, source, message_id
            """,
            [event.source for event in events],
            [event.message_id for event in events],
            [event.type for event in events],
            [event.name for event in events],
            customers,
            [event.user_id for event in events],
            [event.anonymous_id for event in events],
            [event.timestamp for event in events],
            [event.original_timestamp for event in events],
            [event.sent_at for event in events],
            [event.received_at for event in events],
            [event.properties for event in events],
            [event.traits for event in events],
            [event.context for event in events],
            [event.payload for event in events],
            [event.derived for event in events],
        )
        return {(row["source"], row["message_id"]): row["id"] for row in rows}

    async def _update_profiles(
        self, connection: asyncpg.Connection, stored: list[tuple[IncomingEvent, str]]
    ) -> None:
        """Move first and last seen, fill in missing emails, and merge identify traits by timestamp."""
        seen: dict[str, tuple[datetime, datetime, str | None]] = {}
        traits_by_customer: dict[str, list[IncomingEvent]] = defaultdict(list)
        for event, customer_id in stored:
            first, last, email = seen.get(customer_id, (event.timestamp, event.timestamp, None))
            seen[customer_id] = (min(first, event.timestamp), max(last, event.timestamp), email or event.email)
            if event.type == "identify" and event.traits:
                traits_by_customer[customer_id].append(event)

        if seen:
            await connection.execute(
                """
                UPDATE customers c SET
                    first_seen_at = LEAST(c.first_seen_at, s.first_seen),
                    last_seen_at = GREATEST(c.last_seen_at, s.last_seen),
                    email = COALESCE(c.email, s.email)
                FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::text[])
                    AS s(customer_id, first_seen, last_seen, email)
                WHERE c.id = s.customer_id
                """,
                list(seen),
                [first for first, _, _ in seen.values()],
                [last for _, last, _ in seen.values()],
                [email for _, _, email in seen.values()],
            )

        for customer_id, identifies in traits_by_customer.items():
            row = await connection.fetchrow(
                "SELECT traits, trait_timestamps FROM customers WHERE id = $1 FOR UPDATE", customer_id
            )
            traits, timestamps = row["traits"], row["trait_timestamps"]
            for event in identifies:
                traits, timestamps = merge_traits(traits, timestamps, event.traits or {}, event.timestamp)
            await connection.execute(
                """
                UPDATE customers SET traits = $2, trait_timestamps = $3, email = COALESCE($4, email), updated_at = now()
                WHERE id = $1
                """,
                customer_id,
                traits,
                timestamps,
                normalize_email(traits.get("email")),
            )
