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
from datetime import date, datetime, time, timedelta
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from bisik.models import (
        EVENT_SIGNAL,
        CatalogProduct,
        CustomerActivity,
        JourneyEvent,
        JourneyInput,
        JourneyResult,
        JourneyRunRecord,
        LocalTimeRequest,
        Profile,
        ReentryCheck,
        ReentryDecision,
        ReentryRule,
        SendRequest,
        SendResult,
        SimilarProductsRequest,
    )
    from workflows.matching import On, matches_any

# How many recent event ids a journey remembers to drop redelivered events.
SEEN_EVENT_IDS_KEPT = 5000
# Events waiting in the inbox beyond this are dropped, oldest first, with a warning.
INBOX_LIMIT = 2000

LOCAL_ACTIVITY_TIMEOUT = timedelta(seconds=30)
PROFILE_TIMEOUT = timedelta(seconds=30)
# A message not sent within a day of its step is no longer the right message at the right time.
SEND_GIVE_UP_AFTER = timedelta(days=1)
SEND_RETRY_POLICY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
)


class GoalReached(Exception):
    """Raised inside a journey when a goal event happened; `play()` turns it into an exit."""

    def __init__(self, goal: str) -> None:
        super().__init__(f"goal reached: {goal}")
        self.goal = goal


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
    reentry: ClassVar[ReentryRule] = ReentryRule.always()
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
            if self._goal_event is not None and self._goal_event.timestamp < self.trigger.timestamp:
                # A goal that happened before this entry began belongs to an earlier visit.
                self._goal_event = None
            decision = await self._check_reentry()
            await self._record_run("active")
            if not decision.allowed:
                return await self._finish("exited", f"re-entry not allowed: {decision.reason}")
            workflow.logger.info("journey.entered", extra=self._log_fields())

        try:
            await self.steps()
        except GoalReached as goal:
            result = await self._finish("exited", str(goal))
        except JourneyExit as exit_:
            result = await self._finish("exited", exit_.reason)
        else:
            result = await self._finish("completed", "all steps done")
        self._reenter_with_unhandled_starts()
        return result

    # Looking up and sending

    async def profile(self) -> Profile:
        """Return the customer's current profile: email, first name, locale, time zone, traits."""
        return await workflow.execute_activity(
            "load_profile",
            self.customer_id,
            result_type=Profile,
            start_to_close_timeout=PROFILE_TIMEOUT,
        )

    async def similar_products(
        self, categories: list[str], *, exclude: list[str] | None = None, limit: int = 3
    ) -> list[CatalogProduct]:
        """Return catalog products in `categories` that are in stock and the customer has not bought."""
        request = SimilarProductsRequest(
            customer_id=self.customer_id,
            categories=[category for category in categories if category],
            exclude_product_ids=exclude or [],
            limit=limit,
        )
        if not request.categories:
            return []
        return await workflow.execute_activity(
            "find_similar_products",
            request,
            result_type=list[CatalogProduct],
            start_to_close_timeout=PROFILE_TIMEOUT,
        )

    async def activity_status(self) -> CustomerActivity:
        """Return when the customer was last seen and whether marketing email may reach them."""
        return await workflow.execute_activity(
            "load_activity", self.customer_id, result_type=CustomerActivity, start_to_close_timeout=PROFILE_TIMEOUT
        )

    async def at_local(self, day: date, clock: time) -> datetime:
        """Return when it is `clock` on `day` in the customer's time zone, as an instant.

        Resolved by an activity, so the answer is recorded in the history and a replay does not
        depend on the worker's time zone data.
        """
        return await workflow.execute_local_activity(
            "resolve_local_time",
            LocalTimeRequest(customer_id=self.customer_id, day=day, clock=clock),
            result_type=datetime,
            start_to_close_timeout=LOCAL_ACTIVITY_TIMEOUT,
        )

    async def sunset(self) -> None:
        """Mark the customer as gone: no journey sends them marketing from now on."""
        await workflow.execute_activity("mark_sunset", self.customer_id, start_to_close_timeout=PROFILE_TIMEOUT)

    async def send(
        self,
        template: str,
        *,
        step: str,
        data: dict[str, Any] | None = None,
        transactional: bool = False,
        once_per_customer: bool = False,
        channel: str = "email",
        topic: str | None = None,
        priority: int = 5,
        droppable: bool = False,
        deadline: datetime | None = None,
        exit_if_suppressed: bool = True,
        skip_if: tuple[str, ...] = (),
        skip_if_products: list[str] | None = None,
    ) -> SendResult:
        """Send `template` to the customer, at most once for this step of this entry.

        The idempotency key is the workflow id, the entry (its trigger event) and `step`; with
        `once_per_customer` it leaves out the entry, so the step is sent once across entries
        (one thank-you per order id, say). Marketing messages follow the contact policy: when
        frequency caps or quiet hours defer one, this waits until the moment the policy named
        and tries again (a goal meanwhile still ends the journey); `droppable` messages, and
        messages the policy would delay past `deadline`, are dropped instead. A goal already
        stored for the customer cancels a marketing message and ends the journey; a suppressed
        customer ends it too, unless `exit_if_suppressed` is False (a journey that reaches the
        customer on another channel, say), when the `suppressed` result is returned instead.
        `skip_if` names track events that skip only this message when one is already stored
        since the entry began, delivered to the journey or not. `skip_if_products` does the same
        for a cart add or order of one of the products named.
        """
        if step in self.completed_steps:
            return SendResult.model_validate(self.completed_steps[step])
        self._raise_if_goal_reached()

        info = workflow.info()
        scope = step if once_per_customer else f"{self.trigger_id}:{step}"
        while True:
            request = SendRequest(
                idempotency_key=f"{info.workflow_id}:{scope}",
                customer_id=self.customer_id,
                journey=self.name,
                workflow_id=info.workflow_id,
                step=step,
                template=template,
                channel=channel,  # type: ignore[arg-type]
                topic=topic,
                transactional=transactional,
                priority=priority,
                droppable=droppable,
                deadline=deadline,
                time_scale=self.input.time_scale,
                data=data or {},
                step_at=workflow.now(),
                goal_events=[] if transactional else self._goal_event_names(),
                goal_since=self.entered_at,
                skip_if_events=list(skip_if),
                skip_if_products=skip_if_products or [],
            )
            result = await self._send_once(request)
            if result.status != "deferred" or result.deferred_until is None:
                break
            workflow.logger.info(
                "journey.send_deferred",
                extra={**self._log_fields(), "step": step, "until": result.deferred_until.isoformat(), "reason": result.reason},
            )
            await self.sleep_until(result.deferred_until)

        self.completed_steps[step] = result.model_dump(mode="json")
        if result.status == "goal_reached":
            raise GoalReached((result.reason or "").removeprefix("goal reached: "))
        if result.status == "suppressed" and exit_if_suppressed:
            raise JourneyExit(f"suppressed: {result.reason}")
        return result

    async def _send_once(self, request: SendRequest) -> SendResult:
        try:
            return await workflow.execute_activity(
                "send_message",
                request,
                result_type=SendResult,
                start_to_close_timeout=timedelta(seconds=self.input.send_timeout_seconds),
                schedule_to_close_timeout=SEND_GIVE_UP_AFTER,
                retry_policy=SEND_RETRY_POLICY,
            )
        except ActivityError as error:
            workflow.logger.error(
                "journey.send_gave_up",
                extra={**self._log_fields(), "step": request.step, "error": str(error.cause)},
            )
            return SendResult(status="failed", reason=f"gave up: {error.cause}")

    @property
    def trigger_id(self) -> int:
        if self.trigger is None:
            raise RuntimeError("trigger_id is known only once play() has taken the start event")
        return self.trigger.id

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
            raise GoalReached(self._goal_event.name or self._goal_event.type)

    def _goal_event_names(self) -> list[str]:
        return [goal.name for goal in self.goals if goal.type == "track" and goal.name is not None]

    async def _check_reentry(self) -> ReentryDecision:
        if self.reentry.kind == "always":
            return ReentryDecision(allowed=True)
        check = ReentryCheck(
            customer_id=self.customer_id,
            journey=self.name,
            rule=self.reentry,
            now=workflow.now(),
            time_scale=self.input.time_scale,
        )
        return await workflow.execute_local_activity(
            "check_reentry", check, result_type=ReentryDecision, start_to_close_timeout=LOCAL_ACTIVITY_TIMEOUT
        )

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

    def _reenter_with_unhandled_starts(self) -> None:
        """Start a new entry from start events that arrived while this one was ending.

        Without this, a `Product Added` that reaches a cart journey as it exits on an order
        would be delivered to a run that is about to close, and no new entry would begin.
        """
        leftovers = [event for event in self._inbox if matches_any(event, self.starts_on)]
        if not leftovers or self.reentry.kind == "never":
            return
        workflow.logger.info(
            "journey.reentered", extra={**self._log_fields(), "start_event_id": leftovers[0].id}
        )
        workflow.continue_as_new(
            JourneyInput(
                customer_id=self.customer_id,
                journey=self.name,
                time_scale=self.input.time_scale,
                history_limit=self.input.history_limit,
                send_timeout_seconds=self.input.send_timeout_seconds,
                pending_events=leftovers,
                seen_event_ids=list(self._seen),
            )
        )

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
            at=workflow.now(),
        )
        await workflow.execute_local_activity(
            "record_journey_run", record, start_to_close_timeout=LOCAL_ACTIVITY_TIMEOUT
        )

    def _log_fields(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "journey": self.name,
            "workflow_id": workflow.info().workflow_id,
        }
