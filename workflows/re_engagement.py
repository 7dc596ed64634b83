"""Re-engagement: win back a customer who has gone quiet, and stop marketing to one who stays away.

Trigger: `Order Completed` or `Signed Up`, so every customer who bought or signed up has one
watcher. A start event for a customer whose watcher is running only reaches that run.
1. Watch: sleep until 90 days after the customer was last seen, then look again. If they came
   back meanwhile, sleep until 90 days after that. "Last seen" is `customers.last_seen_at`, which
   every event stored for the customer raises, `Email Opened` and `Email Link Clicked` included.
2. After 90 quiet days, a "we miss you" email with an offer code.
3. Fourteen days after the offer: if the customer was seen since, no last call and the watch
   starts again from step 1 (a later lapse gets a new offer with a new code).
4. Otherwise a last call, and the customer is marked sunset: a suppression on every channel, so
   no journey sends them marketing again. Transactional email (order thank-yous) still goes out.
Exits when a send is suppressed (the customer unsubscribed, bounced or was sunset meanwhile),
or when the offer or last call was not sent (no email address, a failed send): a customer we
could not reach is not sunset.
Re-entry: always. A sunset customer who buys again gets a new watcher, whose offer is recorded
as suppressed and ends it. Nothing reaches them while the sunset suppression exists.

The watcher listens to no events: site activity is read from `last_seen_at` when a timer fires,
so page views cost no Temporal signal.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from bisik.models import JourneyInput, JourneyResult, SendResult
    from workflows.matching import track
    from workflows.toolkit import Journey, JourneyExit

ORDER_COMPLETED = track("Order Completed")
SIGNED_UP = track("Signed Up")

# The discount the offer email promises. The shop must accept `COMEBACK-` codes at checkout.
OFFER_DISCOUNT_PERCENT = 15
OFFER_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


class ReEngagementState(BaseModel):
    """The current quiet spell. A customer who comes back after the offer starts the next one."""

    # Counts quiet spells from 1. Step names carry it, so each spell sends its own offer.
    lapse: int = 1
    offer_code: str | None = None
    offer_sent_at: datetime | None = None
    last_seen_before_offer: datetime | None = None


@workflow.defn(name="re_engagement")
class ReEngagement(Journey[ReEngagementState]):
    name = "re_engagement"
    starts_on = (ORDER_COMPLETED, SIGNED_UP)
    State = ReEngagementState

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        return await self.play()

    async def steps(self) -> None:
        while True:
            await self._wait_until_away(days=90)

            offer_sent_at = await self._send_offer()

            if await self._seen_since_offer(offer_sent_at, days=14):
                self._watch_next_lapse()
                continue

            await self._send_last_call()
            await self.sunset()
            return

    async def _wait_until_away(self, *, days: float) -> None:
        """Sleep until the customer has not been seen for `days`.

        Returns at once when this lapse's offer already went out, so `steps()` can run again from
        the top after continue-as-new.
        """
        if self.state.offer_sent_at is not None:
            return
        while True:
            last_seen = await self._last_seen_at()
            away_at = self.after(last_seen, days=days)
            if workflow.now() >= away_at:
                self.state.last_seen_before_offer = last_seen
                return
            await self._sleep_until(away_at)

    async def _send_offer(self) -> datetime:
        """Send this lapse's offer with a new code, and return when it was sent."""
        if self.state.offer_code is None:
            # workflow.random() is seeded by Temporal, so a replay draws the same code.
            suffix = "".join(workflow.random().choice(OFFER_CODE_ALPHABET) for _ in range(6))
            self.state.offer_code = f"COMEBACK-{suffix}"
        offer = await self.send(
            "re_engagement_offer", step=self._step("offer"), data=self._offer_data()
        )
        self._exit_unless_delivered(offer, "offer")
        if self.state.offer_sent_at is None:
            self.state.offer_sent_at = workflow.now()
        return self.state.offer_sent_at

    async def _send_last_call(self) -> None:
        last_call = await self.send(
            "re_engagement_last_call", step=self._step("last_call"), data=self._offer_data()
        )
        self._exit_unless_delivered(last_call, "last call")

    async def _seen_since_offer(self, offer_sent_at: datetime, *, days: float) -> bool:
        """Sleep until `days` after the offer, then return whether the customer came back."""
        await self._sleep_until(self.after(offer_sent_at, days=days))
        quiet_since = self.state.last_seen_before_offer or self.entered_at
        return await self._last_seen_at() > quiet_since

    def _watch_next_lapse(self) -> None:
        self.state = ReEngagementState(lapse=self.state.lapse + 1)

    async def _sleep_until(self, moment: datetime) -> None:
        """Sleep until `moment`, taking the start events that reach the running watcher meanwhile.

        Such an event only shows that the customer was active, which `last_seen_at` already records.
        Taking it keeps the inbox, and the input carried through continue-as-new, small. It also
        keeps an old order from starting a new entry when this one ends.
        """
        while True:
            event = await self.wait_for(*self.starts_on, until=moment)
            if event is None:
                return

    async def _last_seen_at(self) -> datetime:
        status = await self.activity_status()
        if status.last_seen_at is None:
            return self.entered_at
        return max(status.last_seen_at, self.entered_at)

    @staticmethod
    def _exit_unless_delivered(result: SendResult, message: str) -> None:
        """Leave when a message did not go out, so no one is sunset who was never asked back."""
        if result.status not in ("sent", "unknown"):
            raise JourneyExit(f"{message} not sent: {result.status}: {result.reason}")

    def _step(self, name: str) -> str:
        return f"{name}:{self.state.lapse}"

    def _offer_data(self) -> dict[str, object]:
        return {"offer_code": self.state.offer_code, "discount_percent": OFFER_DISCOUNT_PERCENT}
