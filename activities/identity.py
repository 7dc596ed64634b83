"""Identity resolution: one canonical customer per person.

Each identifier (`userId`, `anonymousId`, a lower-cased email address) points at one customer.
The rules, applied inside the ingest transaction while the identifiers involved are locked:

- An unknown `userId` arriving with an anonymous id (or email) whose customer has no `userId`
  yet adopts that customer: the anonymous history becomes the known customer's.
- A known `userId` arriving with an anonymous id of another anonymous customer merges that
  customer into it: identities and events move, traits merge by event timestamp.
- Two customers with different `userId`s are never merged through a shared anonymous id or
  email: the identifier moves to the customer named in the later call, and the earlier customer
  keeps their own history. Only an explicit `alias` merges two known customers.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from bisik.models import IncomingEvent, normalize_email
from bisik.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class CustomerRef:
    id: str
    user_id: str | None

    @property
    def is_known(self) -> bool:
        return self.user_id is not None


def new_customer_id() -> str:
    return "cus_" + uuid.uuid4().hex


def merge_traits(
    traits: dict[str, Any],
    timestamps: dict[str, str],
    new_traits: dict[str, Any],
    at: datetime,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply `new_traits`, stamped `at`, over traits whose own stamps are older.

    A trait set by a later event is never overwritten by an earlier one that arrives late; on
    equal stamps the one applied last wins. Each top-level trait is one value: a nested object
    such as `address` is replaced whole.
    """
    merged = dict(traits)
    merged_timestamps = dict(timestamps)
    stamp = at.astimezone(UTC).isoformat()
    for key, value in new_traits.items():
        current = merged_timestamps.get(key)
        if current is None or datetime.fromisoformat(current) <= at:
            merged[key] = value
            merged_timestamps[key] = stamp
    return merged, merged_timestamps


def combine_traits(
    earlier: tuple[dict[str, Any], dict[str, str]], later: tuple[dict[str, Any], dict[str, str]]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge two customers' traits, each trait taken from whichever side set it last."""
    traits, timestamps = dict(earlier[0]), dict(earlier[1])
    for key, value in later[0].items():
        stamp = later[1].get(key)
        current = timestamps.get(key)
        if current is None or (
            stamp is not None and datetime.fromisoformat(current) <= datetime.fromisoformat(stamp)
        ):
            traits[key] = value
            if stamp is not None:
                timestamps[key] = stamp
    return traits, timestamps


class IdentityResolver:
    """Finds or creates the customer of an event. Call inside a transaction holding the locks."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        # Lookups already made in this transaction; the locks taken up front keep them valid.
        self._cache: dict[tuple[str, str], CustomerRef | None] = {}
        self._merged_into: dict[str, str] = {}

    def canonical(self, customer_id: str) -> str:
        """Follow the merges made in this transaction from `customer_id` to the surviving customer."""
        while customer_id in self._merged_into:
            customer_id = self._merged_into[customer_id]
        return customer_id

    async def resolve(self, event: IncomingEvent) -> str:
        if event.type == "alias":
            return await self._resolve_alias(event)
        if event.user_id is not None:
            return await self._resolve_known(event)
        return await self._resolve_anonymous(event)

    async def _resolve_known(self, event: IncomingEvent) -> str:
        assert event.user_id is not None
        customer = await self._lookup("user_id", event.user_id)
        by_anonymous_id = await self._lookup_optional("anonymous_id", event.anonymous_id)
        by_email = await self._lookup_optional("email", event.email)

        if customer is None:
            adoptable = next(
                (ref for ref in (by_anonymous_id, by_email) if ref is not None and not ref.is_known),
                None,
            )
            if adoptable is not None:
                customer = await self._attach_user_id(adoptable, event.user_id)
            else:
                customer = await self._create(event, user_id=event.user_id)
            await self._add_identity("user_id", event.user_id, customer.id)

        if event.anonymous_id is not None:
            await self._claim("anonymous_id", event.anonymous_id, by_anonymous_id, customer)
        if event.email is not None:
            current = await self._lookup("email", event.email)
            await self._claim("email", event.email, current, customer)
        return customer.id

    async def _resolve_anonymous(self, event: IncomingEvent) -> str:
        assert event.anonymous_id is not None
        customer = await self._lookup("anonymous_id", event.anonymous_id)
        by_email = await self._lookup_optional("email", event.email)

        if customer is None:
            customer = by_email or await self._create(event, user_id=None)
            await self._add_identity("anonymous_id", event.anonymous_id, customer.id)

        if event.email is not None and by_email is None:
            await self._add_identity("email", event.email, customer.id)
        elif by_email is not None and by_email.id != customer.id:
            if not customer.is_known:
                # An anonymous visitor gave the address of a customer we know: they are that customer.
                await self._merge(source=customer, target=by_email)
                customer = by_email
            elif not by_email.is_known:
                await self._merge(source=by_email, target=customer)
            else:
                await self._move_identity("email", event.email, customer)
        return customer.id

    async def _resolve_alias(self, event: IncomingEvent) -> str:
        """`alias` says `previousId` and `userId` are the same person, so it may merge known customers."""
        assert event.user_id is not None and event.previous_id is not None
        customer = await self._lookup("user_id", event.user_id)
        previous = await self._lookup("user_id", event.previous_id) or await self._lookup(
            "anonymous_id", event.previous_id
        )

        if customer is None and previous is None:
            customer = await self._create(event, user_id=event.user_id)
            await self._add_identity("user_id", event.user_id, customer.id)
            await self._add_identity("anonymous_id", event.previous_id, customer.id)
        elif customer is None:
            assert previous is not None
            customer = previous
            if not previous.is_known:
                customer = await self._attach_user_id(previous, event.user_id)
            await self._add_identity("user_id", event.user_id, customer.id)
        elif previous is None:
            await self._add_identity("anonymous_id", event.previous_id, customer.id)
        elif previous.id != customer.id:
            await self._merge(source=previous, target=customer)
        return customer.id

    # Building blocks

    async def _lookup(self, kind: str, value: str) -> CustomerRef | None:
        if (kind, value) in self._cache:
            return self._cache[(kind, value)]
        row = await self.connection.fetchrow(
            """
            SELECT c.id, c.user_id
            FROM identities i JOIN customers c ON c.id = i.customer_id
            WHERE i.kind = $1 AND i.value = $2
            """,
            kind,
            value,
        )
        found = None if row is None else CustomerRef(row["id"], row["user_id"])
        self._cache[(kind, value)] = found
        return found

    async def _lookup_optional(self, kind: str, value: str | None) -> CustomerRef | None:
        return None if value is None else await self._lookup(kind, value)

    async def _create(self, event: IncomingEvent, *, user_id: str | None) -> CustomerRef:
        customer_id = new_customer_id()
        await self.connection.execute(
            """
            INSERT INTO customers (id, user_id, first_seen_at, last_seen_at)
            VALUES ($1, $2, $3, $3)
            """,
            customer_id,
            user_id,
            event.timestamp,
        )
        log.info("customer.created", customer_id=customer_id, known=user_id is not None)
        return CustomerRef(customer_id, user_id)

    async def _attach_user_id(self, customer: CustomerRef, user_id: str) -> CustomerRef:
        await self.connection.execute(
            "UPDATE customers SET user_id = $2, updated_at = now() WHERE id = $1", customer.id, user_id
        )
        self._cache.clear()
        log.info("customer.identified", customer_id=customer.id)
        return CustomerRef(customer.id, user_id)

    async def _add_identity(self, kind: str, value: str, customer_id: str) -> None:
        await self.connection.execute(
            """
            INSERT INTO identities (kind, value, customer_id) VALUES ($1, $2, $3)
            ON CONFLICT (kind, value) DO UPDATE SET customer_id = EXCLUDED.customer_id, updated_at = now()
            """,
            kind,
            value,
            customer_id,
        )
        self._cache.pop((kind, value), None)

    async def _claim(
        self, kind: str, value: str, holder: CustomerRef | None, customer: CustomerRef
    ) -> None:
        """Make `value` point at `customer`, merging an anonymous holder or moving it from a known one."""
        if holder is None:
            await self._add_identity(kind, value, customer.id)
        elif holder.id == customer.id:
            return
        elif not holder.is_known:
            await self._merge(source=holder, target=customer)
        else:
            await self._move_identity(kind, value, customer)

    async def _move_identity(self, kind: str, value: str, customer: CustomerRef) -> None:
        await self._add_identity(kind, value, customer.id)
        log.info("identity.moved", kind=kind, customer_id=customer.id)

    async def _merge(self, *, source: CustomerRef, target: CustomerRef) -> None:
        """Fold `source` into `target`: identities, events and traits move; `source` stays as a pointer."""
        rows = await self.connection.fetch(
            """
            SELECT id, traits, trait_timestamps, first_seen_at, last_seen_at
            FROM customers WHERE id = ANY($1::text[]) FOR UPDATE
            """,
            [source.id, target.id],
        )
        by_id = {row["id"]: row for row in rows}
        source_row, target_row = by_id[source.id], by_id[target.id]
        traits, timestamps = combine_traits(
            (source_row["traits"], source_row["trait_timestamps"]),
            (target_row["traits"], target_row["trait_timestamps"]),
        )
        await self.connection.execute(
            "UPDATE identities SET customer_id = $2, updated_at = now() WHERE customer_id = $1",
            source.id,
            target.id,
        )
        await self.connection.execute(
            "UPDATE events SET customer_id = $2 WHERE customer_id = $1", source.id, target.id
        )
        await self.connection.execute(
            """
            UPDATE customers SET
                traits = $2,
                trait_timestamps = $3,
                email = COALESCE($6, email),
                first_seen_at = LEAST(first_seen_at, $4),
                last_seen_at = GREATEST(last_seen_at, $5),
                updated_at = now()
            WHERE id = $1
            """,
            target.id,
            traits,
            timestamps,
            source_row["first_seen_at"],
            source_row["last_seen_at"],
            normalize_email(traits.get("email")),
        )
        await self.connection.execute(
            """
            UPDATE customers SET merged_into = $2, user_id = NULL, updated_at = now()
            WHERE id = $1 OR merged_into = $1
            """,
            source.id,
            target.id,
        )
        self._merged_into[source.id] = target.id
        self._cache.clear()
        log.info("customer.merged", customer_id=target.id, merged_customer_id=source.id)
