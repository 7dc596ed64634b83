"""`bisik demo`: replay real shop data through a fresh local stack and report what Bisik did.

Starts the same stack as `bisik dev` in its own folder (emptied first), replays the file at a
time scale that lets the 24-hour journeys finish, waits until every message due by then has
been handled, prints a report and stops, or keeps running with `--keep-running`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from rich.console import Console
from rich.table import Table

from bisik.logs import get_logger
from bisik.replay import ReplayStats, read_calls, replay
from bisik.settings import Settings
from workers.dev import DevStack
from workers.stack import PortInUseError

log = get_logger(__name__)

# Journeys whose every message falls within 24 hours of their last event; the demo waits for them.
DAY_LONG_JOURNEYS = ("abandoned_cart", "browse_abandonment")
# Journey time the frequency caps may add to those messages: a cart's second reminder waits up to
# two 16-hour cap windows behind a browse email and the first reminder.
CAP_DELAY = timedelta(hours=32)
# Real seconds allowed on top for the worker and relay to catch up.
SETTLE_SECONDS = 60.0


@dataclass
class DemoReport:
    file: str
    time_scale: float
    events_ingested: int
    events_by_name: dict[str, int]
    customers: int
    journeys: dict[str, dict[str, int]]
    exit_reasons: dict[str, dict[str, int]]
    messages: list[dict[str, Any]]
    failures: dict[str, int]
    replay_seconds: float
    replay_max_lag_seconds: float
    events_per_second: float
    demo_seconds: float
    settled: bool
    pending: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


async def build_report(
    database_url: str, file: Path, time_scale: float, stats: ReplayStats, demo_seconds: float, settled: bool
) -> DemoReport:
    connection = await asyncpg.connect(database_url)
    try:
        events = await connection.fetch(
            "SELECT COALESCE(name, type) AS name, count(*) AS count FROM events GROUP BY 1 ORDER BY 1"
        )
        customers = await connection.fetchval("SELECT count(*) FROM customers WHERE merged_into IS NULL")
        runs = await connection.fetch(
            "SELECT journey, status, count(*) AS count FROM journey_runs GROUP BY 1, 2 ORDER BY 1, 2"
        )
        reasons = await connection.fetch(
            """
            SELECT journey, split_part(reason, ':', 1) AS reason, count(*) AS count
            FROM journey_runs WHERE status = 'exited' GROUP BY 1, 2 ORDER BY 1, 2
            """
        )
        messages = await connection.fetch(
            """
            SELECT template, COALESCE(locale, '-') AS locale, status,
                   COALESCE(split_part(reason, ':', 1), '') AS reason, count(*) AS count
            FROM messages GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            """
        )
        failed_messages = await connection.fetchval(
            "SELECT count(*) FROM messages WHERE status IN ('failed', 'unknown')"
        )
        stuck_outbox = await connection.fetchval("SELECT count(*) FROM outbox")
        retried_outbox = await connection.fetchval("SELECT count(*) FROM outbox WHERE attempts > 0")
        active = await connection.fetch(
            "SELECT journey, count(*) AS count FROM journey_runs WHERE status = 'active' GROUP BY 1"
        )
    finally:
        await connection.close()

    journeys: dict[str, dict[str, int]] = {}
    for row in runs:
        journeys.setdefault(row["journey"], {"started": 0})
        journeys[row["journey"]][row["status"]] = row["count"]
        journeys[row["journey"]]["started"] += row["count"]
    exit_reasons: dict[str, dict[str, int]] = {}
    for row in reasons:
        exit_reasons.setdefault(row["journey"], {})[row["reason"]] = row["count"]

    return DemoReport(
        file=str(file),
        time_scale=time_scale,
        events_ingested=sum(row["count"] for row in events),
        events_by_name={row["name"]: row["count"] for row in events},
        customers=customers,
        journeys=journeys,
        exit_reasons=exit_reasons,
        messages=[dict(row) for row in messages],
        failures={
            "messages_failed_or_unknown": failed_messages,
            "events_waiting_in_outbox": stuck_outbox,
            "events_retried_in_outbox": retried_outbox,
        },
        replay_seconds=round(stats.seconds, 1),
        replay_max_lag_seconds=round(stats.max_lag_seconds, 1),
        events_per_second=round(stats.calls_per_second, 1),
        demo_seconds=round(demo_seconds, 1),
        settled=settled,
        pending={row["journey"]: row["count"] for row in active},
    )


def print_report(report: DemoReport, console: Console) -> None:
    console.rule("[bold]Bisik demo report")
    console.print(
        f"Replayed [bold]{report.file}[/] at time scale {report.time_scale:g} "
        f"({report.events_ingested} events from {report.customers} customers, "
        f"{report.events_per_second:g} events/s over {report.replay_seconds:g} s, "
        f"at most {report.replay_max_lag_seconds:g} s behind schedule; demo took {report.demo_seconds:g} s)"
    )

    events = Table("event", "count", title="Events ingested")
    for name, count in report.events_by_name.items():
        events.add_row(name, str(count))
    console.print(events)

    journeys = Table("journey", "started", "completed", "exited", "still active", "exit reasons", title="Journeys")
    for journey, counts in report.journeys.items():
        reasons = ", ".join(f"{reason}: {count}" for reason, count in report.exit_reasons.get(journey, {}).items())
        journeys.add_row(
            journey,
            str(counts.get("started", 0)),
            str(counts.get("completed", 0)),
            str(counts.get("exited", 0)),
            str(counts.get("active", 0)),
            reasons,
        )
    console.print(journeys)

    messages = Table("template", "locale", "status", "reason", "count", title="Messages")
    for row in report.messages:
        messages.add_row(row["template"], row["locale"], row["status"], row["reason"], str(row["count"]))
    console.print(messages)

    failures = Table("failure", "count", title="Failures")
    for name, count in report.failures.items():
        failures.add_row(name.replace("_", " "), str(count))
    console.print(failures)
    if not report.settled:
        console.print("[yellow]Some messages or events were still in flight when the report was taken.")


class Demo:
    def __init__(
        self,
        settings: Settings,
        file: Path,
        *,
        keep_running: bool = False,
        report_json: Path | None = None,
        locales: str = "mixed",
        console: Console | None = None,
    ) -> None:
        self.settings = settings.model_copy(update={"home": settings.home / "demo"})
        self.file = file
        self.keep_running = keep_running
        self.report_json = report_json
        self.locales = locales
        self.console = console or Console()

    async def run(self, stop: asyncio.Event) -> int:
        began = time.perf_counter()
        calls = read_calls(self.file, locales=self.locales)
        shutil.rmtree(self.settings.home, ignore_errors=True)
        stack = DevStack(
            self.settings,
            extra_environment={
                "BISIK_TIME_SCALE": repr(self.settings.time_scale),
                # The progress bar and the report are the demo's output; the servers speak up only when something is wrong.
                "BISIK_LOG_LEVEL": "warning",
            },
        )
        try:
            stack.check_ports()
        except PortInUseError as error:
            log.error("demo.port_in_use", port=error.port, setting=error.setting, error=str(error))
            return 1
        try:
            database_url = await stack.start()
            await self._wait_for_api(stack.api_url)
            log.info("demo.replay_started", file=str(self.file), calls=len(calls), time_scale=self.settings.time_scale)
            start = datetime.now(UTC)
            stats = await replay(
                calls,
                api_url=stack.api_url,
                write_key=self.settings.write_keys[0].get_secret_value(),
                time_scale=self.settings.time_scale,
                start=start,
            )
            last_stamp = stats.last_stamp or start
            due_by = last_stamp + timedelta(hours=24) / self.settings.time_scale
            settle_within = CAP_DELAY.total_seconds() / self.settings.time_scale + SETTLE_SECONDS
            settled = await self._wait_until_settled(database_url, due_by, settle_within, stop)
            report = await build_report(
                database_url, self.file, self.settings.time_scale, stats, time.perf_counter() - began, settled
            )
            print_report(report, self.console)
            if self.report_json is not None:
                self.report_json.write_text(report.to_json())
            if self.keep_running and not stop.is_set():
                log.info(
                    "demo.keep_running",
                    temporal_ui=f"http://{self.settings.temporal_host}:{self.settings.temporal_ui_port}",
                    mail_dir=str(stack.mail.directory),
                    api=stack.api_url,
                    hint="press Ctrl-C to stop everything",
                )
                return await stack.supervise(stop)
            return 0
        finally:
            await stack.stop()

    async def _wait_for_api(self, api_url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    if (await client.get(api_url + "/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the API at {api_url} did not become healthy within {timeout:g} s")
                await asyncio.sleep(0.2)

    async def _wait_until_settled(
        self, database_url: str, due_by: datetime, settle_within: float, stop: asyncio.Event
    ) -> bool:
        """Wait past `due_by`, then up to `settle_within` seconds until no event awaits routing,
        no message is on its way and no day-long journey is open."""
        remaining = (due_by - datetime.now(UTC)).total_seconds()
        log.info("demo.waiting_for_journeys", seconds=round(max(remaining, 0)))
        if remaining > 0:
            try:
                await asyncio.wait_for(stop.wait(), timeout=remaining)
                return False
            except TimeoutError:
                pass
        deadline = time.monotonic() + settle_within
        connection = await asyncpg.connect(database_url)
        try:
            while not stop.is_set():
                unsettled = await connection.fetchval(
                    """
                    SELECT (SELECT count(*) FROM outbox)
                         + (SELECT count(*) FROM messages WHERE status IN ('claimed', 'reserved', 'sending', 'deferred'))
                         + (SELECT count(*) FROM journey_runs WHERE status = 'active' AND journey = ANY($1::text[]))
                    """,
                    list(DAY_LONG_JOURNEYS),
                )
                if unsettled == 0:
                    return True
                if time.monotonic() > deadline:
                    log.warning("demo.not_settled", still_in_flight=unsettled, waited_seconds=round(settle_within))
                    return False
                await asyncio.sleep(0.5)
        finally:
            await connection.close()
        return False
