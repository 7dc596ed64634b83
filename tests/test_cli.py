"""`bisik api`, `worker` and `migrate` started against a PostgreSQL that is not running."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from workers.stack import free_port


@pytest.mark.parametrize("command", ["api", "worker", "migrate"])
def test_unreachable_database_one_line(command: str) -> None:
    port = free_port()
    environment = {
        **os.environ,
        "BISIK_DATABASE_URL": f"postgresql://bisik:S3cretPW@127.0.0.1:{port}/bisik",
        "BISIK_API_PORT": str(free_port()),
        "BISIK_LOG_FORMAT": "json",
    }

    finished = subprocess.run(
        [sys.executable, "-m", "bisik.cli", command], env=environment, capture_output=True, text=True, timeout=60
    )

    assert finished.returncode == 1
    [line] = [json.loads(line) for line in finished.stderr.splitlines() if line.startswith("{")]
    assert line["event"] == "process.database_unavailable"
    assert line["error"].startswith(f"cannot connect to PostgreSQL at 127.0.0.1:{port} (BISIK_DATABASE_URL)")
    assert "S3cretPW" not in finished.stderr


def test_missing_database_url_named() -> None:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("BISIK_")}

    finished = subprocess.run(
        [sys.executable, "-m", "bisik.cli", "worker"], env=environment, capture_output=True, text=True, timeout=60
    )

    assert finished.returncode == 2
    assert "BISIK_DATABASE_URL is not set" in finished.stderr


def test_catalog_import_unreachable_database_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    products = tmp_path / "products.csv"
    products.write_text("product_id,name\np1,Tea\n")
    port = free_port()
    environment = {
        **os.environ,
        "BISIK_DATABASE_URL": f"postgresql://bisik:S3cretPW@127.0.0.1:{port},127.0.0.1:{free_port()}/bisik",
        "BISIK_LOG_FORMAT": "json",
    }

    finished = subprocess.run(
        [sys.executable, "-m", "bisik.cli", "catalog", "import", str(products)],
        env=environment, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert finished.returncode == 1
    [line] = [json.loads(line) for line in finished.stderr.splitlines() if line.startswith("{")]
    assert line["error"].startswith(f"cannot connect to PostgreSQL at 127.0.0.1:{port},127.0.0.1:")
    assert "S3cretPW" not in finished.stderr
