"""The `bisik` command line."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated

import typer
from pydantic import ValidationError

from bisik.logs import configure_logging, get_logger
from bisik.settings import Settings

app = typer.Typer(
    help="Bisik: behaviour-triggered marketing automation on Temporal and PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    # Crashes are logged through structlog (JSON in production), not drawn as rich tracebacks.
    pretty_exceptions_enable=False,
)
log = get_logger("bisik.cli")


def load_settings() -> Settings:
    """Read the settings, or exit with the invalid fields named."""
    try:
        settings = Settings()
    except ValidationError as error:
        configure_logging()
        for problem in error.errors(include_url=False):
            field_name = ".".join(str(part) for part in problem["loc"]) or "settings"
            variable = f"BISIK_{field_name.upper()}" if problem["loc"] else "settings"
            typer.echo(f"invalid setting {variable}: {problem['msg']}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int:
    """Run `main(stop)` on a new event loop; SIGINT and SIGTERM set `stop` for a clean shutdown."""

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signal_number, stop.set)
        try:
            result = await main(stop)
        except Exception:
            log.exception("process.crashed")
            return 1
        return result or 0

    return asyncio.run(runner())


@app.command()
def dev() -> None:
    """Start the local stack: PostgreSQL, Temporal with its Web UI, an SMTP sink, the API and a worker."""
    from workers.dev import DevStack

    settings = load_settings()
    if settings.environment != "development":
        typer.echo("bisik dev runs only with BISIK_ENVIRONMENT=development", err=True)
        raise typer.Exit(2)
    raise typer.Exit(run_until_signalled(DevStack(settings).run))


@app.command()
def api() -> None:
    """Serve the HTTP API with uvicorn on BISIK_API_HOST:BISIK_API_PORT."""
    import uvicorn

    from api.app import create_app

    settings = load_settings()
    application = create_app(settings)
    uvicorn.run(
        application,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        proxy_headers=True,
    )


@app.command()
def worker() -> None:
    """Run journey workflows and activities, and route stored events into them (the outbox relay)."""
    from workers.worker import run_worker

    settings = load_settings()

    async def main(stop: asyncio.Event) -> None:
        await run_worker(settings, stop)

    raise typer.Exit(run_until_signalled(main))


@app.command()
def migrate(
    temporal: Annotated[
        bool,
        typer.Option(help="Also register the CustomerId and Journey search attributes in Temporal."),
    ] = False,
) -> None:
    """Apply database migrations that have not been applied yet."""
    from activities.db import migrate as apply_migrations
    from bisik import temporal as temporal_client

    settings = load_settings()
    if settings.database_url is None:
        typer.echo("BISIK_DATABASE_URL is not set; point it at the PostgreSQL to migrate", err=True)
        raise typer.Exit(2)
    database_url = settings.database_url

    async def main() -> None:
        applied = await apply_migrations(database_url)
        log.info("migrate.done", applied=applied)
        if temporal:
            client = await temporal_client.connect(settings)
            await temporal_client.register_search_attributes(client, settings.temporal_namespace)

    asyncio.run(main())


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
