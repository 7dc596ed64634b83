"""Welcome series: greet a new subscriber, show them around, then offer a first-order discount.

Trigger: `Signed Up`, or an `identify` whose traits set `subscribed` or `newsletter` to true.
1. A welcome email at once.
2. Tips on day 3, or at once when the customer engages first: an `Email Link Clicked`, or a page
   view at least 30 minutes after signing up (pages of the sign-up visit itself do not count).
3. An offer of 10% off with a code drawn for this customer, four days after the tips: on day 7
   when the tips went out on day 3, earlier when engagement brought the tips forward.
   An `Order Completed` placed after signing up cancels the offer and ends the journey: at once
   when it comes after the tips, else right after the tips.
Exits: an order (no offer), or the customer unsubscribes (the next send is suppressed).
Re-entry: never. Sign-up events during the run change nothing.
Under the contact policy the welcome email has priority 7, above the default of 5, so a new
subscriber hears from us first. The frequency caps still space the emails: with the default
of one email per 16 hours, tips brought forward go out 16 hours after the welcome at the earliest.
The offer's four days count from when the tips actually went out.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from pydantic import BaseModel
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from bisik.models import JourneyEvent, JourneyInput, JourneyResult, ReentryRule
    from workflows.matching import EventView, identify, matches_any, page, track
    from workflows.toolkit import Journey, JourneyExit


def _subscribes(event: EventView) -> bool:
    """An identify that signs the contact up: `subscribed` or `newsletter` set to true."""
    traits = event.traits or {}
    return traits.get("subscribed") is True or traits.get("newsletter") is True


SIGNED_UP = (track("Signed Up"), identify(where=_subscribes))
# Listened to, not a goal, because an order skips only the offer and not the tips. The offer's
# send also skips itself for an order stored but not yet delivered to this run.
ORDER_COMPLETED = track("Order Completed")
# Signs that the new subscriber is warming up: they click in an email or come back to the site.
ENGAGEMENT = (page(), track("Email Link Clicked"))

# Page views in the first 30 minutes after signing up are taken as the sign-up visit, not a
# return. Google Analytics 4 ends a session after 30 minutes of inactivity by default.
SIGN_UP_VISIT_MINUTES = 30
TIPS_DAY = 3
OFFER_DAYS_AFTER_TIPS = 4
OFFER_PERCENT_OFF = 10
WELCOME_PRIORITY = 7
# Codes leave out 0, O, 1 and I, which readers confuse when they type them.
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


class WelcomeState(BaseModel):
    engaged_at: datetime | None = None
    ordered_at: datetime | None = None
    tips_sent_at: datetime | None = None
    offer_code: str | None = None


@workflow.defn(name="welcome")
class Welcome(Journey[WelcomeState]):
    name = "welcome"
    starts_on = SIGNED_UP
    listens_to = (*ENGAGEMENT, ORDER_COMPLETED)
    reentry = ReentryRule.never()
    State = WelcomeState

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        return await self.play()

    async def steps(self) -> None:
        await self.send("welcome_1", step="welcome", priority=WELCOME_PRIORITY)

        tips_due = self.after(self.entered_at, days=TIPS_DAY)
        await self._follow_until(tips_due, done=lambda: self.state.engaged_at is not None)
        await self.send("welcome_tips", step="tips")
        self.state.tips_sent_at = self.state.tips_sent_at or workflow.now()

        offer_due = self.after(self.state.tips_sent_at, days=OFFER_DAYS_AFTER_TIPS)
        await self._follow_until(offer_due, done=lambda: self.state.ordered_at is not None)
        if self.state.ordered_at is not None:
            raise JourneyExit("ordered since signing up, so no offer")
        await self.send("welcome_offer", step="offer", data={"offer": self._offer()}, skip_if=("Order Completed",))

    async def _follow_until(self, deadline: datetime, *, done: Callable[[], bool]) -> None:
        """Note the customer's events until `deadline`, or until `done()` is true."""
        # Repeated sign-ups are taken too, so they do not pile up in the inbox.
        followed = (*self.listens_to, *self.starts_on)
        while not done():
            event = await self.wait_for(*followed, until=deadline)
            if event is None:
                return
            self._note(event)

    def _note(self, event: JourneyEvent) -> None:
        if event.timestamp < self.entered_at:
            return  # it happened before they signed up
        if ORDER_COMPLETED.matches(event):
            self.state.ordered_at = self.state.ordered_at or event.timestamp
            return
        if not matches_any(event, ENGAGEMENT):
            return
        sign_up_visit_ends = self.after(self.entered_at, minutes=SIGN_UP_VISIT_MINUTES)
        if event.type == "page" and event.timestamp < sign_up_visit_ends:
            return
        self.state.engaged_at = self.state.engaged_at or event.timestamp

    def _offer(self) -> dict[str, object]:
        if self.state.offer_code is None:
            # workflow.random() is seeded by Temporal, so a replay draws the same code.
            suffix = "".join(workflow.random().choice(CODE_ALPHABET) for _ in range(6))
            self.state.offer_code = f"WELCOME-{suffix}"
        # NOTE: Bisik only draws the code, so the shop must accept WELCOME-* codes at checkout.
        return {"code": self.state.offer_code, "percent_off": OFFER_PERCENT_OFF}
