"""Placeholder for the high_intent journey; it starts on no event until its steps are written."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from bisik.models import JourneyInput, JourneyResult
    from workflows.toolkit import Journey


@workflow.defn(name="high_intent")
class HighIntent(Journey):
    name = "high_intent"

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        return await self.play()

    async def steps(self) -> None:
        return None


def configure(pages: list[str]) -> None:
    """Set the page paths or names that count as high intent (from BISIK_HIGH_INTENT_PAGES)."""
