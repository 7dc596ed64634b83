"""Journeys that exist only to exercise the toolkit in tests."""

from __future__ import annotations

from datetime import date, datetime, time

from pydantic import BaseModel
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from bisik.models import JourneyInput, JourneyResult
    from workflows.matching import track
    from workflows.toolkit import Journey, NoState

PING = track("Probe Ping")


class ProbeState(BaseModel):
    pings: int = 0
    ping_ids: list[int] = []
    last_ping_at: datetime | None = None
    quiet_at: datetime | None = None


@workflow.defn(name="probe")
class Probe(Journey[ProbeState]):
    """Counts pings until an hour passes without one; a `Probe Goal` ends it early."""

    name = "probe"
    starts_on = (track("Probe Started"),)
    listens_to = (PING,)
    goals = (track("Probe Goal"),)
    State = ProbeState

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        return await self.play()

    async def steps(self) -> None:
        self.state.last_ping_at = self.state.last_ping_at or self.entered_at
        while True:
            ping = await self.wait_for(PING, until=self.after(self.state.last_ping_at, hours=1))
            if ping is None:
                break
            self.state.pings += 1
            self.state.ping_ids.append(ping.id)
            self.state.last_ping_at = max(self.state.last_ping_at, ping.timestamp)
        self.state.quiet_at = workflow.now()


@workflow.defn(name="consent_probe")
class ConsentProbe(Journey[NoState]):
    """Email on day 0 and day 3, then the cart on WhatsApp on day 5: one customer, two channels.

    Neither later step ends the journey when its channel is suppressed, so a customer who left
    email can still get the WhatsApp message they consented to.
    """

    name = "consent_probe"
    starts_on = (track("Consent Probe Started"),)

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        return await self.play()

    async def steps(self) -> None:
        await self.send("welcome_1", step="email_day_0")

        await self.sleep_until(self.after(self.entered_at, days=3))
        await self.send("welcome_tips", step="email_day_3", exit_if_suppressed=False)

        await self.sleep_until(self.after(self.entered_at, days=5))
        cart = self.trigger.properties["cart"] if self.trigger else {}
        await self.send(
            "cart_reminder_1", step="whatsapp_day_5", channel="whatsapp", data={"cart": cart}, exit_if_suppressed=False
        )


@workflow.defn(name="channel_probe")
class ChannelProbe(Journey[NoState]):
    """Sends one message at once: the template, channel and data named by the start event."""

    name = "channel_probe"
    starts_on = (track("Channel Probe Started"),)

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        return await self.play()

    async def steps(self) -> None:
        wanted = self.trigger.properties if self.trigger else {}
        await self.send(
            wanted["template"],
            step="message",
            channel=wanted["channel"],
            data=wanted.get("data", {}),
            exit_if_suppressed=False,
        )


class LocalProbeState(BaseModel):
    planned_for: datetime | None = None
    woke_at: datetime | None = None


@workflow.defn(name="local_probe")
class LocalProbe(Journey[LocalProbeState]):
    """Sleeps until a wall-clock time in the customer's zone, given as `day` and `clock` properties."""

    name = "local_probe"
    starts_on = (track("Local Probe Started"),)
    State = LocalProbeState

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        return await self.play()

    async def steps(self) -> None:
        assert self.trigger is not None
        properties = self.trigger.properties
        if self.state.planned_for is None:
            self.state.planned_for = await self.at_local(
                date.fromisoformat(properties["day"]), time.fromisoformat(properties["clock"])
            )
        await self.sleep_until(self.state.planned_for)
        self.state.woke_at = workflow.now()
