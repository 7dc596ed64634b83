"""Event matchers: how a journey says which events start it, which it listens to, and its goals.

Matchers are plain data plus an optional predicate, evaluated by the API at ingest (to decide
whether an event needs routing at all), by the relay (to pick the journeys), and inside the
workflow (to pick events from the inbox). Predicates must therefore be pure functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


class EventView(Protocol):
    """The fields of an event that matchers read; both stored and incoming events have them."""

    @property
    def type(self) -> str: ...

    @property
    def name(self) -> str | None: ...

    @property
    def properties(self) -> Mapping[str, Any] | None: ...

    @property
    def traits(self) -> Mapping[str, Any] | None: ...

    @property
    def derived(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class On:
    """Matches events of one type, optionally one name, optionally passing a predicate."""

    type: str
    name: str | None = None
    where: Callable[[EventView], bool] | None = None

    def matches(self, event: EventView) -> bool:
        if event.type != self.type:
            return False
        if self.name is not None and event.name != self.name:
            return False
        return self.where is None or self.where(event)

    @property
    def index_key(self) -> tuple[str, str | None]:
        return (self.type, self.name)


def track(name: str | None = None, *, where: Callable[[EventView], bool] | None = None) -> On:
    """Match `track` calls named `name`, or every `track` call when `name` is None."""
    return On("track", name, where)


def identify(*, where: Callable[[EventView], bool] | None = None) -> On:
    return On("identify", None, where)


def page(name: str | None = None, *, where: Callable[[EventView], bool] | None = None) -> On:
    return On("page", name, where)


def matches_any(event: EventView, matchers: tuple[On, ...]) -> bool:
    return any(matcher.matches(event) for matcher in matchers)
