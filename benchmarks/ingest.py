"""Bisik's ingest and routing throughput on real components, beside bare signal-with-start.

Run from the repository root:

    .venv/bin/python benchmarks/ingest.py [--events N] [--concurrency N] [--json PATH]

The benchmark starts its own stack in a temporary folder (see harness.py) and measures, in order:

1. single calls: `POST /v1/track` from N concurrent httpx clients. An event counts once the API
   returns 200, which it does only after the PostgreSQL commit;
2. batches: `POST /v1/batch` with `--batch-size` track calls each, from N concurrent clients;
3. routing into Temporal, with `bisik worker` and its outbox relay running: identify calls of
   new users who subscribe (each a signal-with-start of a new welcome journey), then `Email Link
   Clicked` track calls for those users (each a signal to a running journey). The rate counts
   from the first accepted event until the outbox table is empty;
4. bare temporalio: `client.start_workflow(..., start_signal=...)` from this process with the
   same concurrency against the same dev server, on a task queue that no worker polls.

Phases 1 and 2 run before the worker starts, so the relay does not compete with the API for the
CPU. Whatever outbox rows they write are then deleted unrouted, so that phase 3 routes only its
own events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table
from temporalio.client import Client

import bisik
from bisik.logs import configure_logging
from harness import (
    COMPONENTS,
    WRITE_KEY,
    BenchmarkError,
    Stack,
    run_together,
    start_stack,
    start_worker,
    wait_for_worker_idle,
    wait_until,
)
from workers.stack import package_binary
from workflows.registry import RoutingIndex

# Wide enough for the results table when the output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 170)


# Options

# How much each phase sends: (option, default, help).
COUNT_OPTIONS = (
    ("--events", 5000, "track calls sent one per request"),
    ("--batch-events", 20000, "track calls sent in batches"),
    ("--batch-size", 100, "calls per POST /v1/batch, at most 500"),
    ("--journeys", 2000, "new users who subscribe, each starting a welcome journey"),
    ("--signals", 4000, "Email Link Clicked track calls for users in a running welcome journey"),
    ("--bare-calls", 2000, "bare temporalio signal-with-start calls"),
    ("--users", 1000, "distinct users the track calls of phases 1 and 2 are spread over"),
    (
        "--concurrency",
        32,
        "concurrent httpx clients, concurrent bare signal-with-start calls, and the relay's "
        "BISIK_RELAY_CONCURRENCY, whose own default is 32",
    ),
)


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure Bisik's ingest and routing throughput on a stack of its own.",
    )
    for option, default, help_text in COUNT_OPTIONS:
        parser.add_argument(
            option, type=int, default=default, help=help_text + " (default: %(default)s)"
        )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds a phase may take before the run fails (default: %(default)s)",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="BISIK_NAME=VALUE",
        help="a setting for the API and worker processes, repeatable, for example "
        "BISIK_WORKER_MAX_CACHED_WORKFLOWS=4000. The BISIK_ variables of this shell are "
        "not passed on.",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH")
    arguments = parser.parse_args(argv)

    for option, _default, _help_text in COUNT_OPTIONS:
        value = getattr(arguments, option.removeprefix("--").replace("-", "_"))
        if value < 1:
            parser.error(f"{option} must be at least 1, got {value}")
    if arguments.batch_size > 500:
        # 500 calls of about 250 bytes each stay well under the API's default 500 KB batch limit.
        parser.error(f"--batch-size must be at most 500, got {arguments.batch_size}")
    arguments.settings = parse_settings(parser, arguments.setting)
    return arguments


def parse_settings(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name.startswith("BISIK_"):
            parser.error(f"--setting must look like BISIK_NAME=VALUE, got {pair!r}")
        settings[name] = value
    return settings


# Results


@dataclass
class PhaseResult:
    """One measured phase: events over seconds, and the CPU each component used meanwhile."""

    name: str
    events: int
    requests: int | None
    seconds: float
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    # Events per second the worker handled, for the routing phases.
    worker_events_per_second: float | None = None
    # Percent of one core per component over the phase: 200 is two busy cores.
    cpu_percent: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def percentile_ms(samples: list[float], fraction: float) -> float | None:
    """Return the sample closest to the `fraction` percentile of `samples` (seconds), in ms."""
    if not samples:
        return None
    ordered = sorted(samples)
    index = min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))
    return round(ordered[index] * 1000, 1)


# Load generation


def track_call(message_prefix: str, index: int, user_id: str) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": user_id,
        "event": "Product Viewed",
        "messageId": f"{message_prefix}-{index}",
        "properties": {"product_id": f"sku-{index % 500}", "price": 129000, "currency": "IDR"},
        "context": {"library": {"name": "bisik-benchmark", "version": "1"}},
    }


def signup_call(message_prefix: str, index: int, user_id: str) -> dict[str, Any]:
    """Return an identify call of a new contact who subscribes, which starts the welcome journey."""
    return {
        "type": "identify",
        "userId": user_id,
        "messageId": f"{message_prefix}-{index}",
        "traits": {"email": f"{user_id}@example.com", "first_name": "Sari", "subscribed": True},
        "context": {"library": {"name": "bisik-benchmark", "version": "1"}},
    }


def click_call(message_prefix: str, index: int, user_id: str) -> dict[str, Any]:
    """Return a track call that the welcome journey listens to and no journey starts on."""
    return {
        "type": "track",
        "userId": user_id,
        "event": "Email Link Clicked",
        "messageId": f"{message_prefix}-{index}",
        "properties": {"url": "https://shop.example.com/new", "campaign": "welcome"},
        "context": {"library": {"name": "bisik-benchmark", "version": "1"}},
    }


def check_welcome_routes() -> None:
    """Raise BenchmarkError unless a signup starts only the welcome journey and a click
    reaches only that journey without starting it, as phase 3 assumes."""
    expected = {
        "signup": (signup_call("check", 0, "user"), [("welcome", True)]),
        "click": (click_call("check", 0, "user"), [("welcome", False)]),
    }
    routing = RoutingIndex()
    for kind, (call, wanted) in expected.items():
        event = SimpleNamespace(
            type=call["type"],
            name=call.get("event"),
            properties=call.get("properties"),
            traits=call.get("traits"),
        )
        routes = [(route.journey.name, route.starts) for route in routing.routes(event)]
        if routes != wanted:
            raise BenchmarkError(
                f"a {kind} call is routed to {routes}, but the benchmark expects {wanted}. "
                "Update the calls in benchmarks/ingest.py to the current journeys."
            )


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def single_bodies(calls: list[dict[str, Any]]) -> list[tuple[bytes, int]]:
    """Encode each call as a request body of its own, paired with its event count of 1."""
    return [(encode(call), 1) for call in calls]


def batch_bodies(calls: list[dict[str, Any]], batch_size: int) -> list[tuple[bytes, int]]:
    """Encode the calls as /v1/batch bodies of `batch_size` calls, paired with their counts."""
    bodies = []
    for start in range(0, len(calls), batch_size):
        batch = calls[start : start + batch_size]
        bodies.append((encode({"batch": batch}), len(batch)))
    return bodies


@dataclass
class SendResult:
    started: float
    first_accepted: float
    finished: float
    requests: int
    events: int
    latencies: list[float]


async def post_all(
    api_url: str, path: str, bodies: list[tuple[bytes, int]], concurrency: int
) -> SendResult:
    """POST every (body, event count) from `concurrency` httpx clients, one connection each.

    Raises BenchmarkError on any status but 200, or when the API stored fewer events than sent.
    """
    pending: Iterator[tuple[bytes, int]] = iter(bodies)
    latencies: list[float] = []
    accepted_at: list[float] = []
    stored = 0

    async def run_client() -> None:
        nonlocal stored
        async with httpx.AsyncClient(
            base_url=api_url,
            auth=httpx.BasicAuth(WRITE_KEY, ""),
            headers={"content-type": "application/json"},
            timeout=120,
        ) as client:
            for body, _count in pending:
                sent = time.perf_counter()
                response = await client.post(path, content=body)
                if response.status_code != 200:
                    raise BenchmarkError(
                        f"POST {path} returned {response.status_code}: {response.text[:500]}"
                    )
                now = time.perf_counter()
                latencies.append(now - sent)
                accepted_at.append(now)
                stored += response.json()["stored"]

    started = time.perf_counter()
    clients = min(concurrency, len(bodies))
    await run_together([run_client] * clients, description=f"POST {path}")
    events = sum(count for _body, count in bodies)
    if stored != events:
        raise BenchmarkError(f"POST {path}: sent {events} new events, the API stored {stored}")
    return SendResult(
        started, min(accepted_at), max(accepted_at), len(bodies), events, latencies
    )


async def warm_up(stack: Stack, run_id: str, concurrency: int) -> None:
    """Open connections and fill caches in the API process before anything is timed."""
    calls = [
        track_call(run_id + "-warm-up", index, f"warm-up-{index % concurrency}")
        for index in range(concurrency * 8)
    ]
    singles, batched = calls[: concurrency * 4], calls[concurrency * 4 :]
    await post_all(stack.api_url, "/v1/track", single_bodies(singles), concurrency)
    await post_all(stack.api_url, "/v1/batch", batch_bodies(batched, 10), concurrency)
    await stack.database.execute("DELETE FROM outbox")


# Phases 1 and 2: ingest


async def measure_ingest(
    stack: Stack, name: str, path: str, bodies: list[tuple[bytes, int]], concurrency: int
) -> PhaseResult:
    """Time from the first request sent to the last response received."""
    console.print(f"measuring {name}")
    before = stack.cpu.snapshot()
    async with stack.sample_backends() as backends:
        sent = await post_all(stack.api_url, path, bodies, concurrency)
    seconds = sent.finished - sent.started
    cpu_percent = stack.cpu.percent(before, stack.cpu.snapshot(), seconds)
    # No worker runs yet. Deleting the rows leaves phase 3 only its own events to route.
    deleted = await stack.database.execute("DELETE FROM outbox")
    return PhaseResult(
        name=name,
        events=sent.events,
        requests=sent.requests,
        seconds=seconds,
        latency_p50_ms=percentile_ms(sent.latencies, 0.50),
        latency_p99_ms=percentile_ms(sent.latencies, 0.99),
        cpu_percent=cpu_percent,
        details={"outbox_rows_written": int(deleted.split()[-1]), **backends.summary()},
    )


# Phase 3: routing


@dataclass
class RoutingRun:
    """A routing phase's result, with what the worker-side measurement needs after it."""

    result: PhaseResult
    sent: SendResult
    cpu_before: dict[str, float]

    def finish(self, stack: Stack, worker_done: float, cpu_at_done: dict[str, float]) -> None:
        """Record when the worker was done and the CPU use from the first request until then."""
        seconds = worker_done - self.sent.first_accepted
        self.result.worker_events_per_second = round(self.result.events / seconds, 1)
        self.result.details["worker_done_after_seconds"] = round(seconds, 3)
        self.result.details["cpu_percent_until_worker_done"] = stack.cpu.percent(
            self.cpu_before, cpu_at_done, worker_done - self.sent.started
        )


async def measure_routing(
    stack: Stack, name: str, bodies: list[tuple[bytes, int]], arguments: argparse.Namespace
) -> RoutingRun:
    """Send `bodies` to /v1/batch and time from the first accepted event to an empty outbox.

    Batches are accepted several times faster than the relay routes, so the time is the relay's.
    """
    console.print(f"measuring {name}")
    before = stack.cpu.snapshot()
    sending = asyncio.create_task(
        post_all(stack.api_url, "/v1/batch", bodies, arguments.concurrency)
    )
    max_outbox_rows = 0

    async def outbox_is_empty() -> bool:
        nonlocal max_outbox_rows
        row = await stack.database.fetchrow(
            "SELECT count(*) AS rows, max(last_error) AS error FROM outbox"
        )
        max_outbox_rows = max(max_outbox_rows, row["rows"])
        if row["error"] is not None:
            raise BenchmarkError(f"the relay failed to route an event: {row['error']}")
        if not sending.done():
            return False
        sending.result()
        return row["rows"] == 0

    try:
        async with stack.sample_backends() as backends:
            emptied = await wait_until(
                outbox_is_empty,
                timeout=arguments.timeout,
                description="the outbox to empty",
                services=stack.services,
                interval=0.02,
            )
    finally:
        if not sending.done():
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, BenchmarkError):
                await sending
    sent = sending.result()
    result = PhaseResult(
        name=name,
        events=sent.events,
        requests=None,
        seconds=emptied - sent.first_accepted,
        cpu_percent=stack.cpu.percent(before, stack.cpu.snapshot(), emptied - sent.started),
        details={
            "accepted_within_seconds": round(sent.finished - sent.started, 3),
            "max_outbox_rows": max_outbox_rows,
            **backends.summary(),
        },
    )
    return RoutingRun(result, sent, before)


async def measure_journey_starts(
    stack: Stack, run_id: str, arguments: argparse.Namespace
) -> tuple[PhaseResult, list[str]]:
    """Route signups of new users, then wait until each welcome journey has begun."""
    user_ids = [f"journey-{run_id}-{index}" for index in range(arguments.journeys)]
    calls = [
        signup_call(run_id + "-start", index, user_id) for index, user_id in enumerate(user_ids)
    ]
    routing = await measure_routing(
        stack, "routed: journey starts", batch_bodies(calls, arguments.batch_size), arguments
    )

    async def every_journey_began() -> bool:
        # The relay opens a run without a run id. The workflow's first task records the run id.
        began = await stack.database.fetchval(
            "SELECT count(*) FROM journey_runs WHERE journey = 'welcome' AND run_id IS NOT NULL"
        )
        return began >= arguments.journeys

    began = await wait_until(
        every_journey_began,
        timeout=arguments.timeout,
        description="every welcome journey to record its run id",
        services=stack.services,
    )
    routing.finish(stack, began, stack.cpu.snapshot())

    # Journeys may still be working after they began (sending a welcome email, say), and the
    # next phase should not share the worker with them.
    idle, _cpu_at_idle = await wait_for_worker_idle(stack, arguments.timeout)
    idle_after = idle - routing.sent.first_accepted
    routing.result.details["worker_idle_after_seconds"] = round(idle_after, 3)
    routing.result.details["emails_received"] = len(stack.mail.messages)
    return routing.result, user_ids


async def measure_journey_signals(
    stack: Stack, run_id: str, user_ids: list[str], arguments: argparse.Namespace
) -> PhaseResult:
    """Route clicks of users in the welcome journey, then wait until the worker is idle."""
    calls = [
        click_call(run_id + "-signal", index, user_ids[index % len(user_ids)])
        for index in range(arguments.signals)
    ]
    emails_before = len(stack.mail.messages)
    routing = await measure_routing(
        stack,
        "routed: signals to running journeys",
        batch_bodies(calls, arguments.batch_size),
        arguments,
    )
    idle, cpu_at_idle = await wait_for_worker_idle(stack, arguments.timeout)
    routing.finish(stack, idle, cpu_at_idle)
    routing.result.details["emails_received"] = len(stack.mail.messages) - emails_before
    return routing.result


async def check_events_delivered(
    stack: Stack, client: Client, user_ids: list[str], sample: int = 50
) -> int:
    """Query a sample of welcome journeys, each of which must have seen every event of its user.

    The users of phase 3 sent only their signup and their clicks, all of which the welcome
    journey wants. Returns how many journeys were checked. Raises BenchmarkError on a gap.
    """
    checked = 0
    for position in range(0, len(user_ids), max(1, len(user_ids) // sample)):
        row = await stack.database.fetchrow(
            """
            SELECT r.workflow_id, array_agg(e.id ORDER BY e.id) AS event_ids
            FROM identities i
            JOIN journey_runs r ON r.customer_id = i.customer_id AND r.journey = 'welcome'
            JOIN events e ON e.customer_id = i.customer_id
            WHERE i.kind = 'user_id' AND i.value = $1
            GROUP BY r.workflow_id
            """,
            user_ids[position],
        )
        if row is None:
            raise BenchmarkError(f"no welcome journey was recorded for user {user_ids[position]}")
        seen = await client.get_workflow_handle(row["workflow_id"]).query("seen_event_ids")
        missing = sorted(set(row["event_ids"]) - set(seen))
        if missing:
            raise BenchmarkError(f"journey {row['workflow_id']} did not see events {missing}")
        checked += 1
    return checked


# Phase 4: bare temporalio


async def measure_bare_signal_with_start(
    client: Client, stack: Stack, arguments: argparse.Namespace
) -> PhaseResult:
    """Signal-with-start a workflow type that no worker runs: the dev server's cost alone."""
    name = "bare temporalio signal-with-start"
    console.print(f"measuring {name}")
    task_queue = "benchmark-bare-" + uuid.uuid4().hex[:12]
    id_prefix = uuid.uuid4().hex[:12]
    pending = iter(range(arguments.bare_calls))
    latencies: list[float] = []

    async def signal_with_start(index: int) -> None:
        # About the size of the event the relay sends, without search attributes.
        event = {"id": index, "type": "track", "name": "Product Viewed", "properties": {"p": 1}}
        await client.start_workflow(
            "benchmark_noop",
            {"customer_id": f"bare-{index}"},
            id=f"bare:{id_prefix}:{index}",
            task_queue=task_queue,
            start_signal="event",
            start_signal_args=[event],
        )

    async def run_caller() -> None:
        for index in pending:
            sent = time.perf_counter()
            await signal_with_start(index)
            latencies.append(time.perf_counter() - sent)

    # Untimed calls with negative indexes first, so the connection is warm when timing starts.
    await asyncio.gather(*(signal_with_start(-1 - index) for index in range(arguments.concurrency)))
    before = stack.cpu.snapshot()
    started = time.perf_counter()
    await run_together([run_caller] * arguments.concurrency, description="signal-with-start")
    seconds = time.perf_counter() - started
    return PhaseResult(
        name=name,
        events=arguments.bare_calls,
        requests=arguments.bare_calls,
        seconds=seconds,
        latency_p50_ms=percentile_ms(latencies, 0.50),
        latency_p99_ms=percentile_ms(latencies, 0.99),
        cpu_percent=stack.cpu.percent(before, stack.cpu.snapshot(), seconds),
    )


# Report


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def bisik_commit() -> str | None:
    """Return `git describe --always --dirty` of the checkout Bisik is imported from, if any."""
    try:
        output = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(bisik.__file__).parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return output.stdout.strip()


async def machine_facts(stack: Stack, load_average: float | None) -> dict[str, Any]:
    temporal = await asyncio.create_subprocess_exec(
        package_binary("temporal"), "--version", stdout=asyncio.subprocess.PIPE
    )
    temporal_version, _ = await temporal.communicate()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average_1m_at_start": load_average,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgresql": await stack.database.fetchval("SHOW server_version"),
        "temporal_cli": temporal_version.decode().strip(),
        "temporalio": metadata.version("temporalio"),
        "bisik_commit": bisik_commit(),
    }


def format_number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(
    machine: dict[str, Any], options: dict[str, Any], results: list[PhaseResult]
) -> None:
    console.print()
    console.print(
        f"{machine['date']}, {machine['cpu_count']} CPUs ({machine['cpu_model']}), "
        f"1-minute load average {machine['load_average_1m_at_start']} at start"
    )
    console.print(
        f"Python {machine['python']}, PostgreSQL {machine['postgresql']}, "
        f"{machine['temporal_cli']}, temporalio {machine['temporalio']}, "
        f"Bisik {machine['bisik_commit'] or 'commit unknown'}"
    )
    console.print(
        f"concurrency {options['concurrency']}, batch size {options['batch_size']}, "
        f"settings {options['settings'] or 'defaults'}"
    )
    table = Table(title="Bisik ingest and routing throughput")
    for column in ("measurement", "events", "requests", "seconds", "events/s"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for column in ("worker events/s", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    table.add_column("CPU % " + "/".join(COMPONENTS), justify="right")
    for result in results:
        table.add_row(
            result.name,
            str(result.events),
            format_number(result.requests),
            f"{result.seconds:.2f}",
            f"{result.events_per_second:.0f}",
            format_number(result.worker_events_per_second),
            format_number(result.latency_p50_ms, 1),
            format_number(result.latency_p99_ms, 1),
            "/".join(str(result.cpu_percent.get(name, "-")) for name in COMPONENTS),
        )
    console.print(table)
    for result in results:
        if result.details:
            details = ", ".join(f"{key} {value}" for key, value in result.details.items())
            console.print(f"{result.name}: {details}")


def write_json(
    path: Path, machine: dict[str, Any], options: dict[str, Any], results: list[PhaseResult]
) -> None:
    document = {
        "machine": machine,
        "options": options,
        "results": [
            {**asdict(result), "events_per_second": round(result.events_per_second, 1)}
            for result in results
        ],
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {path}")


# The run


async def measure_ingest_phases(
    stack: Stack, run_id: str, arguments: argparse.Namespace
) -> list[PhaseResult]:
    users = [f"ingest-{run_id}-{index}" for index in range(arguments.users)]
    singles = [
        track_call(run_id + "-single", index, users[index % len(users)])
        for index in range(arguments.events)
    ]
    single = await measure_ingest(
        stack, "accepted: single calls", "/v1/track", single_bodies(singles), arguments.concurrency
    )

    batched = [
        track_call(run_id + "-batch", index, users[index % len(users)])
        for index in range(arguments.batch_events)
    ]
    batches = await measure_ingest(
        stack,
        "accepted: batches",
        "/v1/batch",
        batch_bodies(batched, arguments.batch_size),
        arguments.concurrency,
    )
    return [single, batches]


async def measure_temporal_phases(
    stack: Stack, run_id: str, arguments: argparse.Namespace
) -> list[PhaseResult]:
    console.print("starting the worker and its outbox relay")
    await start_worker(stack, arguments.timeout)
    starts, user_ids = await measure_journey_starts(stack, run_id, arguments)
    signals = await measure_journey_signals(stack, run_id, user_ids, arguments)

    client = await Client.connect(stack.temporal_address)
    checked = await check_events_delivered(stack, client, user_ids)
    console.print(f"checked {checked} welcome journeys, and each saw every event of its user")

    bare = await measure_bare_signal_with_start(client, stack, arguments)
    return [starts, signals, bare]


async def run_benchmark(arguments: argparse.Namespace) -> None:
    load_average = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    run_id = uuid.uuid4().hex[:8]
    check_welcome_routes()
    async with contextlib.AsyncExitStack() as exit_stack:
        console.print("starting PostgreSQL, Temporal and the API")
        stack = await start_stack(exit_stack, arguments)
        await warm_up(stack, run_id, arguments.concurrency)

        results = await measure_ingest_phases(stack, run_id, arguments)
        results += await measure_temporal_phases(stack, run_id, arguments)

        machine = await machine_facts(stack, load_average)
        options = {
            key: value for key, value in vars(arguments).items() if key not in ("json", "setting")
        }
        print_report(machine, options, results)
        if arguments.json is not None:
            write_json(arguments.json, machine, options, results)
        console.print("stopping the stack")


async def run_until_cancelled(arguments: argparse.Namespace) -> None:
    # SIGTERM cancels the run as Ctrl-C does, so the exit stack stops every process it started.
    main_task = asyncio.current_task()
    if main_task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    await run_benchmark(arguments)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    configure_logging("warning", "console")
    try:
        asyncio.run(run_until_cancelled(arguments))
    except BenchmarkError as error:
        console.print(f"[red]benchmark failed: {error}[/]")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[yellow]interrupted; every process the benchmark started was stopped[/]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
