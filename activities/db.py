"""PostgreSQL connection pool and schema migrations."""

from __future__ import annotations

import json
from importlib import resources
from urllib.parse import urlsplit

import asyncpg

from bisik.logs import get_logger

log = get_logger(__name__)

# The errors asyncpg raises when a server is down, refuses the login or lacks the database.
CONNECT_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)

# Key of the session-level advisory lock that serialises `bisik migrate` runs across processes.
MIGRATION_LOCK_KEY = 0x6269_7369_6B01


async def _init_connection(connection: asyncpg.Connection) -> None:
    # Decode json and jsonb columns into Python values instead of strings.
    for type_name in ("json", "jsonb"):
        await connection.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


class DatabaseUnavailable(Exception):
    """PostgreSQL at BISIK_DATABASE_URL could not be reached or refused the connection."""


def _unavailable(database_url: str, error: BaseException) -> DatabaseUnavailable:
    """Describe the failure by the hosts in the URL, since the URL may carry a password."""
    # The part after the credentials, as given: it may list several hosts, or none for a socket.
    where = urlsplit(database_url).netloc.rpartition("@")[2] or "the default socket"
    return DatabaseUnavailable(f"cannot connect to PostgreSQL at {where} (BISIK_DATABASE_URL): {error}")


async def connect(database_url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(database_url)
    except CONNECT_ERRORS as error:
        raise _unavailable(database_url, error) from error


async def check_database(database_url: str) -> None:
    """Connect once and disconnect; raise DatabaseUnavailable when that fails."""
    connection = await connect(database_url)
    await connection.close()


async def create_pool(database_url: str, *, min_size: int = 2, max_size: int = 20) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            database_url, min_size=min_size, max_size=max_size, init=_init_connection
        )
    except CONNECT_ERRORS as error:
        raise _unavailable(database_url, error) from error
    if pool is None:
        raise RuntimeError("asyncpg.create_pool returned no pool")
    return pool


def migration_files() -> list[tuple[str, str]]:
    """Return (name, SQL) of every migration, in the order they apply."""
    folder = resources.files("migrations")
    names = sorted(item.name for item in folder.iterdir() if item.name.endswith(".sql"))
    return [(name, folder.joinpath(name).read_text(encoding="utf-8")) for name in names]


async def migrate(database_url: str) -> list[str]:
    """Apply the migrations not applied yet, each in its own transaction; return their names."""
    connection = await connect(database_url)
    try:
        await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        await connection.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                name       text PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        applied = {row["name"] for row in await connection.fetch("SELECT name FROM schema_migrations")}
        newly_applied = []
        for name, sql in migration_files():
            if name in applied:
                continue
            async with connection.transaction():
                await connection.execute(sql)
                await connection.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            log.info("migration.applied", migration=name)
            newly_applied.append(name)
        return newly_applied
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        await connection.close()
