"""The journey toolkit: what every journey workflow shares, so a journey file holds only its steps.

A journey subclasses `Journey`, declares the events that start it, the events it listens to and
its goals, and writes its steps in `steps()`. Its `@workflow.run` method is two lines (the SDK
requires each workflow class to define its own):

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        return await self.play()

How the toolkit keeps a journey correct:

- Events arrive as signals, possibly before `run` begins (signal-with-start), so the inbox is
  created in `__init__` (`@workflow.init`). Event ids already seen are dropped.
- A goal event (a purchase, say) ends the journey at the next wait, judged by the event's own
  timestamp: a goal that happened before the journey began does not count.
- Delays are divided by the input's time scale, for demos and staging.
- Before the history grows large the run continues as new, carrying the journey's state, the
  steps already done and the events not yet handled. `steps()` then runs again from the top:
  steps already done return their recorded result at once, and waits are written against
  absolute times kept in the state, so nothing is repeated and no timer restarts.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timedelta
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from bisik.models import (
        EVENT_SIGNAL,
        JourneyEvent,
        JourneyInput,
        JourneyResult,
        JourneyRunRecord,
    )
    from workflows.matching import On, matches_any

# How many recent event ids a journey remembers to drop redelivered events.
SEEN_EVENT_IDS_KEPT = 5000
# Events waiting in the inbox beyond this are dropped, oldest first, with a warning.
INBOX_LIMIT = 2000

RECORD_RUN_TIMEOUT = timedelta(seconds=30)


class GoalReached(Exception):
    """Raised inside a journey when a goal event arrives; `play()` turns it into an exit."""

    def __init__(self, event: JourneyEvent) -> None:
        super().__init__(f"goal event {event.name or event.type} (event id {event.id})")
        self.event = event


class JourneyExit(Exception):
    """Raised by a journey's steps to leave early for a reason of its own."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoState(BaseModel):
    """State of a journey that keeps none."""


StateT = TypeVar("StateT", bound=BaseModel)


class Journey(Generic[StateT]):
    """Base class of every journey workflow."""

    name: ClassVar[str]
    starts_on: ClassVar[tuple[On, ...]] = ()
    listens_to: ClassVar[tuple[On, ...]] = ()
    goals: ClassVar[tuple[On, ...]] = ()
    State: ClassVar[type[BaseModel]] = NoState

    @workflow.init
    def __init__(self, input: JourneyInput) -> None:
        self.input = input
        self.customer_id = input.customer_id
        self.state: StateT = self.State.model_validate(input.state)  # type: ignore[assignment]
        self.trigger: JourneyEvent | None = input.trigger
        self.completed_steps: dict[str, Any] = dict(input.completed_steps)
        self._inbox: deque[JourneyEvent] = deque(input.pending_events)
        self._seen: dict[int, None] = dict.fromkeys(input.seen_event_ids)
        self._goal_event: JourneyEvent | None = None
        self._events_received = 0

    # Handlers

    @workflow.signal(name=EVENT_SIGNAL)
    def receive_event(self, event: JourneyEvent) -> None:
        if event.id in self._seen:
            workflow.logger.info(
                "journey.duplicate_event_dropped",
                extra={"event_id": event.id, "customer_id": self.customer_id},
            )
            return
        self._remember(event.id)
        self._events_received += 1

        if matches_any(event, self.goals):
            if self.trigger is None or event.timestamp >= self.trigger.timestamp:
                self._goal_event = self._goal_event or event
            return

        self._inbox.append(event)
        if len(self._inbox) > INBOX_LIMIT:
            dropped = self._inbox.popleft()
            workflow.logger.warning(
                "journey.inbox_full", extra={"dropped_event_id": dropped.id, "limit": INBOX_LIMIT}
            )

    @workflow.query
    def seen_event_ids(self) -> list[int]:
        return list(self._seen)

    @workflow.query
    def journey_state(self) -> dict[str, Any]:
        return self.state.model_dump(mode="json")

    @workflow.query
    def pending_event_ids(self) -> list[int]:
        return [event.id for event in self._inbox]

    # The run

    async def steps(self) -> None:
        raise NotImplementedError("a journey implements steps()")

    async def play(self) -> JourneyResult:
        """Take the trigger, run the steps, and record how the entry ended."""
        if self.trigger is None:
            self.trigger = self._take(self.starts_on)
            if self.trigger is None:
                # Only the relay starts journeys, always with a start event as the first signal.
                return JourneyResult(outcome="exited", reason="no start event", events_received=0)
            await self._record_run("active")
            workflow.logger.info("journey.entered", extra=self._log_fields())
            if self._goal_event is not None and self._goal_event.timestamp < self.trigger.timestamp:
                # A goal that happened before this entry began belongs to an earlier visit.
                self._goal_event = None

        try:
            await self.steps()
        except GoalReached as goal:
            return await self._finish("exited", f"goal: {goal.event.name or goal.event.type}")
        except JourneyExit as exit_:
            return await self._finish("exited", exit_.reason)
        return await self._finish("completed", "all steps done")

    @property
    def entered_at(self) -> datetime:
        """When the event that started this entry happened."""
        if self.trigger is None:
            raise RuntimeError("entered_at is known only once play() has taken the start event")
        return self.trigger.timestamp

    # Waiting

    def delay(self, **duration: float) -> timedelta:
        """Return the journey delay `timedelta(**duration)` divided by the time scale."""
        return timedelta(**duration) / self.input.time_scale

    def after(self, moment: datetime, **duration: float) -> datetime:
        """Return `moment` plus a scaled delay: the absolute time a step is due."""
        return moment + self.delay(**duration)

    async def wait_for(
        self, *matchers: On, until: datetime | None = None, timeout: timedelta | None = None
    ) -> JourneyEvent | None:
        """Return the next received event matching one of `matchers`, or None once the wait is over.

        `until` is an absolute deadline; `timeout` a delay from now, already scaled. Raises
        `GoalReached` as soon as a goal event arrives.
        """
        deadline = until
        if timeout is not None:
            deadline = workflow.now() + timeout
        while True:
            self._raise_if_goal_reached()
            event = self._take(matchers)
            if event is not None:
                return event
            remaining = None if deadline is None else deadline - workflow.now()
            if remaining is not None and remaining <= timedelta(0):
                return None
            self._continue_as_new_if_due()
            try:
                await workflow.wait_condition(
                    lambda: self._goal_event is not None or self._has(matchers),
                    timeout=remaining,
                )
            except TimeoutError:
                self._raise_if_goal_reached()
                return None

    async def sleep_until(self, moment: datetime) -> None:
        """Wait until `moment`; a goal event still ends the journey meanwhile."""
        await self.wait_for(until=moment)

    async def sleep(self, **duration: float) -> None:
        await self.wait_for(timeout=self.delay(**duration))

    def received(self, *matchers: On) -> list[JourneyEvent]:
        """Return the events waiting in the inbox that match, without taking them."""
        return [event for event in self._inbox if matches_any(event, matchers)]

    def take_all(self, *matchers: On) -> list[JourneyEvent]:
        """Take every waiting event that matches, in the order received."""
        taken = [event for event in self._inbox if matches_any(event, matchers)]
        self._inbox = deque(event for event in self._inbox if not matches_any(event, matchers))
        return taken

    # Internals

    def _take(self, matchers: tuple[On, ...]) -> JourneyEvent | None:
        for event in self._inbox:
            if matches_any(event, matchers):
                self._inbox.remove(event)
                return event
        return None

    def _has(self, matchers: tuple[On, ...]) -> bool:
        return any(matches_any(event, matchers) for event in self._inbox)

    def _remember(self, event_id: int) -> None:
        self._seen[event_id] = None
        if len(self._seen) > SEEN_EVENT_IDS_KEPT:
            del self._seen[next(iter(self._seen))]

    def _raise_if_goal_reached(self) -> None:
        if self._goal_event is not None:
            raise GoalReached(self._goal_event)

    def _continue_as_new_if_due(self) -> None:
        info = workflow.info()
        if not (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self.input.history_limit
        ):
            return
        workflow.logger.info(
            "journey.continued_as_new",
            extra={**self._log_fields(), "history_length": info.get_current_history_length()},
        )
        workflow.continue_as_new(self._next_input())

    def _next_input(self) -> JourneyInput:
        return self.input.model_copy(
            update={
                "trigger": self.trigger,
                "state": self.state.model_dump(mode="json"),
                "completed_steps": self.completed_steps,
                "pending_events": list(self._inbox),
                "seen_event_ids": list(self._seen),
            }
        )

    async def _finish(self, outcome: str, reason: str) -> JourneyResult:
        await self._record_run(outcome, reason)
        workflow.logger.info(
            "journey.completed" if outcome == "completed" else "journey.exited",
            extra={**self._log_fields(), "reason": reason},
        )
        return JourneyResult(
            outcome=outcome,  # type: ignore[arg-type]
            reason=reason,
            events_received=self._events_received,
        )

    async def _record_run(self, status: str, reason: str | None = None) -> None:
        info = workflow.info()
        record = JourneyRunRecord(
            customer_id=self.customer_id,
            journey=self.name,
            workflow_id=info.workflow_id,
            run_id=info.first_execution_run_id,
            status=status,  # type: ignore[arg-type]
            reason=reason,
        )
        await workflow.execute_local_activity(
            "record_journey_run", record, start_to_close_timeout=RECORD_RUN_TIMEOUT
        )

    def _log_fields(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "journey": self.name,
            "workflow_id": workflow.info().workflow_id,
        }
