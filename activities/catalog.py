"""The product catalog: imported from a file, kept current by product events, queried by journeys."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from temporalio import activity

from bisik.commerce import product_ids_named
from bisik.logs import get_logger
from bisik.models import CartedOrBought, CartedOrBoughtRequest, CatalogProduct, SimilarProductsRequest

log = get_logger(__name__)

CSV_COLUMNS = ("product_id", "name", "brand", "category", "price", "currency", "image_url", "product_url", "stock")
# The largest values the products table holds: numeric(14, 2) and integer.
MAX_PRICE = Decimal("999999999999.99")
MAX_STOCK = 2**31 - 1
WEB_URL_PATTERN = r"^https?://[^\s/?#]+\S*$"


class ProductRow(BaseModel):
    """One product of an import file."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, coerce_numbers_to_str=True)

    product_id: str = Field(min_length=1, max_length=200)
    name: str = Field(min_length=1, max_length=500)
    brand: str | None = None
    category: str | None = None
    price: Decimal | None = Field(None, ge=0, le=MAX_PRICE)
    currency: str | None = Field(None, pattern=r"^[A-Z]{3}$")
    image_url: str | None = Field(None, pattern=WEB_URL_PATTERN)
    product_url: str | None = Field(None, pattern=WEB_URL_PATTERN)
    stock: int | None = Field(None, ge=0, le=MAX_STOCK)

    @field_validator("brand", "category", "currency", "image_url", "product_url", "price", "stock", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class CatalogImportError(ValueError):
    """The import file has invalid rows; nothing was imported."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} problems in the file; nothing was imported")
        self.problems = problems


def read_product_file(path: Path) -> list[ProductRow]:
    """Read and validate every row of a CSV (with a header) or JSON-lines file.

    Raises `CatalogImportError` with every problem found, each naming its line and field.
    """
    rows, problems = [], []
    try:
        for line_number, raw, problem in _raw_rows(path):
            if problem is not None:
                problems.append(f"line {line_number}: {problem}")
                continue
            try:
                rows.append(ProductRow.model_validate(raw))
            except ValidationError as error:
                for item in error.errors(include_url=False):
                    field_name = ".".join(str(part) for part in item["loc"]) or "row"
                    problems.append(f"line {line_number}: {field_name}: {item['msg']}")
    except UnicodeDecodeError as error:
        problems.append(f"the file is not UTF-8 text: invalid byte at offset {error.start}")
    if problems:
        raise CatalogImportError(problems)
    return rows


def _raw_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line number, row, None) per row, or (line number, None, problem) for an unreadable one."""
    # utf-8-sig drops the byte-order mark that spreadsheet programs put before a CSV header.
    with path.open(encoding="utf-8-sig", newline="") as file:
        first = next((line for line in file if line.strip()), "")
        file.seek(0)
        if first.lstrip().startswith("{"):
            for line_number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    yield line_number, json.loads(line), None
                except json.JSONDecodeError as error:
                    yield line_number, None, f"not valid JSON: {error.msg}"
            return

        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        unknown = set(columns) - set(CSV_COLUMNS)
        if "product_id" not in columns or "name" not in columns or unknown:
            raise CatalogImportError(
                [f"line 1: the header must name product_id, name and optionally {', '.join(CSV_COLUMNS[2:])}; got {columns}"]
            )
        for row in reader:
            # DictReader files surplus values under the key None and fills missing ones with None.
            if None in row:
                yield reader.line_num, None, f"the row has more values than the header's {len(columns)} columns"
            elif None in row.values():
                yield reader.line_num, None, f"the row has fewer values than the header's {len(columns)} columns"
            else:
                yield reader.line_num, row, None


def _text(value: Any) -> str | None:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
        return str(value).strip()
    return None


def _web_url(value: Any) -> str | None:
    """Return the value as an http(s) URL, or None: event properties may carry any string."""
    url = _text(value)
    return url if url is not None and url.startswith(("https://", "http://")) else None


class CatalogStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def import_products(self, rows: list[ProductRow]) -> int:
        """Insert or replace every row, in one transaction."""
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.executemany(
                """
                INSERT INTO products (product_id, name, brand, category, price, currency, image_url, product_url, stock)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                ON CONFLICT (product_id) DO UPDATE SET
                    name = EXCLUDED.name, brand = EXCLUDED.brand, category = EXCLUDED.category,
                    price = EXCLUDED.price, currency = EXCLUDED.currency, image_url = EXCLUDED.image_url,
                    product_url = EXCLUDED.product_url, stock = EXCLUDED.stock, updated_at = now()
                """,
                [
                    (row.product_id, row.name, row.brand, row.category, row.price, row.currency, row.image_url, row.product_url, row.stock)
                    for row in rows
                ],
            )
        log.info("catalog.imported", products=len(rows))
        return len(rows)

    @staticmethod
    async def update_from_event(connection: asyncpg.Connection, properties: dict[str, Any]) -> None:
        """Keep the catalog current from a product event's properties; stock is left as imported."""
        product_id = _text(properties.get("product_id")) or _text(properties.get("sku"))
        name = _text(properties.get("name"))
        if product_id is None or name is None:
            return
        price = properties.get("price")
        if not isinstance(price, (int, float)) or isinstance(price, bool) or not 0 <= price <= MAX_PRICE:
            # A price the column cannot hold would fail the whole ingest transaction, so it is dropped.
            price = None
        await connection.execute(
            """
            INSERT INTO products (product_id, name, brand, category, price, currency, image_url, product_url)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (product_id) DO UPDATE SET
                name = EXCLUDED.name,
                brand = COALESCE(EXCLUDED.brand, products.brand),
                category = COALESCE(EXCLUDED.category, products.category),
                price = COALESCE(EXCLUDED.price, products.price),
                currency = COALESCE(EXCLUDED.currency, products.currency),
                image_url = COALESCE(EXCLUDED.image_url, products.image_url),
                product_url = COALESCE(EXCLUDED.product_url, products.product_url),
                updated_at = now()
            """,
            product_id,
            name[:500],
            _text(properties.get("brand")),
            _text(properties.get("category")),
            Decimal(str(price)) if price is not None else None,
            _text(properties.get("currency")),
            _web_url(properties.get("image_url")),
            _web_url(properties.get("url")),
        )


def _product(row: asyncpg.Record) -> CatalogProduct:
    return CatalogProduct(
        product_id=row["product_id"],
        name=row["name"],
        brand=row["brand"],
        category=row["category"],
        price=float(row["price"]) if row["price"] is not None else None,
        currency=row["currency"],
        image_url=row["image_url"],
        url=row["product_url"],
        stock=row["stock"],
    )


async def carted_or_bought_since(pool: asyncpg.Pool, customer_id: str, since: datetime) -> CartedOrBought:
    """Read the customer's `Product Added` and `Order Completed` events stored since `since`.

    Parses them the way the journeys parse delivered events, so an event stored but not yet
    delivered to a journey counts the same as one that was.
    """
    rows = await pool.fetch(
        """
        SELECT name, properties FROM events
        WHERE customer_id = (SELECT COALESCE(merged_into, id) FROM customers WHERE id = $1)
          AND type = 'track' AND name IN ('Product Added', 'Order Completed') AND timestamp >= $2
        ORDER BY timestamp, id
        """,
        customer_id,
        since,
    )
    found = CartedOrBought()
    for row in rows:
        product_ids = product_ids_named(row["name"], row["properties"])
        if row["name"] == "Order Completed" and not product_ids:
            found.order_without_products = True
        found.product_ids.extend(product_id for product_id in product_ids if product_id not in found.product_ids)
    return found


class CatalogActivities:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @activity.defn(name="find_similar_products")
    async def find_similar_products(self, request: SimilarProductsRequest) -> list[CatalogProduct]:
        """Return up to `limit` products in the same categories, in stock, not already bought.

        Products whose stock was never imported count as available.
        """
        rows = await self.pool.fetch(
            """
            WITH bought AS (
                SELECT DISTINCT COALESCE(item ->> 'product_id', item ->> 'sku') AS product_id
                FROM events e, jsonb_array_elements(
                    CASE WHEN jsonb_typeof(e.properties -> 'products') = 'array' THEN e.properties -> 'products' ELSE '[]'::jsonb END
                ) AS item
                WHERE e.customer_id = (SELECT COALESCE(merged_into, id) FROM customers WHERE id = $1)
                  AND e.type = 'track' AND e.name = 'Order Completed'
            )
            SELECT * FROM products p
            WHERE p.category = ANY($2::text[])
              AND p.product_id <> ALL($3::text[])
              AND (p.stock IS NULL OR p.stock > 0)
              AND p.product_id NOT IN (SELECT product_id FROM bought WHERE product_id IS NOT NULL)
            ORDER BY (p.stock IS NULL), p.updated_at DESC, p.product_id
            LIMIT $4
            """,
            request.customer_id,
            request.categories,
            request.exclude_product_ids,
            request.limit,
        )
        return [_product(row) for row in rows]

    @activity.defn(name="find_carted_or_bought")
    async def find_carted_or_bought(self, request: CartedOrBoughtRequest) -> CartedOrBought:
        return await carted_or_bought_since(self.pool, request.customer_id, request.since)

    @activity.defn(name="load_products")
    async def load_products(self, product_ids: list[str]) -> list[CatalogProduct]:
        rows = await self.pool.fetch("SELECT * FROM products WHERE product_id = ANY($1::text[])", product_ids)
        by_id = {row["product_id"]: _product(row) for row in rows}
        return [by_id[product_id] for product_id in product_ids if product_id in by_id]
