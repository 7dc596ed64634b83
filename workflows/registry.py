"""Every journey Bisik runs, and the index that tells which journeys an event concerns."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from bisik.settings import Settings
from workflows.matching import EventView, On
from workflows.abandoned_cart import AbandonedCart
from workflows.browse_abandonment import BrowseAbandonment
from workflows.content_engagement import ContentEngagement
from workflows import high_intent
from workflows.high_intent import HighIntent
from workflows.post_purchase import PostPurchase
from workflows.re_engagement import ReEngagement
from workflows.toolkit import Journey
from workflows.welcome import Welcome

JOURNEYS: tuple[type[Journey], ...] = (
    Welcome,
    HighIntent,
    ContentEngagement,
    BrowseAbandonment,
    AbandonedCart,
    PostPurchase,
    ReEngagement,
)


def configure_journeys(settings: Settings) -> None:
    """Apply settings that decide which events journeys start on; call once per process at start."""
    high_intent.configure(settings.high_intent_pages)


@dataclass(frozen=True)
class Route:
    """One journey an event goes to; `starts` when the event may start a new run."""

    journey: type[Journey]
    starts: bool


class RoutingIndex:
    """Maps an event to the journeys that want it, by (type, name) lookup instead of a scan.

    Built once per process. An event that no journey starts on, listens to or has as a goal gets
    no routes, and so costs no outbox row and no Temporal call.
    """

    def __init__(self, journeys: tuple[type[Journey], ...] = JOURNEYS) -> None:
        names = [journey.name for journey in journeys]
        duplicates = {name for name in names if names.count(name) > 1}
        if duplicates:
            raise ValueError(f"journey names must be unique; repeated: {sorted(duplicates)}")
        self.journeys = {journey.name: journey for journey in journeys}
        self._entries: dict[tuple[str, str | None], list[tuple[type[Journey], On, bool]]] = (
            defaultdict(list)
        )
        for journey in journeys:
            for matcher in journey.starts_on:
                self._entries[matcher.index_key].append((journey, matcher, True))
            for matcher in (*journey.listens_to, *journey.goals):
                self._entries[matcher.index_key].append((journey, matcher, False))

    def routes(self, event: EventView) -> list[Route]:
        candidates = self._entries.get((event.type, event.name), [])
        if event.name is not None:
            candidates = candidates + self._entries.get((event.type, None), [])
        starts_by_journey: dict[str, bool] = {}
        journey_by_name: dict[str, type[Journey]] = {}
        for journey, matcher, starts in candidates:
            if not matcher.matches(event):
                continue
            journey_by_name[journey.name] = journey
            starts_by_journey[journey.name] = starts_by_journey.get(journey.name, False) or starts
        return [Route(journey_by_name[name], starts) for name, starts in starts_by_journey.items()]

    def wants(self, event: EventView) -> bool:
        return bool(self.routes(event))
