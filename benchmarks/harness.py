"""The stack a benchmark runs against, and the instruments that watch it.

`start_stack` starts embedded PostgreSQL, the Temporal dev server (headless, on an SQLite file,
as `bisik dev` runs it), an SMTP sink and `bisik api` in a temporary folder, on free loopback
ports. The worker is prepared there but started later by `start_worker`. The exit stack given to
`start_stack` stops everything in reverse order, also when the run is cancelled.

CPU accounting reads /proc, so it works on Linux only; elsewhere the CPU figures are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx

from activities.db import migrate
from bisik.logs import get_logger
from workers.relay import RELAY_LOCK_KEY
from workers.stack import EmbeddedPostgres, MailSink, TemporalDevServer, free_port, terminate

log = get_logger("benchmarks.harness")

WRITE_KEY = "benchmark-write-key"
# "other" is every process outside the stack and the benchmark. A busy neighbour skews a run.
COMPONENTS = ("api", "worker", "temporal", "postgres", "benchmark", "other")


class BenchmarkError(RuntimeError):
    """A component failed, returned an unexpected response, or a phase did not finish in time."""


# Child processes


class ChildService:
    """`python -m bisik.cli <command>` in a session of its own.

    Ctrl-C in a terminal then reaches only the benchmark, which stops the services in order
    instead of having them all stop at once.
    """

    def __init__(self, command: str, environment: dict[str, str], cwd: Path) -> None:
        self.command = command
        self.environment = environment
        self.cwd = cwd
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchmarkError(f"the {self.command} process has not been started")
        return self.process.pid

    @property
    def started(self) -> bool:
        return self.process is not None

    def check_running(self) -> None:
        if self.process is not None and self.process.returncode is not None:
            raise BenchmarkError(
                f"the {self.command} process exited with code {self.process.returncode}. "
                "Its log lines are above."
            )

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bisik.cli",
            self.command,
            env=self.environment,
            cwd=self.cwd,
            start_new_session=True,
        )

    async def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        if await terminate(self.process, timeout):
            log.warning("benchmark.process_killed", process=self.command, after_seconds=timeout)


def service_environment(
    database_url: str,
    temporal_address: str,
    api_port: int,
    smtp_port: int,
    home: Path,
    arguments: argparse.Namespace,
) -> dict[str, str]:
    """Return the environment of the API and worker: this shell's without its BISIK_ variables,
    then the benchmark's settings, then the `--setting` overrides."""
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("BISIK_")
    }
    environment.update(
        {
            "BISIK_ENVIRONMENT": "development",
            "BISIK_HOME": str(home),
            "BISIK_DATABASE_URL": database_url,
            "BISIK_TEMPORAL_ADDRESS": temporal_address,
            "BISIK_TEMPORAL_TASK_QUEUE": "benchmark-" + uuid.uuid4().hex[:12],
            "BISIK_API_HOST": "127.0.0.1",
            "BISIK_API_PORT": str(api_port),
            "BISIK_WRITE_KEYS": WRITE_KEY,
            "BISIK_LOG_LEVEL": "warning",
            "BISIK_LOG_FORMAT": "console",
            "BISIK_RELAY_CONCURRENCY": str(arguments.concurrency),
            "BISIK_SMTP_HOST": "127.0.0.1",
            "BISIK_SMTP_PORT": str(smtp_port),
            # Quiet hours would defer sends by the clock, so results would depend on the hour.
            "BISIK_QUIET_HOURS": "off",
        }
    )
    environment.update(arguments.settings)
    return environment


# CPU accounting from /proc


CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    """Return the fields of /proc/<pid>/stat after the command name, or None if unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in brackets and may contain spaces, so split after its closing bracket.
    return stat[stat.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    """Return the CPU seconds `pid` used in all its threads, or 0 once the process is gone.

    `with_children` adds the time of exited children that the process has waited for.
    """
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    user, system, children_user, children_system = (int(value) for value in fields[11:15])
    ticks = user + system
    if with_children:
        ticks += children_user + children_system
    return ticks / CLOCK_TICKS_PER_SECOND


def busy_cpu_seconds() -> float:
    """Return the CPU seconds all processes of the machine used since boot, from /proc/stat."""
    try:
        first_line = Path("/proc/stat").read_text().splitlines()[0]
    except (OSError, IndexError):
        return 0.0
    # The fields are user, nice, system, idle, iowait, irq, softirq and more, in clock ticks.
    user, nice, system, _idle, _iowait, irq, softirq = (
        int(value) for value in first_line.split()[1:8]
    )
    return (user + nice + system + irq + softirq) / CLOCK_TICKS_PER_SECOND


def child_pids(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == parent:
            children.append(int(entry.name))
    return children


def find_child(parent: int, command_name: str) -> int | None:
    """Return the pid of a child of `parent` whose command name is `command_name`, or None."""
    for pid in child_pids(parent):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == command_name:
                return pid
    return None


class CpuMeter:
    """CPU seconds used so far by each component of the stack, read from /proc."""

    def __init__(self) -> None:
        self.available = Path("/proc/self/stat").exists()
        self.pids: dict[str, int] = {}

    def snapshot(self) -> dict[str, float]:
        seconds = dict.fromkeys(COMPONENTS, 0.0)
        seconds["benchmark"] = process_cpu_seconds(os.getpid())
        for name, pid in self.pids.items():
            if name == "postgres":
                # A backend that exits moves its time into the postmaster's children time.
                seconds[name] = process_cpu_seconds(pid, with_children=True) + sum(
                    process_cpu_seconds(child) for child in child_pids(pid)
                )
            else:
                seconds[name] = process_cpu_seconds(pid)
        seconds["other"] = busy_cpu_seconds() - sum(seconds.values())
        return seconds

    def percent(
        self, before: dict[str, float], after: dict[str, float], wall_seconds: float
    ) -> dict[str, float]:
        """Return each component's CPU use as a percentage of one core: 200 is two busy cores."""
        if not self.available or wall_seconds <= 0:
            return {}
        # Clamped at 0, because "other" subtracts readings of several files taken moments apart.
        return {
            name: max(0, round((after[name] - before[name]) / wall_seconds * 100))
            for name in before
        }


# PostgreSQL activity


class BackendSampler:
    """Sampler of pg_stat_activity, every 50 ms while a phase runs.

    It counts the client backends running a statement and those among them waiting for a
    heavyweight lock (row, transaction, advisory), and averages both over the samples.
    """

    QUERY = """
        SELECT count(*) FILTER (WHERE state = 'active') AS active,
               count(*) FILTER (WHERE state = 'active' AND wait_event_type = 'Lock') AS waiting
        FROM pg_stat_activity
        WHERE backend_type = 'client backend' AND NOT (pid = ANY($1::int[]))
    """

    def __init__(self, connection: asyncpg.Connection, excluded_pids: list[int]) -> None:
        self.connection = connection
        self.excluded_pids = excluded_pids
        self.samples: list[tuple[int, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BackendSampler:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *_exception: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        return {
            "postgres_active_backends_mean": round(
                statistics.fmean(active for active, _waiting in self.samples), 1
            ),
            "postgres_lock_waits_mean": round(
                statistics.fmean(waiting for _active, waiting in self.samples), 1
            ),
        }

    async def _sample(self) -> None:
        while True:
            row = await self.connection.fetchrow(self.QUERY, self.excluded_pids)
            self.samples.append((row["active"], row["waiting"]))
            await asyncio.sleep(0.05)


# Waiting


async def run_together(
    runners: Sequence[Callable[[], Awaitable[None]]], *, description: str
) -> None:
    """Run the coroutine functions at once. The first failure cancels the others and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            for runner in runners:
                group.create_task(runner())
    except ExceptionGroup as failures:
        first: BaseException = failures
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        if isinstance(first, BenchmarkError):
            raise first from None
        raise BenchmarkError(f"{description} failed: {first!r}") from first


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float,
    description: str,
    services: Sequence[ChildService] = (),
    interval: float = 0.05,
) -> float:
    """Poll `check` until it returns True and return the time.perf_counter() at which it did.

    Raises BenchmarkError when `timeout` seconds pass first or one of `services` exits.
    """
    deadline = time.perf_counter() + timeout
    while True:
        for service in services:
            service.check_running()
        if await check():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise BenchmarkError(f"timed out after {timeout:.0f} s waiting for {description}")
        await asyncio.sleep(interval)


# The stack


@dataclass
class Stack:
    """The running components and the connections the benchmark watches them through."""

    temporal_address: str
    api_url: str
    api: ChildService
    worker: ChildService
    # One connection polls tables while the other samples pg_stat_activity.
    database: asyncpg.Connection
    monitor: asyncpg.Connection
    cpu: CpuMeter
    # Runs in a thread of the benchmark process, so its CPU counts as the benchmark's.
    mail: MailSink

    @property
    def services(self) -> list[ChildService]:
        return [service for service in (self.api, self.worker) if service.started]

    def sample_backends(self) -> BackendSampler:
        excluded = [self.database.get_server_pid(), self.monitor.get_server_pid()]
        return BackendSampler(self.monitor, excluded)


async def start_stack(
    exit_stack: contextlib.AsyncExitStack, arguments: argparse.Namespace
) -> Stack:
    """Start PostgreSQL, Temporal, the SMTP sink and the API. The worker is created but not
    started."""
    temporary = Path(
        exit_stack.enter_context(tempfile.TemporaryDirectory(prefix="bisik-benchmark-"))
    )
    cpu = CpuMeter()

    postgres = EmbeddedPostgres(temporary / "postgres", delete_on_stop=True)
    exit_stack.push_async_callback(asyncio.to_thread, postgres.stop)
    database_url = await asyncio.to_thread(postgres.start)
    # The first line of postmaster.pid is the postmaster's pid.
    cpu.pids["postgres"] = int((postgres.data_dir / "postmaster.pid").read_text().split()[0])
    await migrate(database_url)

    temporal = TemporalDevServer(
        port=free_port(), ui_port=None, db_file=temporary / "temporal.sqlite"
    )
    exit_stack.push_async_callback(temporal.stop)
    await temporal.start()
    temporal_pid = find_child(os.getpid(), "temporal")
    if temporal_pid is not None:
        cpu.pids["temporal"] = temporal_pid

    # Journeys that send email deliver it here, kept in memory and counted.
    mail = MailSink("127.0.0.1", free_port())
    exit_stack.callback(mail.stop)
    mail.start()

    api_port = free_port()
    environment = service_environment(
        database_url, temporal.address, api_port, mail.port, temporary / "home", arguments
    )
    # Run in the temporary folder, so that the settings read no `.env` file of the checkout.
    api = ChildService("api", environment, temporary)
    worker = ChildService("worker", environment, temporary)
    # Registered before either starts, so an interrupt during a start still stops it.
    exit_stack.push_async_callback(api.stop)
    exit_stack.push_async_callback(worker.stop)
    await api.start()
    cpu.pids["api"] = api.pid
    api_url = f"http://127.0.0.1:{api_port}"
    await wait_for_api(api, api_url)

    database = await asyncpg.connect(database_url)
    exit_stack.push_async_callback(database.close)
    monitor = await asyncpg.connect(database_url)
    exit_stack.push_async_callback(monitor.close)
    return Stack(temporal.address, api_url, api, worker, database, monitor, cpu, mail)


async def wait_for_api(api: ChildService, api_url: str) -> None:
    async with httpx.AsyncClient(base_url=api_url, timeout=2) as client:

        async def api_is_healthy() -> bool:
            try:
                return (await client.get("/health")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(
            api_is_healthy, timeout=60, description="the API's /health", services=[api]
        )


async def start_worker(stack: Stack, timeout: float) -> None:
    """Start `bisik worker` and wait until its relay holds the lock that makes it the active one."""
    await stack.worker.start()
    stack.cpu.pids["worker"] = stack.worker.pid

    async def relay_is_active() -> bool:
        # pg_locks shows a bigint advisory key as classid (high 32 bits) and objid (low 32 bits).
        return await stack.database.fetchval(
            """
            SELECT EXISTS (
                SELECT 1 FROM pg_locks
                WHERE locktype = 'advisory' AND granted
                  AND classid::bigint = $1 AND objid::bigint = $2
            )
            """,
            RELAY_LOCK_KEY >> 32,
            RELAY_LOCK_KEY & 0xFFFF_FFFF,
        )

    await wait_until(
        relay_is_active,
        timeout=timeout,
        description="the worker's outbox relay to start",
        services=[stack.worker],
    )


async def wait_for_worker_idle(
    stack: Stack, timeout: float, threshold_percent: float = 5.0
) -> tuple[float, dict[str, float]]:
    """Wait for a one-second window in which the worker uses under `threshold_percent` of a core.

    Returns the time.perf_counter() and the CPU snapshot at the start of that window, which is
    within about a second after the worker handled its last workflow task. Without /proc it
    returns at once.
    """
    deadline = time.perf_counter() + timeout
    while True:
        stack.worker.check_running()
        window_start = time.perf_counter()
        before = stack.cpu.snapshot()
        if not stack.cpu.available:
            return window_start, before
        await asyncio.sleep(1.0)
        used_percent = (stack.cpu.snapshot()["worker"] - before["worker"]) * 100
        if used_percent < threshold_percent:
            return window_start, before
        if time.perf_counter() > deadline:
            raise BenchmarkError(
                f"the worker was still busy ({used_percent:.0f}% of a core) after {timeout:.0f} s"
            )
