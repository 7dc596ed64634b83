"""Journeys that exist only to exercise the toolkit in tests."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from bisik.models import JourneyInput, JourneyResult
    from workflows.matching import track
    from workflows.toolkit import Journey

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
