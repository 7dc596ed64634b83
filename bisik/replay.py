"""Replaying recorded behaviour through Bisik's HTTP API.

Reads three formats and turns each into Segment calls:

- REES46 e-commerce CSV (`event_time,event_type,product_id,...,user_id,user_session`): `view`
  becomes `Product Viewed`, `cart` `Product Added`, `remove_from_cart` `Product Removed`, and the
  `purchase` rows of one user at one moment become one `Order Completed` with an order id.
- Segment JSON lines: one call per line, as a Segment library would send it.
- CDNOW purchases (`customer date cds dollars`): each line an `Order Completed`.

Every user of a REES46 or CDNOW file first gets an `identify` with the address
`user-<id>@example.com`. Timestamps are shifted so the file starts now and gaps are divided by
the time scale, the same one journeys divide their delays by; calls are sent when they fall
due, in batches, in file order, so each customer's events arrive in their order.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from bisik.logs import get_logger

log = get_logger(__name__)

REES46_EVENTS = {"view": "Product Viewed", "cart": "Product Added", "remove_from_cart": "Product Removed"}
CDNOW_HEADER = ["customer_id", "date", "number_of_cds", "dollar_value"]
REES46_COLUMNS = ["event_time", "event_type", "product_id", "category_id", "category_code", "brand", "price", "user_id", "user_session"]
MAX_BATCH_CALLS = 100
MAX_BATCH_BYTES = 400_000


class ReplayFormatError(ValueError):
    """The file is not in a format replay reads, or a line of it is malformed."""


@dataclass(frozen=True)
class RecordedCall:
    """A Segment call with the moment it originally happened."""

    at: datetime
    body: dict[str, Any]


@dataclass
class ReplayStats:
    calls: int = 0
    stored: int = 0
    duplicates: int = 0
    users: int = 0
    first_at: datetime | None = None
    last_at: datetime | None = None
    seconds: float = 0.0
    max_lag_seconds: float = 0.0
    last_stamp: datetime | None = None
    by_event: dict[str, int] = field(default_factory=dict)

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


def detect_format(path: Path) -> str:
    with path.open(encoding="utf-8") as file:
        first = file.readline().strip()
    if first.startswith("event_time,event_type"):
        return "rees46"
    if first.startswith("{"):
        return "segment"
    parts = first.split()
    if parts == CDNOW_HEADER or (len(parts) == 4 and parts[1].isdigit() and len(parts[1]) == 8):
        return "cdnow"
    raise ReplayFormatError(
        f"{path}: cannot tell the format from the first line; expected a REES46 CSV header, "
        "a Segment JSON object or a CDNOW line `customer YYYYMMDD cds dollars`"
    )


def _message_id(*parts: object) -> str:
    """A message id derived from the file's content, so replaying a file twice stores nothing new."""
    return "replay-" + hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:24]


def _locale_for(user_id: str, locales: str) -> str:
    if locales in ("en", "id"):
        return locales
    # "mixed": a stable half of the shoppers read Indonesian.
    return "id" if int(hashlib.sha256(user_id.encode()).hexdigest(), 16) % 2 == 0 else "en"


def _identify(user_id: str, at: datetime, locales: str, file_format: str) -> RecordedCall:
    return RecordedCall(
        at,
        {
            "type": "identify",
            "userId": user_id,
            # The format is part of the id: user 42 of one data set is not customer 42 of another.
            "messageId": _message_id("identify", file_format, user_id),
            "traits": {"email": f"user-{user_id}@example.com", "locale": _locale_for(user_id, locales)},
        },
    )


def _rees46_product(row: dict[str, str], path: Path, line_number: int) -> dict[str, Any]:
    try:
        price = float(row["price"])
    except (TypeError, ValueError):
        raise ReplayFormatError(f"{path}:{line_number}: price {row['price']!r} is not a number") from None
    category = row["category_code"] or row["category_id"]
    kind = row["category_code"].rsplit(".", 1)[-1].replace("_", " ") if row["category_code"] else "item"
    brand = row["brand"] or None
    product: dict[str, Any] = {
        "product_id": row["product_id"],
        "name": " ".join(part.title() for part in (brand, kind) if part),
        "category": category,
        "price": price,
        "quantity": 1,
        "currency": "USD",
    }
    if brand:
        product["brand"] = brand
    return product


def read_rees46(path: Path, locales: str = "mixed") -> Iterator[RecordedCall]:
    """Read a REES46 CSV; the purchase rows of one user at one moment become one order."""
    with path.open(encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames != REES46_COLUMNS:
            raise ReplayFormatError(f"{path}: expected the columns {REES46_COLUMNS}, got {reader.fieldnames}")
        known_users: set[str] = set()
        orders: dict[tuple[str, str], list[tuple[int, dict[str, str]]]] = {}
        for line_number, row in enumerate(reader, start=2):
            kind = row["event_type"]
            if kind not in REES46_EVENTS and kind != "purchase":
                raise ReplayFormatError(f"{path}:{line_number}: unknown event_type {kind!r}")
            user_id = row["user_id"]
            at = _parse_rees46_time(row["event_time"], path)
            if user_id not in known_users:
                known_users.add(user_id)
                yield _identify(user_id, at, locales, "rees46")
            if kind == "purchase":
                orders.setdefault((user_id, row["event_time"]), []).append((line_number, row))
                continue
            yield RecordedCall(
                at,
                {
                    "type": "track",
                    "userId": user_id,
                    "event": REES46_EVENTS[kind],
                    "messageId": _message_id(path.name, line_number),
                    "properties": _rees46_product(row, path, line_number),
                    "context": {"session_id": row["user_session"]},
                },
            )
    for (user_id, event_time), rows in orders.items():
        yield _rees46_order(user_id, _parse_rees46_time(event_time, path), rows, path)


def _rees46_order(user_id: str, at: datetime, rows: list[tuple[int, dict[str, str]]], path: Path) -> RecordedCall:
    products = [_rees46_product(row, path, line_number) for line_number, row in rows]
    order_id = f"{user_id}-{int(at.timestamp())}"
    return RecordedCall(
        at,
        {
            "type": "track",
            "userId": user_id,
            "event": "Order Completed",
            "messageId": _message_id("order", order_id),
            "properties": {
                "order_id": order_id,
                "total": round(sum(product["price"] * product["quantity"] for product in products), 2),
                "currency": "USD",
                "products": products,
            },
        },
    )


def _parse_rees46_time(value: str, path: Path) -> datetime:
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=UTC)
    except ValueError:
        raise ReplayFormatError(f"{path}: event_time {value!r} is not `YYYY-MM-DD HH:MM:SS UTC`") from None


def read_segment(path: Path) -> Iterator[RecordedCall]:
    with path.open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                body = json.loads(line)
            except json.JSONDecodeError as error:
                raise ReplayFormatError(f"{path}:{line_number}: not valid JSON: {error.msg}") from None
            if not isinstance(body, dict) or "type" not in body:
                raise ReplayFormatError(f"{path}:{line_number}: expected a Segment call with a `type`")
            stamp = body.get("timestamp") or body.get("originalTimestamp")
            try:
                at = datetime.fromisoformat(stamp.replace("Z", "+00:00")) if isinstance(stamp, str) else None
            except ValueError:
                raise ReplayFormatError(f"{path}:{line_number}: timestamp {stamp!r} is not ISO 8601") from None
            if at is None:
                raise ReplayFormatError(f"{path}:{line_number}: a replayed call needs a `timestamp`")
            if at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
            body.setdefault("messageId", _message_id(path.name, line_number))
            yield RecordedCall(at, body)


def read_cdnow(path: Path, locales: str = "mixed") -> Iterator[RecordedCall]:
    """Read CDNOW purchases: each line one order of `cds` CDs worth `dollars`, at noon UTC.

    The published file starts with a header line (`customer_id date number_of_cds
    dollar_value`), which is skipped. It records only each order's total, so the CDs are given
    cent prices that add up to it exactly (29.33 for two CDs: 14.67 and 14.66).
    """
    known_users: set[str] = set()
    with path.open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            parts = line.split()
            if not parts or (line_number == 1 and parts == CDNOW_HEADER):
                continue
            customer, day, cds, dollars = _parse_cdnow_line(parts, path, line_number, line)
            at = datetime.strptime(day, "%Y%m%d").replace(hour=12, tzinfo=UTC)
            if customer not in known_users:
                known_users.add(customer)
                yield _identify(customer, at, locales, "cdnow")
            order_id = f"cdnow-{customer}-{day}-{line_number}"
            yield RecordedCall(
                at,
                {
                    "type": "track",
                    "userId": customer,
                    "event": "Order Completed",
                    "messageId": _message_id("cdnow", line_number, line.strip()),
                    "properties": {
                        "order_id": order_id,
                        "total": float(dollars),
                        "currency": "USD",
                        "products": _cdnow_products(cds, dollars),
                    },
                },
            )


def _parse_cdnow_line(
    parts: list[str], path: Path, line_number: int, line: str
) -> tuple[str, str, int, Decimal]:
    """Return the customer, day (`YYYYMMDD`), CD count and dollars of one line.

    Raises `ReplayFormatError` naming the file, the line number and the invalid field.
    """

    def malformed(problem: str) -> ReplayFormatError:
        return ReplayFormatError(
            f"{path}:{line_number}: {problem} in {line.strip()!r}, "
            "expected `customer YYYYMMDD cds dollars`"
        )

    if len(parts) != 4:
        raise malformed(f"expected 4 fields, got {len(parts)}")
    customer, day, cds, dollars = parts
    if len(day) != 8 or not day.isdigit():
        raise malformed(f"date {day!r} is not YYYYMMDD")
    try:
        datetime.strptime(day, "%Y%m%d")
    except ValueError:
        raise malformed(f"date {day!r} is not a calendar day") from None
    if not cds.isdigit() or int(cds) < 1:
        raise malformed(f"number of CDs {cds!r} is not a whole number of at least 1")
    if re.fullmatch(r"\d+(\.\d{1,2})?", dollars) is None:
        raise malformed(f"dollar value {dollars!r} is not an amount in dollars and cents")
    return customer, day, int(cds), Decimal(dollars)


def _cdnow_products(cds: int, dollars: Decimal) -> list[dict[str, Any]]:
    """Split an order's value over its CDs in whole cents, the leftover cents going to the first CDs."""
    base, leftover = divmod(int(dollars * 100), cds)
    price_groups = [(base + 1, leftover), (base, cds - leftover)]
    return [
        {"product_id": "cd", "name": "CD", "category": "music", "price": cents / 100, "quantity": count}
        for cents, count in price_groups
        if count > 0
    ]


def read_calls(path: Path, file_format: str = "auto", locales: str = "mixed") -> list[RecordedCall]:
    """Read every call of `path`, in time order (stable, so equal times keep file order)."""
    if not path.is_file():
        raise ReplayFormatError(f"{path}: no such file")
    file_format = detect_format(path) if file_format == "auto" else file_format
    readers = {
        "rees46": lambda: read_rees46(path, locales),
        "segment": lambda: read_segment(path),
        "cdnow": lambda: read_cdnow(path, locales),
    }
    if file_format not in readers:
        raise ReplayFormatError(f"unknown format {file_format!r}; use one of {sorted(readers)}")
    calls = list(readers[file_format]())
    calls.sort(key=lambda call: call.at)
    return calls


def _batches(calls: list[tuple[datetime, dict[str, Any]]]) -> Iterator[list[tuple[datetime, dict[str, Any]]]]:
    batch: list[tuple[datetime, dict[str, Any]]] = []
    size = 0
    for at, body in calls:
        encoded = len(json.dumps(body))
        if batch and (len(batch) >= MAX_BATCH_CALLS or size + encoded > MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append((at, body))
        size += encoded
    if batch:
        yield batch


async def replay(
    calls: list[RecordedCall],
    *,
    api_url: str,
    write_key: str,
    time_scale: float,
    start: datetime | None = None,
    show_progress: bool = True,
) -> ReplayStats:
    """Send `calls` to the API, shifted to start at `start` (default now) and paced by `time_scale`."""
    stats = ReplayStats(calls=len(calls))
    if not calls:
        return stats
    stats.first_at, stats.last_at = calls[0].at, calls[-1].at
    stats.users = len({call.body.get("userId") for call in calls if call.body.get("type") == "identify"})
    for call in calls:
        name = call.body.get("event") or call.body["type"]
        stats.by_event[name] = stats.by_event.get(name, 0) + 1

    origin = calls[0].at
    start = start or datetime.now(UTC)
    shifted = [(start + (call.at - origin) / time_scale, call.body) for call in calls]
    began = time.perf_counter()

    progress = Progress(
        TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not show_progress
    )
    async with httpx.AsyncClient(base_url=api_url, auth=(write_key, ""), timeout=60) as client:
        with progress:
            task = progress.add_task("replay", total=len(shifted))
            position = 0
            while position < len(shifted):
                now = datetime.now(UTC)
                due_end = position
                while due_end < len(shifted) and shifted[due_end][0] <= now:
                    due_end += 1
                if due_end == position:
                    wait = (shifted[position][0] - now).total_seconds()
                    await asyncio.sleep(min(max(wait, 0.001), 1.0))
                    continue
                for batch in _batches(shifted[position:due_end]):
                    # A call sent later than planned (the API was busy) is stamped when it is sent:
                    # journeys and replay share one clock, so no event may arrive already in the past.
                    sent_at = datetime.now(UTC)
                    stamped = [{**body, "timestamp": max(at, sent_at).isoformat()} for at, body in batch]
                    stats.max_lag_seconds = max(stats.max_lag_seconds, (sent_at - batch[0][0]).total_seconds())
                    stats.last_stamp = max(sent_at, batch[-1][0])
                    result = await _post_batch(client, stamped)
                    stats.stored += result["stored"]
                    stats.duplicates += result["duplicates"]
                    progress.advance(task, len(batch))
                position = due_end
    stats.seconds = time.perf_counter() - began
    return stats


async def _post_batch(client: httpx.AsyncClient, batch: list[dict[str, Any]]) -> dict[str, Any]:
    body = {"batch": batch, "sentAt": datetime.now(UTC).isoformat()}
    for attempt in range(1, 6):
        try:
            response = await client.post("/v1/batch", json=body)
        except httpx.TransportError as error:
            log.warning("replay.request_failed", attempt=attempt, error=str(error))
            await asyncio.sleep(attempt)
            continue
        if response.status_code == 200:
            return response.json()
        if response.status_code >= 500:
            log.warning("replay.server_error", attempt=attempt, status=response.status_code)
            await asyncio.sleep(attempt)
            continue
        raise RuntimeError(f"the API rejected a batch with {response.status_code}: {response.text[:500]}")
    raise RuntimeError("the API did not accept a batch after 5 attempts")
