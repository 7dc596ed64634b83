"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def assert_eventually(
    check: Callable[[], Awaitable[T]], *, timeout: float = 20.0, interval: float = 0.1
) -> T:
    """Retry the async `check` until it stops raising AssertionError; then re-raise its last error."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(interval)


async def store_call(pool, call: dict, *, source: str = "src_test", received_at=None):  # type: ignore[no-untyped-def]
    """Store one Segment call as the API would and return it as the journey event the relay sends.

    `received_at` defaults to the call's own timestamp, so journeys in time-skipping tests see
    events on the test server's clock.
    """
    from datetime import UTC, datetime

    from activities.ingest import EventStore
    from api.segment import CALL_MODELS, to_incoming_event
    from bisik.models import JourneyEvent

    model = CALL_MODELS[call.get("type", "track")]
    parsed = model.model_validate(call)
    received = received_at or parsed.timestamp or datetime.now(UTC)
    incoming = to_incoming_event(parsed, source=source, received_at=received)
    await EventStore(pool, lambda _event: False).store([incoming])
    row = await pool.fetchrow(
        "SELECT * FROM events WHERE source = $1 AND message_id = $2", source, incoming.message_id
    )
    return JourneyEvent.from_row(row)


def click_targets(html: str, secret_key: str) -> list[str]:
    """Return the URLs behind the tracked links of an email's HTML, in order."""
    import re

    from activities.tracking import read_click_token
    from bisik.links import LinkSigner

    signer = LinkSigner(secret_key)
    targets = []
    for token in re.findall(r'/t/c/([^"\s]+)"', html):
        click = read_click_token(signer, token)
        if click is not None:
            targets.append(click.url)
    return targets
