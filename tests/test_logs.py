"""The logging pipeline: JSON off a terminal, masked email addresses, no secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from bisik.logs import configure_logging, get_logger, mask_email


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    yield stream
    configure_logging("warning", "console")


def logged_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_mask_email_keeps_first_letter_and_domain() -> None:
    assert mask_email("to ann.lee@example.com and b@shop.co.id") == "to a***@example.com and b***@shop.co.id"


def test_structlog_event_rendered_as_json(json_logs: io.StringIO) -> None:
    get_logger("tests").info("message.sent", customer_id="cus_1", recipient="Ann@Example.com")

    [line] = logged_lines(json_logs)
    assert line["event"] == "message.sent"
    assert line["customer_id"] == "cus_1"
    assert line["recipient"] == "A***@Example.com"
    assert line["level"] == "info"
    assert "timestamp" in line


def test_secret_fields_redacted(json_logs: io.StringIO) -> None:
    get_logger("tests").warning("smtp.login_failed", smtp_password="hunter2", write_key="wk", user="u1")

    [line] = logged_lines(json_logs)
    assert line["smtp_password"] == "[redacted]"
    assert line["write_key"] == "[redacted]"
    assert line["user"] == "u1"


def test_standard_library_records_use_same_pipeline(json_logs: io.StringIO) -> None:
    logging.getLogger("temporalio.worker").warning("Worker poll failed for %s", "x@example.com")
    logging.getLogger("uvicorn.error").info("Started server process")

    lines = logged_lines(json_logs)
    assert lines[0]["logger"] == "temporalio.worker"
    assert lines[0]["event"] == "Worker poll failed for x***@example.com"
    assert lines[1]["logger"] == "uvicorn.error"


def test_exception_rendered_as_structured_traceback(json_logs: io.StringIO) -> None:
    try:
        raise ValueError("bad template")
    except ValueError:
        get_logger("tests").exception("message.render_failed")

    [line] = logged_lines(json_logs)
    assert line["exception"][0]["exc_type"] == "ValueError"


def test_traceback_leaves_out_local_variables(json_logs: io.StringIO) -> None:
    database_url = "postgresql://bisik:S3cretPW@127.0.0.1:59999/bisik"
    try:
        raise ConnectionRefusedError(f"connect to port {database_url.rsplit(':', 1)[1]} refused")
    except ConnectionRefusedError:
        get_logger("tests").exception("worker.start_failed")

    [line] = logged_lines(json_logs)
    assert line["exception"][0]["exc_type"] == "ConnectionRefusedError"
    assert "S3cretPW" not in json_logs.getvalue()
