"""The product catalog: `bisik catalog import` run as a real command, and the file reader behind it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from activities.catalog import CatalogImportError, read_product_file
from tests.helpers import store_call

BISIK = str(Path(sys.executable).with_name("bisik"))
CSV_HEADER = "product_id,name,brand,category,price,currency,image_url,product_url,stock\n"
CSV_ROWS = (
    "shoe-1,Running Shoes,Lari,shoes,450000,IDR,https://cdn.example.com/shoe-1.jpg,https://shop.example.com/p/shoe-1,12\n"
    "shoe-2,Trail Shoes,Lari,shoes,520000.50,IDR,,https://shop.example.com/p/shoe-2,0\n"
    "sock-7,Wool Socks,,socks,,,,,\n"
)
JSONL_ROWS = [
    {"product_id": "bag-1", "name": "Canvas Tote", "category": "bags", "price": 125000, "currency": "IDR", "stock": 4},
    {"product_id": 42, "name": "Key Ring", "category": "bags", "price": "15000.5", "image_url": "https://cdn.example.com/42.jpg"},
]


async def run_import(database_url: str | None, file: Path) -> subprocess.CompletedProcess[str]:
    """Run `bisik catalog import FILE` as a separate process, in a folder without a .env file."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BISIK_")}
    if database_url is not None:
        env["BISIK_DATABASE_URL"] = database_url
    env["BISIK_LOG_LEVEL"] = "warning"
    return await asyncio.to_thread(
        subprocess.run,
        [BISIK, "catalog", "import", str(file)],
        env=env,
        cwd=file.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def products(pool: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT * FROM products ORDER BY product_id")
    return {row["product_id"]: row for row in rows}


async def test_csv_import_stores_every_field(database_url: str, pool: asyncpg.Pool, tmp_path: Path) -> None:
    file = tmp_path / "catalog.csv"
    file.write_text(CSV_HEADER + CSV_ROWS, encoding="utf-8")

    result = await run_import(database_url, file)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"imported 3 products from {file}\n"
    stored = await products(pool)
    assert list(stored) == ["shoe-1", "shoe-2", "sock-7"]
    shoe = stored["shoe-1"]
    assert shoe["name"] == "Running Shoes"
    assert shoe["brand"] == "Lari"
    assert shoe["category"] == "shoes"
    assert shoe["price"] == Decimal("450000.00")
    assert shoe["currency"] == "IDR"
    assert shoe["image_url"] == "https://cdn.example.com/shoe-1.jpg"
    assert shoe["product_url"] == "https://shop.example.com/p/shoe-1"
    assert shoe["stock"] == 12
    assert stored["shoe-2"]["price"] == Decimal("520000.50")
    assert stored["shoe-2"]["image_url"] is None
    assert stored["shoe-2"]["stock"] == 0
    socks = stored["sock-7"]
    assert (socks["brand"], socks["price"], socks["currency"], socks["stock"]) == (None, None, None, None)


async def test_jsonl_import_stores_every_row(database_url: str, pool: asyncpg.Pool, tmp_path: Path) -> None:
    file = tmp_path / "catalog.jsonl"
    file.write_text("\n".join(json.dumps(row) for row in JSONL_ROWS) + "\n\n", encoding="utf-8")

    result = await run_import(database_url, file)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"imported 2 products from {file}\n"
    stored = await products(pool)
    assert list(stored) == ["42", "bag-1"]
    assert stored["bag-1"]["stock"] == 4
    assert stored["bag-1"]["price"] == Decimal("125000.00")
    assert stored["42"]["price"] == Decimal("15000.50")
    assert stored["42"]["image_url"] == "https://cdn.example.com/42.jpg"


async def test_invalid_file_imports_nothing(database_url: str, pool: asyncpg.Pool, tmp_path: Path) -> None:
    file = tmp_path / "catalog.csv"
    file.write_text(
        CSV_HEADER
        + "shoe-1,Running Shoes,Lari,shoes,450000,IDR,,,3\n"
        + "shoe-2,Trail Shoes,Lari,shoes,cheap,IDR,,,3\n"
        + "shoe-3,,Lari,shoes,100,IDR,,,3\n"
        + "shoe-4,Slippers,Lari,shoes,100,IDR,javascript:alert(1),,3\n",
        encoding="utf-8",
    )

    result = await run_import(database_url, file)

    assert result.returncode == 2
    assert result.stdout == ""
    problems = result.stderr.splitlines()
    assert f"{file}: line 3: price: Input should be a valid decimal" in problems
    assert f"{file}: line 4: name: String should have at least 1 character" in problems
    assert any(problem.startswith(f"{file}: line 5: image_url: String should match pattern") for problem in problems)
    assert problems[-1] == f"{file}: 3 problems in the file; nothing was imported"
    assert await products(pool) == {}


async def test_reimport_updates_existing_rows(database_url: str, pool: asyncpg.Pool, tmp_path: Path) -> None:
    first = tmp_path / "first.csv"
    first.write_text(CSV_HEADER + CSV_ROWS, encoding="utf-8")
    second = tmp_path / "second.csv"
    second.write_text(CSV_HEADER + "shoe-1,Running Shoes V2,Lari,shoes,399000,IDR,,https://shop.example.com/p/shoe-1,0\n", encoding="utf-8")

    assert (await run_import(database_url, first)).returncode == 0
    result = await run_import(database_url, second)

    assert result.returncode == 0, result.stderr
    stored = await products(pool)
    assert len(stored) == 3
    shoe = stored["shoe-1"]
    assert shoe["name"] == "Running Shoes V2"
    assert shoe["price"] == Decimal("399000.00")
    assert shoe["stock"] == 0
    assert shoe["image_url"] is None
    assert stored["shoe-2"]["name"] == "Trail Shoes"


async def test_import_without_database_url_names_variable(tmp_path: Path) -> None:
    file = tmp_path / "catalog.csv"
    file.write_text(CSV_HEADER + CSV_ROWS, encoding="utf-8")

    result = await run_import(None, file)

    assert result.returncode == 2
    assert "BISIK_DATABASE_URL is not set" in result.stderr


async def test_import_of_missing_file_fails(database_url: str, tmp_path: Path) -> None:
    result = await run_import(database_url, tmp_path / "nowhere.csv")

    assert result.returncode == 2
    assert f"cannot import {tmp_path / 'nowhere.csv'}: no such file" in result.stderr


def test_reader_accepts_spreadsheet_byte_order_mark(tmp_path: Path) -> None:
    file = tmp_path / "excel.csv"
    file.write_bytes(b"\xef\xbb\xbf" + (CSV_HEADER + CSV_ROWS).encode())

    rows = read_product_file(file)

    assert [row.product_id for row in rows] == ["shoe-1", "shoe-2", "sock-7"]


def test_reader_reports_every_broken_line(tmp_path: Path) -> None:
    file = tmp_path / "broken.jsonl"
    file.write_text(
        '{"product_id": "a", "name": "A"}\n'
        "{not json\n"
        '{"product_id": "b", "name": "B", "price": -1}\n'
        '{"product_id": "c", "name": "C", "colour": "red"}\n'
        '{"product_id": "d", "name": "D", "price": 1e20}\n',
        encoding="utf-8",
    )

    with pytest.raises(CatalogImportError) as raised:
        read_product_file(file)

    problems = raised.value.problems
    assert len(problems) == 4
    assert problems[0].startswith("line 2: not valid JSON:")
    assert problems[1] == "line 3: price: Input should be greater than or equal to 0"
    assert problems[2] == "line 4: colour: Extra inputs are not permitted"
    assert problems[3].startswith("line 5: price: Input should be less than or equal to")


def test_reader_rejects_rows_of_wrong_width(tmp_path: Path) -> None:
    file = tmp_path / "ragged.csv"
    file.write_text("product_id,name,price\na,A,1,surplus\nb,B\nc,C,3\n", encoding="utf-8")

    with pytest.raises(CatalogImportError) as raised:
        read_product_file(file)

    assert raised.value.problems == [
        "line 2: the row has more values than the header's 3 columns",
        "line 3: the row has fewer values than the header's 3 columns",
    ]


def test_reader_rejects_unknown_csv_column(tmp_path: Path) -> None:
    file = tmp_path / "odd.csv"
    file.write_text("product_id,name,colour\na,A,red\n", encoding="utf-8")

    with pytest.raises(CatalogImportError) as raised:
        read_product_file(file)

    [problem] = raised.value.problems
    assert problem.startswith("line 1: the header must name product_id, name")


async def test_view_with_huge_price_still_stored(pool: asyncpg.Pool) -> None:
    # The price does not fit numeric(14, 2), so the catalog drops it instead of failing the ingest.
    view = {"type": "track", "userId": "u1", "event": "Product Viewed", "properties": {"product_id": "p1", "name": "P", "price": 1e15}}

    event = await store_call(pool, view)

    assert event.name == "Product Viewed"
    row = await pool.fetchrow("SELECT name, price FROM products WHERE product_id = 'p1'")
    assert row["name"] == "P"
    assert row["price"] is None


async def test_view_with_script_url_not_kept(pool: asyncpg.Pool) -> None:
    properties = {"product_id": "p2", "name": "P", "url": "javascript:alert(1)", "image_url": "https://cdn.example.com/p2.jpg"}

    await store_call(pool, {"type": "track", "userId": "u2", "event": "Product Viewed", "properties": properties})

    row = await pool.fetchrow("SELECT product_url, image_url FROM products WHERE product_id = 'p2'")
    assert row["product_url"] is None
    assert row["image_url"] == "https://cdn.example.com/p2.jpg"
