"""`bisik dev` as a user runs it: one command, every server up, Ctrl-C stops all, data kept."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import httpx
import psutil
import pytest
from temporalio.client import Client

from tests.helpers import assert_eventually
from workers.stack import free_port

WRITE_KEY = "dev-stack-key"


class DevProcess:
    """`bisik dev` in a process group of its own, so Ctrl-C can be sent the way a terminal does."""

    def __init__(self, home: Path, ports: dict[str, int]) -> None:
        self.home = home
        self.ports = ports
        self.process: asyncio.subprocess.Process | None = None
        self.output = home / "dev.log"

    @property
    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "BISIK_HOME": str(self.home / ".bisik"),
            "BISIK_API_PORT": str(self.ports["api"]),
            "BISIK_TEMPORAL_ADDRESS": f"127.0.0.1:{self.ports['temporal']}",
            "BISIK_TEMPORAL_UI_PORT": str(self.ports["ui"]),
            "BISIK_SMTP_PORT": str(self.ports["smtp"]),
            "BISIK_WRITE_KEYS": WRITE_KEY,
            "BISIK_LOG_FORMAT": "json",
        }

    async def start(self) -> None:
        with self.output.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bisik.cli", "dev",
                cwd=self.home, env=self.environment, stdout=output, stderr=output,
                start_new_session=True,
            )  # fmt: skip

    async def interrupt(self, timeout: float = 60.0, signal_number: int = signal.SIGINT) -> int:
        """Signal the whole process group as a terminal does (SIGINT for Ctrl-C); return the exit code."""
        assert self.process is not None
        os.killpg(self.process.pid, signal_number)
        return await asyncio.wait_for(self.process.wait(), timeout)

    def log_events(self) -> list[dict]:
        events = []
        for line in self.output.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            os.killpg(self.process.pid, signal.SIGKILL)


def stack_ports() -> dict[str, int]:
    return {"api": free_port(), "temporal": free_port(), "ui": free_port(), "smtp": free_port()}


async def wait_until_healthy(url: str, dev: DevProcess) -> None:
    async def healthy() -> None:
        assert dev.process is not None and dev.process.returncode is None, dev.output.read_text()[-3000:]
        try:
            response = await httpx.AsyncClient().get(url + "/health")
        except httpx.TransportError as error:
            raise AssertionError(str(error)) from error
        assert response.status_code == 200

    await assert_eventually(healthy, timeout=90, interval=0.5)


def processes_using(home: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if str(home) in command:
            found.append(process)
    return found


@pytest.mark.timeout(300)
async def test_dev_starts_everything_and_restarts_on_same_data(tmp_path: Path) -> None:
    ports = stack_ports()
    dev = DevProcess(tmp_path, ports)
    api_url = f"http://127.0.0.1:{ports['api']}"
    identify = {"userId": "dev-user", "messageId": "dev-1", "traits": {"email": "dev@example.com", "subscribed": True}}
    try:
        await dev.start()
        await wait_until_healthy(api_url, dev)

        async with httpx.AsyncClient(base_url=api_url, auth=(WRITE_KEY, "")) as api:
            first = await api.post("/v1/identify", json=identify)
        assert first.json()["stored"] == 1

        temporal = await Client.connect(f"127.0.0.1:{ports['temporal']}")

        async def journey_started() -> None:
            workflows = [w async for w in temporal.list_workflows("Journey = 'welcome'")]
            assert len(workflows) == 1

        await assert_eventually(journey_started, timeout=30)

        message = EmailMessage()
        message["From"] = "shop@example.com"
        message["To"] = "dev@example.com"
        message["Subject"] = "Hello from the sink test"
        message.set_content("Hi")
        await aiosmtplib.send(message, hostname="127.0.0.1", port=ports["smtp"])
        # The welcome journey's own email may be there too, depending on the hour in Jakarta.
        index = (tmp_path / ".bisik" / "mail" / "index.jsonl").read_text().splitlines()
        assert "Hello from the sink test" in [json.loads(line)["subject"] for line in index]

        with socket.create_connection(("127.0.0.1", ports["ui"]), timeout=5):
            pass  # the Web UI listens

        assert await dev.interrupt() == 0
        events = [event["event"] for event in dev.log_events()]
        for started in ("postgres.started", "temporal.started", "smtp.started", "worker.started", "api.started", "dev.ready"):
            assert started in events
        for stopped in ("api.stopped", "worker.stopped", "smtp.stopped", "temporal.stopped", "postgres.stopped", "dev.stopped"):
            assert stopped in events
        assert processes_using(tmp_path) == []

        # A second start finds the same PostgreSQL data and the same Temporal history.
        await dev.start()
        await wait_until_healthy(api_url, dev)
        async with httpx.AsyncClient(base_url=api_url, auth=(WRITE_KEY, "")) as api:
            again = await api.post("/v1/identify", json=identify)
        assert again.json() == {"success": True, "stored": 0, "duplicates": 1}
        temporal = await Client.connect(f"127.0.0.1:{ports['temporal']}")
        assert len([w async for w in temporal.list_workflows("Journey = 'welcome'")]) == 1
        assert await dev.interrupt() == 0
    finally:
        dev.kill()


async def test_dev_names_port_in_use_and_its_setting(tmp_path: Path) -> None:
    ports = stack_ports()
    dev = DevProcess(tmp_path, ports)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["api"]))
        taken.listen()

        await dev.start()
        assert dev.process is not None
        code = await asyncio.wait_for(dev.process.wait(), 60)

    assert code == 1
    [error] = [event for event in dev.log_events() if event["event"] == "dev.port_in_use"]
    assert error["port"] == ports["api"]
    assert error["setting"] == "BISIK_API_PORT"
    assert f"port {ports['api']} on 127.0.0.1 is already in use" in error["error"]
    assert not (tmp_path / ".bisik" / "postgres").exists()


def bisik_children(dev: DevProcess) -> list[psutil.Process]:
    assert dev.process is not None
    children = psutil.Process(dev.process.pid).children(recursive=True)
    return [child for child in children if "bisik.cli" in " ".join(child.cmdline())]


@pytest.mark.timeout(300)
async def test_killed_dev_leaves_nothing_behind(tmp_path: Path) -> None:
    ports = stack_ports()
    dev = DevProcess(tmp_path, ports)
    api_url = f"http://127.0.0.1:{ports['api']}"
    try:
        await dev.start()
        await wait_until_healthy(api_url, dev)
        api_and_worker = bisik_children(dev)
        assert len(api_and_worker) == 2

        # Killed, so it cannot stop anything itself.
        assert dev.process is not None
        dev.process.kill()
        await dev.process.wait()

        async def children_gone() -> None:
            assert [child for child in api_and_worker if child.is_running() and child.status() != psutil.STATUS_ZOMBIE] == []

        await assert_eventually(children_gone, timeout=30)

        # PostgreSQL outlives the kill; the next start uses it, and a clean stop stops it.
        await dev.start()
        await wait_until_healthy(api_url, dev)
        assert await dev.interrupt() == 0
        assert processes_using(tmp_path) == []
    finally:
        dev.kill()
        for leftover in processes_using(tmp_path):
            leftover.kill()


@pytest.mark.timeout(300)
async def test_second_dev_on_same_home_refused(tmp_path: Path) -> None:
    first = DevProcess(tmp_path, stack_ports())
    second = DevProcess(tmp_path, stack_ports())
    try:
        await first.start()
        await wait_until_healthy(f"http://127.0.0.1:{first.ports['api']}", first)

        await second.start()
        assert second.process is not None
        code = await asyncio.wait_for(second.process.wait(), 60)

        assert code == 1
        [error] = [event for event in second.log_events() if event["event"] == "dev.home_in_use"]
        assert error["hint"] == "stop it, or set BISIK_HOME to another folder"
        assert first.process is not None and first.process.returncode is None
        assert await first.interrupt() == 0
    finally:
        first.kill()
        second.kill()


@pytest.mark.timeout(300)
async def test_terminal_hang_up_stops_everything(tmp_path: Path) -> None:
    ports = stack_ports()
    dev = DevProcess(tmp_path, ports)
    try:
        await dev.start()
        await wait_until_healthy(f"http://127.0.0.1:{ports['api']}", dev)

        assert await dev.interrupt(signal_number=signal.SIGHUP) == 0

        events = [event["event"] for event in dev.log_events()]
        assert "dev.stopped" in events
        assert "dev.process_exited" not in events
        assert processes_using(tmp_path) == []
    finally:
        dev.kill()
