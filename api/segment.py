"""Request bodies of Segment's HTTP tracking API, validated with pydantic.

Field names follow the Segment spec (`userId`, `messageId`, `sentAt`), so existing Segment
libraries can post to Bisik unchanged. Unknown top-level fields are kept and stored with the
event, as Segment keeps them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictStr,
    StringConstraints,
    model_validator,
)
from pydantic_core import PydanticCustomError

from bisik.models import IncomingEvent, normalize_email

MAX_ID_LENGTH = 512
# The furthest an event's timestamp may lie after its arrival, for client clocks a little ahead.
# Beyond it, journeys would wait for a moment that has not come.
FUTURE_TOLERANCE = timedelta(hours=1)
MAX_NAME_LENGTH = 512


def _assume_utc(value: datetime | None) -> datetime | None:
    """Read a timestamp without a zone as UTC, which is what Segment's libraries send."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _whole_number_as_text(value: Any) -> Any:
    """Read a whole-number id as its decimal text, so `42` and `"42"` name the same user.

    Segment's libraries accept numeric ids and send them as strings.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


Identifier = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=MAX_ID_LENGTH),
    BeforeValidator(_whole_number_as_text),
]
Name = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
Timestamp = Annotated[datetime, AfterValidator(_assume_utc)]


class SegmentCall(BaseModel):
    """Fields every Segment call shares."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    user_id: Identifier | None = Field(None, alias="userId")
    anonymous_id: Identifier | None = Field(None, alias="anonymousId")
    message_id: Identifier | None = Field(None, alias="messageId")
    timestamp: Timestamp | None = None
    sent_at: Timestamp | None = Field(None, alias="sentAt")
    context: dict[str, Any] = Field(default_factory=dict)
    integrations: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _require_an_identity(self) -> SegmentCall:
        if self.user_id is None and self.anonymous_id is None:
            raise PydanticCustomError(
                "missing_identity", "userId or anonymousId is required; send at least one of them"
            )
        return self


class TrackCall(SegmentCall):
    type: Literal["track"] = "track"
    event: Name
    properties: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_consent_properties(self) -> TrackCall:
        """`Consent Updated` changes what Bisik may send, so its properties must be exact."""
        if self.event != "Consent Updated":
            return self
        channel = self.properties.get("channel")
        if channel not in ("email", "whatsapp", "sms"):
            raise PydanticCustomError(
                "invalid_consent", "properties.channel must be email, whatsapp or sms, got {channel}", {"channel": repr(channel)}
            )
        if not isinstance(self.properties.get("granted"), bool):
            raise PydanticCustomError("invalid_consent", "properties.granted must be true or false")
        topic = self.properties.get("topic")
        if topic is not None and not (isinstance(topic, str) and 0 < len(topic) <= 100):
            raise PydanticCustomError("invalid_consent", "properties.topic must be a string of 1 to 100 characters")
        return self


class IdentifyCall(SegmentCall):
    type: Literal["identify"] = "identify"
    traits: dict[str, Any] = Field(default_factory=dict)


class PageCall(SegmentCall):
    type: Literal["page"] = "page"
    name: Name | None = None
    category: Name | None = None
    properties: dict[str, Any] = Field(default_factory=dict)


class ScreenCall(SegmentCall):
    type: Literal["screen"] = "screen"
    name: Name | None = None
    category: Name | None = None
    properties: dict[str, Any] = Field(default_factory=dict)


class GroupCall(SegmentCall):
    type: Literal["group"] = "group"
    group_id: Identifier = Field(alias="groupId")
    traits: dict[str, Any] = Field(default_factory=dict)


class AliasCall(SegmentCall):
    type: Literal["alias"] = "alias"
    user_id: Identifier = Field(alias="userId")
    previous_id: Identifier = Field(alias="previousId")


AnyCall = Annotated[
    TrackCall | IdentifyCall | PageCall | ScreenCall | GroupCall | AliasCall,
    Discriminator("type"),
]


class BatchRequest(BaseModel):
    """Body of `POST /v1/batch`: calls of any type, with batch-wide `sentAt` and `context`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    batch: list[AnyCall] = Field(min_length=1)
    sent_at: Timestamp | None = Field(None, alias="sentAt")
    context: dict[str, Any] = Field(default_factory=dict)
    integrations: dict[str, Any] = Field(default_factory=dict)


CALL_MODELS: dict[str, type[SegmentCall]] = {
    "track": TrackCall,
    "identify": IdentifyCall,
    "page": PageCall,
    "screen": ScreenCall,
    "group": GroupCall,
    "alias": AliasCall,
}


def corrected_timestamp(
    timestamp: datetime | None, sent_at: datetime | None, received_at: datetime
) -> datetime:
    """Shift the client's timestamp by the client clock's error, as Segment does.

    The client stamped the event at `timestamp` and the request at `sent_at`, both on its own
    clock; the difference is how long ago the event happened, which we subtract from our
    `received_at`. Without `sent_at` the client's timestamp is taken as it is. A result more than
    `FUTURE_TOLERANCE` after `received_at` cannot have happened yet, so `received_at` replaces it.
    """
    if timestamp is None:
        return received_at
    corrected = timestamp if sent_at is None else received_at - (sent_at - timestamp)
    if corrected > received_at + FUTURE_TOLERANCE:
        return received_at
    return corrected


def to_incoming_event(
    call: SegmentCall,
    *,
    source: str,
    received_at: datetime,
    batch_sent_at: datetime | None = None,
    batch_context: dict[str, Any] | None = None,
) -> IncomingEvent:
    payload = call.model_dump(mode="json", by_alias=True, exclude_none=True)
    message_id = call.message_id or str(uuid.uuid4())
    payload["messageId"] = message_id

    context = {**(batch_context or {}), **call.context}
    sent_at = call.sent_at or batch_sent_at
    traits: dict[str, Any] | None = getattr(call, "traits", None)
    properties: dict[str, Any] | None = getattr(call, "properties", None)

    email = None
    if isinstance(call, IdentifyCall):
        email = normalize_email(call.traits.get("email"))
    if email is None and isinstance(context.get("traits"), dict):
        email = normalize_email(context["traits"].get("email"))

    name: str | None = None
    if isinstance(call, TrackCall):
        name = call.event
    elif isinstance(call, (PageCall, ScreenCall)):
        name = call.name

    return IncomingEvent(
        source=source,
        message_id=message_id,
        type=call.type,  # type: ignore[attr-defined]
        name=name,
        user_id=call.user_id,
        anonymous_id=call.anonymous_id,
        email=email,
        previous_id=call.previous_id if isinstance(call, AliasCall) else None,
        timestamp=corrected_timestamp(call.timestamp, sent_at, received_at),
        original_timestamp=call.timestamp,
        sent_at=sent_at,
        received_at=received_at,
        properties=properties,
        traits=traits,
        context=context,
        payload=payload,
    )
