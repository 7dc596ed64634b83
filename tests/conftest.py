"""Fixtures over real components: embedded PostgreSQL, Temporal's dev and time-skipping servers,
an SMTP sink and the API served by uvicorn over loopback HTTP.

One server of each kind per session; each test gets a fresh database cloned from a migrated
template and a task queue of its own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import uvicorn
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.db import create_pool, migrate
from api.app import create_app
from bisik.logs import configure_logging
from bisik.settings import Settings
from workers.relay import OutboxRelay
from workers.stack import EmbeddedPostgres, MailSink, TemporalDevServer, free_port, package_binary
from workers.worker import build_worker
from workflows.registry import RoutingIndex

TEMPLATE_DATABASE = "bisik_template"
WRITE_KEY = "test-write-key"
SECOND_WRITE_KEY = "second-test-write-key"

configure_logging("warning", "console")


def database_url_for(server_url: str, database: str) -> str:
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path="/" + database))


# PostgreSQL


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres") / "data", delete_on_stop=True)
    url = server.start()
    yield url
    server.stop()


@pytest.fixture(scope="session")
async def template_database(postgres_url: str) -> str:
    connection = await asyncpg.connect(postgres_url)
    try:
        await connection.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DATABASE}")
        await connection.execute(f"CREATE DATABASE {TEMPLATE_DATABASE}")
    finally:
        await connection.close()
    await migrate(database_url_for(postgres_url, TEMPLATE_DATABASE))
    return TEMPLATE_DATABASE


@pytest.fixture
async def database_url(postgres_url: str, template_database: str) -> AsyncIterator[str]:
    name = "test_" + uuid.uuid4().hex[:16]
    connection = await asyncpg.connect(postgres_url)
    try:
        await connection.execute(f"CREATE DATABASE {name} TEMPLATE {template_database}")
    finally:
        await connection.close()
    yield database_url_for(postgres_url, name)
    connection = await asyncpg.connect(postgres_url)
    try:
        await connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await connection.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, min_size=1, max_size=10)
    yield pool
    await pool.close()


# Temporal


@pytest.fixture(scope="session")
async def temporal_server() -> AsyncIterator[TemporalDevServer]:
    server = TemporalDevServer(port=free_port(), ui_port=None, db_file=None)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def temporal_client(temporal_server: TemporalDevServer) -> Client:
    return await Client.connect(temporal_server.address, data_converter=pydantic_data_converter)


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter,
        test_server_existing_path=package_binary("temporal-test-server"),
    )
    yield env
    await env.shutdown()


# Settings, API, worker


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Settings for one test; `temporal_settings` adds the dev server's address."""
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        home=tmp_path / "home",
        database_url=database_url,
        temporal_task_queue="test-" + uuid.uuid4().hex,
        write_keys=[WRITE_KEY, SECOND_WRITE_KEY],
        api_port=free_port(),
        relay_poll_interval_seconds=0.2,
        # Journey tests check timing without the contact policy; tests of the policy turn it on.
        frequency_caps="",
        quiet_hours="off",
        relay_max_backoff_seconds=1.0,
        log_level="warning",
        log_format="console",
    )


@pytest.fixture
def temporal_settings(settings: Settings, temporal_server: TemporalDevServer) -> Settings:
    settings.temporal_address = temporal_server.address
    return settings


class ApiServer:
    """The API served by uvicorn on a loopback port, on the test's event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.api_port}"
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=settings.api_port,
            log_config=None,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task

    def client(self, write_key: str | None = WRITE_KEY) -> httpx.AsyncClient:
        auth = None if write_key is None else httpx.BasicAuth(write_key, "")
        return httpx.AsyncClient(base_url=self.url, auth=auth, timeout=30)


@pytest.fixture
async def api_server(settings: Settings) -> AsyncIterator[ApiServer]:
    server = ApiServer(settings)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def api(api_server: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with api_server.client() as client:
        yield client


class RunningWorker:
    """A journey worker and the outbox relay against the dev server, as `bisik worker` runs them."""

    def __init__(self, client: Client, pool: asyncpg.Pool, settings: Settings) -> None:
        self.client = client
        self.pool = pool
        self.settings = settings
        self.worker: Worker = build_worker(client, pool, settings)
        self.relay = OutboxRelay(pool, client, settings, RoutingIndex())
        self.stop_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, *, relay: bool = True) -> None:
        self._tasks.append(asyncio.create_task(self.worker.run()))
        if relay:
            self._tasks.append(asyncio.create_task(self.relay.run(self.stop_event)))

    async def stop(self) -> None:
        self.stop_event.set()
        await self.worker.shutdown()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def running_worker(
    temporal_client: Client, pool: asyncpg.Pool, temporal_settings: Settings, mail_sink: MailSink
) -> AsyncIterator[RunningWorker]:
    temporal_settings.smtp_port = mail_sink.port
    worker = RunningWorker(temporal_client, pool, temporal_settings)
    await worker.start()
    yield worker
    await worker.stop()


# SMTP


@pytest.fixture
def mail_sink(tmp_path: Path) -> Iterator[MailSink]:
    sink = MailSink("127.0.0.1", free_port(), tmp_path / "mail")
    sink.start()
    yield sink
    sink.stop()


# Journey fixtures live in their own module; importing registers them for every test.
from tests.journey_fixtures import journeys  # noqa: E402, F401
