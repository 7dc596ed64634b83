"""The FastAPI application: ingest, tracking links, preference page, health, and the request log line."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware

from activities.db import create_pool
from activities.ingest import EventStore
from api.errors import ApiError, install_error_handlers
from api.routes import ingest, preferences, tracking, unsubscribe
from bisik.links import LinkSigner
from bisik.logs import get_logger
from bisik.settings import Settings
from workflows.registry import JOURNEYS, RoutingIndex, configure_journeys
from workflows.toolkit import Journey

log = get_logger(__name__)


LINK_TOKEN_PATH = re.compile(r"^/(u|p|t/o|t/c)/[^/]+")


def redact_link_tokens(path: str) -> str:
    """Hide the signed token in unsubscribe, preference and tracking paths: each one acts for a customer."""
    return LINK_TOKEN_PATH.sub(lambda match: f"/{match.group(1)}/[token]", path)


def create_app(settings: Settings, journeys: tuple[type[Journey], ...] = JOURNEYS) -> FastAPI:
    if settings.database_url is None:
        raise ValueError(
            "BISIK_DATABASE_URL is not set; run `bisik dev` for the embedded stack or point it at PostgreSQL"
        )
    database_url = settings.database_url
    configure_journeys(settings)
    routing = RoutingIndex(journeys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await create_pool(
            database_url,
            min_size=settings.database_pool_min_size,
            max_size=settings.database_pool_max_size,
        )
        app.state.pool = pool
        app.state.event_store = EventStore(pool, routing.wants)
        log.info("api.started", journeys=sorted(routing.journeys))
        try:
            yield
        finally:
            await pool.close()
            log.info("api.stopped")

    app = FastAPI(title="Bisik", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.routing = routing
    app.state.links = LinkSigner(settings.secret_key.get_secret_value())
    install_error_handlers(app)
    app.include_router(ingest.router)
    app.include_router(unsubscribe.router)
    app.include_router(tracking.router)
    app.include_router(preferences.router)
    if settings.cors_origins:
        # Browsers on these origins may call the API. track.js sends simple requests (text/plain
        # body with the write key inside), which need no preflight; Basic auth from a browser
        # does, and is allowed here too. No cookies or credentials cross origins.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Content-Encoding"],
            allow_credentials=False,
            # Chromium caps how long it caches a preflight at 2 hours (7200 s), whatever is asked.
            max_age=7200,
        )

    @app.get("/health", tags=["operations"])
    async def health(request: Request) -> dict[str, str]:
        await request.app.state.pool.fetchval("SELECT 1")
        return {"status": "ok"}

    @app.middleware("http")
    async def log_request(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=uuid.uuid4().hex[:16])
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as error:
            # Answer the caller with JSON instead of letting the server drop the connection.
            log.error("http.unhandled_error", path=redact_link_tokens(request.url.path), exc_info=error)
            response = ApiError(
                500, "internal_error", "the server failed to handle the request; it was logged"
            ).to_response()
        log.info(
            "http.request",
            method=request.method,
            path=redact_link_tokens(request.url.path),
            status=response.status_code,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return response

    return app
