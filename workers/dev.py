"""`bisik dev`: the whole stack on one machine, started and supervised by one command.

Order of start: PostgreSQL, migrations, Temporal, the SMTP sink, the worker, the API. Ctrl-C (or
SIGTERM) stops them in the reverse order. The API and the worker run as child processes, the way
they run in production, and are restarted if they exit on their own.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sys
import time
from dataclasses import dataclass, field

from activities.db import migrate
from bisik.logs import get_logger
from bisik.settings import Settings
from workers.stack import (
    EmbeddedPostgres,
    MailSink,
    PortInUseError,
    TemporalDevServer,
    ensure_port_free,
    terminate,
    terminate_with_parent,
)

log = get_logger(__name__)

RESTART_LIMIT = 5
# Held while a stack runs on a home folder: two stacks on one folder would share PostgreSQL's
# data and Temporal's SQLite file.
LOCK_FILE = "dev.lock"
RESTART_WINDOW_SECONDS = 60.0


@dataclass
class ChildProcess:
    """A `bisik` subcommand run as a child process, restarted when it exits on its own."""

    name: str
    arguments: list[str]
    environment: dict[str, str]
    process: asyncio.subprocess.Process | None = None
    restarts: list[float] = field(default_factory=list)

    async def start(self) -> None:
        # A session of its own: a terminal's Ctrl-C or hang-up reaches only `bisik dev`, which
        # stops the children in order. When `bisik dev` is killed, they end with it.
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bisik.cli", *self.arguments,
            env=self.environment, start_new_session=True, preexec_fn=terminate_with_parent(),
        )  # fmt: skip
        log.info("dev.process_started", process=self.name, pid=self.process.pid)

    async def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        if await terminate(self.process, timeout):
            log.warning("dev.process_killed", process=self.name, after_seconds=timeout)
        log.info("dev.process_stopped", process=self.name)

    def may_restart(self) -> bool:
        now = time.monotonic()
        self.restarts = [moment for moment in self.restarts if now - moment < RESTART_WINDOW_SECONDS]
        self.restarts.append(now)
        return len(self.restarts) <= RESTART_LIMIT


class DevStack:
    def __init__(self, settings: Settings, extra_environment: dict[str, str] | None = None) -> None:
        """`extra_environment` adds variables for the API and worker processes (the demo's time scale)."""
        self.settings = settings
        self.extra_environment = extra_environment or {}
        self.database_url: str | None = None
        home = settings.home.resolve()
        self.postgres = EmbeddedPostgres(home / "postgres")
        self.temporal = TemporalDevServer(
            host=settings.temporal_host,
            port=settings.temporal_port,
            ui_port=settings.temporal_ui_port,
            db_file=home / "temporal.sqlite",
            namespace=settings.temporal_namespace,
        )
        self.mail = MailSink(settings.smtp_host, settings.smtp_port, home / "mail")
        self.children: list[ChildProcess] = []

    def check_ports(self) -> None:
        settings = self.settings
        ensure_port_free(settings.temporal_host, settings.temporal_port, "BISIK_TEMPORAL_ADDRESS")
        ensure_port_free(settings.temporal_host, settings.temporal_ui_port, "BISIK_TEMPORAL_UI_PORT")
        ensure_port_free(settings.smtp_host, settings.smtp_port, "BISIK_SMTP_PORT")
        ensure_port_free(settings.api_host, settings.api_port, "BISIK_API_PORT")

    async def run(self, stop: asyncio.Event) -> int:
        """Start everything, supervise until `stop` is set, then stop everything; return an exit code."""
        home = self.settings.home.resolve()
        home.mkdir(parents=True, exist_ok=True)
        with (home / LOCK_FILE).open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.error(
                    "dev.home_in_use",
                    home=str(home),
                    error=f"another bisik dev is running on {home}",
                    hint="stop it, or set BISIK_HOME to another folder",
                )
                return 1
            return await self._run_locked(stop)

    async def _run_locked(self, stop: asyncio.Event) -> int:
        try:
            self.check_ports()
        except PortInUseError as error:
            log.error("dev.port_in_use", port=error.port, setting=error.setting, error=str(error))
            return 1
        try:
            await self.start()
            log.info(
                "dev.ready",
                api=self.api_url,
                temporal_ui=f"http://{self.settings.temporal_host}:{self.settings.temporal_ui_port}",
                mail_dir=str(self.mail.directory),
                hint="press Ctrl-C to stop everything",
            )
            return await self.supervise(stop)
        finally:
            await self.stop()

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    async def start(self) -> str:
        """Start every server and process; return the database URL."""
        self.settings.home.mkdir(parents=True, exist_ok=True)
        database_url = await asyncio.to_thread(self.postgres.start)
        self.database_url = database_url
        await migrate(database_url)
        await self.temporal.start()
        self.mail.start()

        environment = {
            **os.environ,
            **self.extra_environment,
            "BISIK_HOME": str(self.settings.home.resolve()),
            "BISIK_DATABASE_URL": database_url,
        }
        self.children = [
            ChildProcess("worker", ["worker"], environment),
            ChildProcess("api", ["api"], environment),
        ]
        for child in self.children:
            await child.start()
        return database_url

    async def supervise(self, stop: asyncio.Event) -> int:
        """Restart the API and worker when they exit on their own, until `stop` is set."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
                break
            except TimeoutError:
                pass
            if not self.temporal.running:
                log.error("dev.temporal_exited", hint="see the temporal.server lines above")
                return 1
            for child in self.children:
                if child.process is None or child.process.returncode is None:
                    continue
                log.error("dev.process_exited", process=child.name, exit_code=child.process.returncode)
                if not child.may_restart():
                    log.error(
                        "dev.restart_limit_reached",
                        process=child.name,
                        restarts=RESTART_LIMIT,
                        window_seconds=RESTART_WINDOW_SECONDS,
                    )
                    return 1
                await child.start()
        return 0

    async def stop(self) -> None:
        for child in reversed(self.children):
            await child.stop()
        self.mail.stop()
        await self.temporal.stop()
        await asyncio.to_thread(self.postgres.stop)
        log.info("dev.stopped")
