"""Welcome series: greets a new contact and follows how they engage in their first week."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from bisik.models import JourneyInput, JourneyResult
    from workflows.matching import EventView, identify, page, track
    from workflows.toolkit import Journey


def _subscribes(event: EventView) -> bool:
    """An identify that signs the contact up: `subscribed` or `newsletter` set to true."""
    traits = event.traits or {}
    return traits.get("subscribed") is True or traits.get("newsletter") is True


# Signs that a new contact is warming up: a site visit, a click in one of our emails, an order.
ENGAGEMENT = (page(), track("Email Link Clicked"), track("Order Completed"))


class WelcomeState(BaseModel):
    engagement_count: int = 0
    first_engaged_at: datetime | None = None


@workflow.defn(name="welcome")
class Welcome(Journey[WelcomeState]):
    name = "welcome"
    starts_on = (track("Signed Up"), identify(where=_subscribes))
    listens_to = ENGAGEMENT
    State = WelcomeState

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        return await self.play()

    async def steps(self) -> None:
        first_week_ends = self.after(self.entered_at, days=7)
        while (event := await self.wait_for(*ENGAGEMENT, until=first_week_ends)) is not None:
            self.state.engagement_count += 1
            self.state.first_engaged_at = self.state.first_engaged_at or event.timestamp
