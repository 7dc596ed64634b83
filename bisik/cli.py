"""The `bisik` command line."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from activities.db import DatabaseUnavailable, check_database
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
T = TypeVar("T")


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
    """Run `main(stop)` on a new event loop until a signal sets `stop`.

    SIGINT, SIGTERM and SIGHUP (the terminal closed) all ask for a clean shutdown.
    """

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signal_number, stop.set)
        try:
            result = await main(stop)
        except DatabaseUnavailable as error:
            log.error("process.database_unavailable", error=str(error))
            return 1
        except Exception:
            log.exception("process.crashed")
            return 1
        return result or 0

    return asyncio.run(runner())


def database_url_or_exit(settings: Settings) -> str:
    if settings.database_url is None:
        typer.echo(
            "BISIK_DATABASE_URL is not set; run `bisik dev` for the embedded stack or point it at PostgreSQL",
            err=True,
        )
        raise typer.Exit(2)
    return settings.database_url


def run_with_database(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion; a database that cannot be reached ends the command in one log line."""
    try:
        return asyncio.run(main)
    except DatabaseUnavailable as error:
        log.error("process.database_unavailable", error=str(error))
        raise typer.Exit(1) from None


@app.command()
def dev() -> None:
    """Start the local stack: PostgreSQL, Temporal with its Web UI, an SMTP sink, the API and a worker.

    Data lives in BISIK_HOME (.bisik/). Ctrl-C stops everything.

    Ports: API 8000 (BISIK_API_PORT), Temporal 7233 (BISIK_TEMPORAL_ADDRESS),
    Web UI 8233 (BISIK_TEMPORAL_UI_PORT), SMTP 1025 (BISIK_SMTP_PORT).
    """
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
    database_url = database_url_or_exit(settings)
    # Checked first: uvicorn would print a whole traceback for a database that is down.
    run_with_database(check_database(database_url))
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
    database_url_or_exit(settings)

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
    database_url = database_url_or_exit(settings)

    async def main() -> None:
        applied = await apply_migrations(database_url)
        log.info("migrate.done", applied=applied)
        if temporal:
            client = await temporal_client.connect(settings)
            await temporal_client.register_search_attributes(client, settings.temporal_namespace)

    run_with_database(main())


catalog_app = typer.Typer(help="Manage the product catalog that journeys recommend from.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")


@catalog_app.command("import")
def import_catalog(
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV with the header product_id,name,brand,category,price,currency,image_url,product_url,stock "
            "(only product_id and name are required), or JSON lines with the same fields."
        ),
    ],
) -> None:
    """Validate every row of FILE, then insert or update all products in one transaction.

    Nothing is imported when any row is invalid, and every problem is printed with its line and field.
    """
    from activities.catalog import CatalogImportError, CatalogStore, read_product_file
    from activities.db import create_pool

    settings = load_settings()
    database_url = database_url_or_exit(settings)
    if not file.is_file():
        typer.echo(f"cannot import {file}: no such file", err=True)
        raise typer.Exit(2)
    try:
        rows = read_product_file(file)
    except CatalogImportError as error:
        for problem in error.problems:
            typer.echo(f"{file}: {problem}", err=True)
        typer.echo(f"{file}: {error}", err=True)
        raise typer.Exit(2) from None

    async def main() -> int:
        pool = await create_pool(database_url, min_size=1, max_size=1)
        try:
            return await CatalogStore(pool).import_products(rows)
        finally:
            await pool.close()

    imported = run_with_database(main())
    typer.echo(f"imported {imported} products from {file}")


DEFAULT_DEMO_FILE = Path("../shared/data/rees46/2019-Oct-first-3h.csv")
FILE_FORMATS = ("auto", "rees46", "segment", "cdnow")
LOCALE_CHOICES = ("mixed", "en", "id")


@app.command()
def replay(
    file: Annotated[Path, typer.Argument(help="REES46 CSV, Segment JSON lines or CDNOW purchases.")],
    time_scale: Annotated[
        float | None,
        typer.Option(help="Divide the gaps between events by this; defaults to BISIK_TIME_SCALE."),
    ] = None,
    api_url: Annotated[str | None, typer.Option(help="Bisik API to send to; defaults to BISIK_API_HOST:BISIK_API_PORT.")] = None,
    file_format: Annotated[str, typer.Option("--format", help=f"One of {', '.join(FILE_FORMATS)}.")] = "auto",
    locales: Annotated[
        str, typer.Option(help="Locale given to replayed shoppers: en, id, or mixed (a stable half each).")
    ] = "mixed",
) -> None:
    """Send recorded behaviour through the HTTP API, shifted to now and paced by the time scale."""
    from bisik.replay import ReplayFormatError, read_calls
    from bisik.replay import replay as send_calls

    settings = load_settings()
    if file_format not in FILE_FORMATS:
        typer.echo(f"invalid --format {file_format!r}: use one of {', '.join(FILE_FORMATS)}", err=True)
        raise typer.Exit(2)
    if locales not in LOCALE_CHOICES:
        typer.echo(f"invalid --locales {locales!r}: use one of {', '.join(LOCALE_CHOICES)}", err=True)
        raise typer.Exit(2)
    scale = time_scale if time_scale is not None else settings.time_scale
    if scale <= 0:
        typer.echo(f"invalid --time-scale {scale:g}: it must be greater than 0", err=True)
        raise typer.Exit(2)
    try:
        calls = read_calls(file, file_format, locales)
    except ReplayFormatError as error:
        typer.echo(f"cannot replay: {error}", err=True)
        raise typer.Exit(2) from None

    url = api_url or f"http://{settings.api_host}:{settings.api_port}"
    stats = asyncio.run(
        send_calls(calls, api_url=url, write_key=settings.write_keys[0].get_secret_value(), time_scale=scale)
    )
    log.info(
        "replay.done",
        calls=stats.calls,
        stored=stats.stored,
        duplicates=stats.duplicates,
        users=stats.users,
        seconds=round(stats.seconds, 1),
        calls_per_second=round(stats.calls_per_second, 1),
    )


@app.command()
def demo(
    file: Annotated[Path, typer.Argument(help="Recorded behaviour to replay.")] = DEFAULT_DEMO_FILE,
    time_scale: Annotated[
        float, typer.Option(help="Journey delays and replay gaps are divided by this; 720 makes a day two minutes.")
    ] = 720.0,
    keep_running: Annotated[
        bool, typer.Option(help="Leave the stack up after the report, to browse the Temporal UI and the mail.")
    ] = False,
    report_json: Annotated[Path | None, typer.Option(help="Also write the report as JSON to this file.")] = None,
    locales: Annotated[str, typer.Option(help="Locale of replayed shoppers: en, id or mixed.")] = "mixed",
) -> None:
    """Replay real shop data through a fresh local stack, wait for the journeys, print a report."""
    from bisik.replay import ReplayFormatError
    from workers.demo import Demo

    settings = load_settings()
    if time_scale <= 0:
        typer.echo(f"invalid --time-scale {time_scale:g}: it must be greater than 0", err=True)
        raise typer.Exit(2)
    if locales not in LOCALE_CHOICES:
        typer.echo(f"invalid --locales {locales!r}: use one of {', '.join(LOCALE_CHOICES)}", err=True)
        raise typer.Exit(2)
    if not file.is_file():
        typer.echo(f"cannot replay {file}: no such file; pass the path to a REES46 CSV", err=True)
        raise typer.Exit(2)
    settings = settings.model_copy(update={"time_scale": time_scale})
    runner = Demo(settings, file, keep_running=keep_running, report_json=report_json, locales=locales)
    try:
        raise typer.Exit(run_until_signalled(runner.run))
    except ReplayFormatError as error:
        typer.echo(f"cannot replay: {error}", err=True)
        raise typer.Exit(2) from None


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
