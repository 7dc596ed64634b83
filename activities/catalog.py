"""The product catalog: imported from a file, kept current by product events, queried by journeys."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from temporalio import activity

from bisik.logs import get_logger
from bisik.models import CatalogProduct, SimilarProductsRequest

log = get_logger(__name__)

CSV_COLUMNS = ("product_id", "name", "brand", "category", "price", "currency", "image_url", "product_url", "stock")


class ProductRow(BaseModel):
    """One product of an import file."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    product_id: str = Field(min_length=1, max_length=200)
    name: str = Field(min_length=1, max_length=500)
    brand: str | None = None
    category: str | None = None
    price: Decimal | None = Field(None, ge=0)
    currency: str | None = Field(None, pattern=r"^[A-Z]{3}$")
    image_url: str | None = Field(None, pattern=r"^https?://")
    product_url: str | None = Field(None, pattern=r"^https?://")
    stock: int | None = Field(None, ge=0)

    @field_validator("brand", "category", "currency", "image_url", "product_url", "price", "stock", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class CatalogImportError(ValueError):
    """The import file has invalid rows; nothing was imported."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} invalid rows; nothing was imported")
        self.problems = problems


def read_product_file(path: Path) -> list[ProductRow]:
    """Read and validate every row of a CSV (with a header) or JSON-lines file; raise on any error."""
    rows, problems = [], []
    for line_number, raw in _raw_rows(path):
        try:
            rows.append(ProductRow.model_validate(raw))
        except ValidationError as error:
            for item in error.errors(include_url=False):
                field_name = ".".join(str(part) for part in item["loc"]) or "row"
                problems.append(f"line {line_number}: {field_name}: {item['msg']}")
    if problems:
        raise CatalogImportError(problems)
    return rows


def _raw_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8", newline="") as file:
        first = file.readline()
        file.seek(0)
        if first.lstrip().startswith("{"):
            for line_number, line in enumerate(file, start=1):
                if line.strip():
                    try:
                        yield line_number, json.loads(line)
                    except json.JSONDecodeError as error:
                        raise CatalogImportError([f"line {line_number}: not valid JSON: {error.msg}"]) from None
            return
        reader = csv.DictReader(file)
        unknown = set(reader.fieldnames or []) - set(CSV_COLUMNS)
        if "product_id" not in (reader.fieldnames or []) or "name" not in (reader.fieldnames or []) or unknown:
            raise CatalogImportError(
                [f"line 1: the header must name product_id, name and optionally {', '.join(CSV_COLUMNS[2:])}; got {reader.fieldnames}"]
            )
        for line_number, row in enumerate(reader, start=2):
            yield line_number, row


def _text(value: Any) -> str | None:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
        return str(value).strip()
    return None


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
        price = price if isinstance(price, (int, float)) and not isinstance(price, bool) and price >= 0 else None
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
            _text(properties.get("image_url")),
            _text(properties.get("url")),
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
                SELECT DISTINCT item ->> 'product_id' AS product_id
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

    @activity.defn(name="load_products")
    async def load_products(self, product_ids: list[str]) -> list[CatalogProduct]:
        rows = await self.pool.fetch("SELECT * FROM products WHERE product_id = ANY($1::text[])", product_ids)
        by_id = {row["product_id"]: _product(row) for row in rows}
        return [by_id[product_id] for product_id in product_ids if product_id in by_id]
