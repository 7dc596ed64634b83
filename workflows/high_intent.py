"""High intent: a customer who keeps returning to the pricing or demo page hears how another
customer decided, then gets an offer of a free consultation.

Trigger: a `page` call for a high-intent page. BISIK_HIGH_INTENT_PAGES sets which pages count
(`/pricing`, `/demo` and pages named Pricing or Demo by default; see `configure`).
1. Counts high-intent page views in a sliding 7-day window of event timestamps. On the third
   view within 7 days, a testimonial email at once.
2. One day after the testimonial, an offer of a free consultation, booked by replying.
Exits on `Consultation Booked` or `Demo Requested` after the first view. Ends without sending
once 7 days pass after the last view without three views inside one window.
Re-entry: not within 30 days of this journey's last message. An entry that sent nothing does
not block the next one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from bisik.models import JourneyEvent, JourneyInput, JourneyResult, ReentryRule
    from workflows.matching import EventView, page, track
    from workflows.toolkit import Journey, JourneyExit

VIEWS_NEEDED = 3
WINDOW_DAYS = 7

# The same default as `Settings.high_intent_pages`, for processes that never call `configure`.
DEFAULT_HIGH_INTENT_PAGES = ("/pricing", "/demo", "Pricing", "Demo")


def normalize_path(path: str) -> str:
    """Return `path` without its query string, fragment and trailing slashes (`/` stays `/`)."""
    path = path.split("?", 1)[0].split("#", 1)[0].strip()
    return path.rstrip("/") or "/"


def page_path(properties: Mapping[str, Any]) -> str | None:
    """Return the page's path from Segment's `path` property, or else from its `url`."""
    path = properties.get("path")
    if isinstance(path, str) and path.strip():
        return path
    url = properties.get("url")
    if isinstance(url, str) and url.strip():
        return urlsplit(url.strip()).path or "/"
    return None


@dataclass(frozen=True)
class HighIntentPages:
    """Page paths (entries starting with "/") and lower-cased page names that count as high intent."""

    paths: frozenset[str]
    names: frozenset[str]

    @classmethod
    def parse(cls, pages: Iterable[str]) -> HighIntentPages:
        paths: set[str] = set()
        names: set[str] = set()
        for entry in pages:
            entry = entry.strip()
            if not entry:
                continue
            if "://" in entry:
                raise ValueError(
                    f"invalid BISIK_HIGH_INTENT_PAGES entry {entry!r}: "
                    "expected a path such as /pricing or a page name, not a URL"
                )
            if entry.startswith("/"):
                paths.add(normalize_path(entry))
            else:
                names.add(entry.casefold())
        return cls(frozenset(paths), frozenset(names))

    def includes(self, event: EventView) -> bool:
        name = event.name
        if name is not None and name.strip().casefold() in self.names:
            return True
        path = page_path(event.properties or {})
        return path is not None and normalize_path(path) in self.paths


_configured_pages = HighIntentPages.parse(DEFAULT_HIGH_INTENT_PAGES)


def configure(pages: Iterable[str]) -> None:
    """Set the pages that count as high intent, for this process's routing (BISIK_HIGH_INTENT_PAGES).

    An entry starting with "/" is a path. It matches `properties.path` (or the path of
    `properties.url`) exactly, ignoring a query string, a fragment and a trailing slash, and
    case-sensitively, so `/pricing` matches `/pricing/` and `/pricing?plan=pro` but not
    `/pricing/enterprise` or `/Pricing`. Any other entry is a page name and matches the call's
    `name` case-insensitively. An empty list turns the journey off. Raises ValueError for a URL.
    """
    global _configured_pages
    _configured_pages = HighIntentPages.parse(pages)


def _routed_as_high_intent(event: EventView) -> bool:
    # The configuration decides only what the router sends here. Inside the workflow every page
    # event was chosen by it already, and checking again would break determinism, because a
    # worker restarted with other pages would replay the history differently. The workflow
    # sandbox also imports this module afresh, so `configure()` never reaches the copy it uses.
    if workflow.in_workflow():
        return True
    return _configured_pages.includes(event)


HIGH_INTENT_PAGE = page(where=_routed_as_high_intent)
CONSULTATION_BOOKED = track("Consultation Booked")
DEMO_REQUESTED = track("Demo Requested")


class HighIntentState(BaseModel):
    views: list[datetime] = Field(
        default_factory=list, description="Timestamps of the views still inside the window, oldest first."
    )
    qualified_at: datetime | None = Field(None, description="The journey's clock when the third view was counted.")


@workflow.defn(name="high_intent")
class HighIntent(Journey[HighIntentState]):
    name = "high_intent"
    # Later views reach the running entry through the same start matcher, so nothing else is followed.
    starts_on = (HIGH_INTENT_PAGE,)
    goals = (CONSULTATION_BOOKED, DEMO_REQUESTED)
    reentry = ReentryRule.after_last_message(days=30)
    State = HighIntentState

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        return await self.play()

    async def steps(self) -> None:
        qualified_at = self.state.qualified_at or await self._wait_for_third_view()

        await self.send("high_intent_testimonial", step="testimonial")

        await self.sleep_until(self.after(qualified_at, days=1))
        await self.send("high_intent_consultation", step="consultation")

    async def _wait_for_third_view(self) -> datetime:
        """Count views until three fall within 7 days, and return the moment the third was counted.

        Raises JourneyExit once every counted view is 7 days old without three in one window.
        """
        if not self.state.views:
            self._count(self.trigger)
        while not self._enough_views_in_one_window():
            self._drop_views_at_or_before(workflow.now() - self.delay(days=WINDOW_DAYS))
            if not self.state.views:
                raise JourneyExit(f"fewer than {VIEWS_NEEDED} views within {WINDOW_DAYS} days")
            oldest_expires_at = self.after(self.state.views[0], days=WINDOW_DAYS)
            view = await self.wait_for(HIGH_INTENT_PAGE, until=oldest_expires_at)
            self._count(view)
        self.state.qualified_at = workflow.now()
        return self.state.qualified_at

    def _count(self, view: JourneyEvent | None) -> None:
        if view is not None:
            self.state.views = sorted([*self.state.views, view.timestamp])

    def _drop_views_at_or_before(self, moment: datetime) -> None:
        self.state.views = [viewed_at for viewed_at in self.state.views if viewed_at > moment]

    def _enough_views_in_one_window(self) -> bool:
        views = self.state.views
        window = self.delay(days=WINDOW_DAYS)
        return any(
            views[last] - views[last - VIEWS_NEEDED + 1] < window
            for last in range(VIEWS_NEEDED - 1, len(views))
        )
