"""Data types shared by the API, the relay, the workflows and the activities.

Nothing here does I/O, so workflow code can import this module through the sandbox.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from temporalio.common import SearchAttributeKey

EventType = Literal["track", "identify", "page", "screen", "group", "alias"]

# Search attributes on every journey workflow, so operators can filter runs in the Temporal Web UI.
CUSTOMER_ID_ATTRIBUTE = SearchAttributeKey.for_keyword("CustomerId")
JOURNEY_ATTRIBUTE = SearchAttributeKey.for_keyword("Journey")

EVENT_SIGNAL = "event"

# Temporal suggests continue-as-new itself near its limits; this is our own, lower ceiling.
DEFAULT_HISTORY_LIMIT = 5000


class JourneyEvent(BaseModel):
    """One stored event as a journey receives it."""

    model_config = ConfigDict(frozen=True)

    id: int = Field(description="Primary key of the stored event; journeys deduplicate on it.")
    message_id: str
    type: EventType
    name: str | None = Field(None, description="Event name of a track call, page or screen name.")
    customer_id: str
    timestamp: datetime = Field(description="When it happened, corrected for the client's clock.")
    received_at: datetime
    properties: dict[str, Any] = Field(default_factory=dict)
    traits: dict[str, Any] = Field(default_factory=dict)
    derived: dict[str, Any] = Field(
        default_factory=dict, description="Facts Bisik computed at ingest, such as product_views_24h."
    )

    @classmethod
    def from_row(cls, row: Mapping[str, Any], *, id_column: str = "id") -> JourneyEvent:
        """Build the event from a row of the `events` table (or a query selecting its columns)."""
        return cls(
            id=row[id_column],
            message_id=row["message_id"],
            type=row["type"],
            name=row["name"],
            customer_id=row["customer_id"],
            timestamp=row["timestamp"],
            received_at=row["received_at"],
            properties=row["properties"] or {},
            traits=row["traits"] or {},
            derived=row["derived"] or {},
        )


class JourneyInput(BaseModel):
    """Input of every journey workflow, also carried through continue-as-new."""

    customer_id: str
    journey: str
    time_scale: float = Field(1.0, gt=0, description="Divides every delay of the journey.")
    history_limit: int = Field(
        DEFAULT_HISTORY_LIMIT, ge=100, description="History length at which the run continues as new."
    )
    send_timeout_seconds: float = Field(60.0, gt=0, description="Start-to-close timeout of one send attempt.")
    trigger: JourneyEvent | None = Field(
        None, description="The event that started this entry; None until the first run takes it."
    )
    state: dict[str, Any] = Field(
        default_factory=dict, description="The journey's own state, kept across continue-as-new."
    )
    completed_steps: dict[str, Any] = Field(
        default_factory=dict, description="Result of each step already done in this entry, by step name."
    )
    pending_events: list[JourneyEvent] = Field(
        default_factory=list, description="Events received but not yet handled by the previous run."
    )
    seen_event_ids: list[int] = Field(default_factory=list)


class JourneyResult(BaseModel):
    outcome: Literal["completed", "exited"]
    reason: str
    events_received: int


class JourneyRunRecord(BaseModel):
    """What a journey reports about itself to the run log in PostgreSQL."""

    customer_id: str
    journey: str
    workflow_id: str
    run_id: str
    status: Literal["active", "completed", "exited"]
    reason: str | None = None
    at: datetime = Field(description="The journey's clock when the entry began or ended.")


class ReentryRule(BaseModel):
    """When a customer who finished a journey may enter it again."""

    kind: Literal["always", "never", "after_last_message", "after_last_entry"] = "always"
    cooldown_seconds: float = Field(0, ge=0)

    @classmethod
    def always(cls) -> ReentryRule:
        return cls(kind="always")

    @classmethod
    def never(cls) -> ReentryRule:
        return cls(kind="never")

    @classmethod
    def after_last_message(cls, **duration: float) -> ReentryRule:
        """No new entry until `duration` has passed since the journey's last message to them."""
        return cls(kind="after_last_message", cooldown_seconds=timedelta(**duration).total_seconds())

    @classmethod
    def after_last_entry(cls, **duration: float) -> ReentryRule:
        """At most one entry per `duration`."""
        return cls(kind="after_last_entry", cooldown_seconds=timedelta(**duration).total_seconds())


class ReentryCheck(BaseModel):
    customer_id: str
    journey: str
    rule: ReentryRule
    now: datetime = Field(description="The journey's clock.")
    time_scale: float = 1.0


class ReentryDecision(BaseModel):
    allowed: bool
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    """A validated call, normalised for storage: ids resolved, clock corrected, nothing dropped."""

    source: str
    message_id: str
    type: EventType
    name: str | None
    user_id: str | None
    anonymous_id: str | None
    email: str | None
    previous_id: str | None
    timestamp: datetime
    original_timestamp: datetime | None
    sent_at: datetime | None
    received_at: datetime
    properties: dict[str, Any] | None
    traits: dict[str, Any] | None
    context: dict[str, Any]
    payload: dict[str, Any]
    derived: dict[str, Any] = field(default_factory=dict)

    @property
    def identity_keys(self) -> list[str]:
        """Identifiers this event may create, read or move; locked before it is stored."""
        keys = []
        if self.user_id is not None:
            keys.append("user_id:" + self.user_id)
        if self.anonymous_id is not None:
            keys.append("anonymous_id:" + self.anonymous_id)
        if self.email is not None:
            keys.append("email:" + self.email)
        if self.previous_id is not None:
            keys.append("user_id:" + self.previous_id)
            keys.append("anonymous_id:" + self.previous_id)
        return keys


def normalize_email(value: Any) -> str | None:
    """Return the address lower-cased and trimmed, or None when `value` is not an address."""
    if not isinstance(value, str):
        return None
    address = value.strip().lower()
    if "@" not in address or len(address) > 320:
        return None
    return address


Locale = Literal["en", "id"]
Channel = Literal["email", "whatsapp", "sms", "webhook"]


class Profile(BaseModel):
    """What a journey and its templates may know about a customer."""

    customer_id: str
    email: str | None
    first_name: str | None
    locale: Locale
    phone: str | None = Field(None, description="`traits.phone` in E.164; None when missing or not a valid number.")
    timezone: str
    traits: dict[str, Any] = Field(default_factory=dict)


# The reason of a message skipped because every product it lists was carted or bought.
PRODUCTS_CARTED_OR_BOUGHT = "listed products carted or bought"


class SendRequest(BaseModel):
    """One message a journey step wants sent."""

    idempotency_key: str = Field(description="Built from the workflow id and the step; sent once at most.")
    customer_id: str
    journey: str
    workflow_id: str
    step: str
    template: str
    channel: Channel = "email"
    topic: str | None = Field(None, description="Consent topic, such as `promotions`; None for the channel as a whole.")
    transactional: bool = Field(
        False, description="Order confirmations and the like: sent even to unsubscribed customers, outside the policy."
    )
    priority: int = Field(5, ge=0, le=10, description="Higher goes first when messages compete for the caps.")
    droppable: bool = Field(False, description="Drop instead of defer when the caps or quiet hours say not now.")
    deadline: datetime | None = Field(None, description="Drop instead of defer past this moment.")
    time_scale: float = Field(1.0, gt=0, description="The journey's time scale; cap windows are divided by it.")
    data: dict[str, Any] = Field(default_factory=dict, description="Template variables from the journey.")
    step_at: datetime = Field(description="The journey's clock when the step ran.")
    goal_events: list[str] = Field(
        default_factory=list,
        description="Track events that cancel the message if one was stored with a timestamp at or after `goal_since`.",
    )
    goal_since: datetime | None = None
    skip_if_events: list[str] = Field(
        default_factory=list,
        description="Track events that skip this one message (not the journey) if stored at or after `goal_since`.",
    )
    skip_if_products: list[str] = Field(
        default_factory=list,
        description=(
            "Product ids that skip this message once `Product Added` or `Order Completed` events stored at"
            " or after `goal_since` name all of them; an order that names no product counts as naming them all."
        ),
    )


SendStatus = Literal["sent", "skipped", "suppressed", "dropped", "deferred", "failed", "unknown", "goal_reached"]


class SendResult(BaseModel):
    status: SendStatus
    reason: str | None = None
    deferred_until: datetime | None = Field(None, description="With `deferred`: when the policy lets it go.")
    message_id: int | None = Field(None, description="Row id in the message log.")
    provider_message_id: str | None = None


class CatalogProduct(BaseModel):
    product_id: str
    name: str
    brand: str | None = None
    category: str | None = None
    price: float | None = None
    currency: str | None = None
    image_url: str | None = None
    url: str | None = None
    stock: int | None = None


class CartedOrBoughtRequest(BaseModel):
    customer_id: str
    since: datetime


class CartedOrBought(BaseModel):
    """The products a customer added to the cart or ordered since some moment."""

    product_ids: list[str] = Field(default_factory=list)
    order_without_products: bool = Field(
        False, description="An order named no readable product, so it may have included any of them."
    )

    def covers(self, product_ids: list[str]) -> bool:
        """True when every one of `product_ids` was carted or bought, as far as the events tell."""
        return self.order_without_products or set(product_ids) <= set(self.product_ids)


class SimilarProductsRequest(BaseModel):
    customer_id: str
    categories: list[str]
    exclude_product_ids: list[str] = Field(default_factory=list)
    limit: int = Field(3, ge=1, le=20)


class CustomerActivity(BaseModel):
    """When a customer last did anything, for journeys that wait for silence."""

    customer_id: str
    last_seen_at: datetime | None
    suppressed: str | None = Field(None, description="Why marketing email may not reach them, if it may not.")


class LocalTimeRequest(BaseModel):
    """A wall-clock time in the customer's time zone, to turn into an instant."""

    customer_id: str
    day: date
    clock: time
