"""`bisik replay`: reading CDNOW, REES46 and Segment files, and replaying CDNOW through the API."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from bisik.replay import ReplayFormatError, RecordedCall, detect_format, read_calls, replay
from tests.conftest import WRITE_KEY, ApiServer

CDNOW = Path(__file__).resolve().parents[2] / "shared" / "data" / "cdnow" / "CDNOW_master.txt"

# Written in the published file's layout: a header, right-aligned columns, CRLF line ends.
CDNOW_EXCERPT = (
    " customer_id  date number_of_cds  dollar_value\r\n"
    " 00007 19970101  1   11.77\r\n"
    " 00007 19970315  3   12.50\r\n"
    " 00008 19970102  2   29.33\r\n"
    " 00008 19970102  1    0.00\r\n"
)

REES46_HEADER = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
REES46_ROWS = [
    "2019-10-01 00:00:00 UTC,view,100,2001,electronics.smartphone,samsung,199.99,501,s-1",
    "2019-10-01 00:00:05 UTC,cart,100,2001,electronics.smartphone,samsung,199.99,501,s-1",
    "2019-10-01 00:00:07 UTC,view,300,2003,,,5.50,502,s-2",
    "2019-10-01 00:00:10 UTC,remove_from_cart,100,2001,electronics.smartphone,samsung,199.99,501,s-1",
    "2019-10-01 00:01:00 UTC,purchase,100,2001,electronics.smartphone,samsung,199.99,501,s-1",
    "2019-10-01 00:01:00 UTC,purchase,200,2002,,,10.00,501,s-1",
    "2019-10-01 00:02:00 UTC,purchase,300,2003,,,5.50,502,s-2",
    "2019-10-01 00:03:00 UTC,purchase,300,2003,,,5.50,501,s-1",
]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def orders_of(calls: list[RecordedCall]) -> list[dict]:
    return [call.body for call in calls if call.body.get("event") == "Order Completed"]


def products_total(order: dict) -> Decimal:
    products = order["properties"]["products"]
    return sum((Decimal(str(product["price"])) * product["quantity"] for product in products), Decimal(0))


# CDNOW


def test_cdnow_one_identify_per_customer(tmp_path: Path) -> None:
    calls = read_calls(write(tmp_path, "cdnow.txt", CDNOW_EXCERPT), "cdnow")

    identifies = [call.body for call in calls if call.body["type"] == "identify"]
    assert [body["userId"] for body in identifies] == ["00007", "00008"]
    assert identifies[0]["traits"]["email"] == "user-00007@example.com"
    assert identifies[0]["traits"]["locale"] in ("en", "id")
    # Each customer is identified before, or at the same moment as, their first order.
    first_call_of = {}
    for call in calls:
        first_call_of.setdefault(call.body["userId"], call.body["type"])
    assert first_call_of == {"00007": "identify", "00008": "identify"}


def test_cdnow_one_order_per_line(tmp_path: Path) -> None:
    calls = read_calls(write(tmp_path, "cdnow.txt", CDNOW_EXCERPT), "cdnow")

    orders = orders_of(calls)
    assert [order["properties"]["order_id"] for order in orders] == [
        "cdnow-00007-19970101-2",
        "cdnow-00008-19970102-4",
        "cdnow-00008-19970102-5",
        "cdnow-00007-19970315-3",
    ]
    assert [order["properties"]["total"] for order in orders] == [11.77, 29.33, 0.0, 12.5]
    assert {order["properties"]["currency"] for order in orders} == {"USD"}
    assert len({order["messageId"] for order in orders}) == 4


def test_cdnow_products_add_up_to_total(tmp_path: Path) -> None:
    calls = read_calls(write(tmp_path, "cdnow.txt", CDNOW_EXCERPT), "cdnow")

    orders = {order["properties"]["order_id"]: order for order in orders_of(calls)}
    three_cds = orders["cdnow-00007-19970315-3"]
    assert three_cds["properties"]["products"] == [
        {"product_id": "cd", "name": "CD", "category": "music", "price": 4.17, "quantity": 2},
        {"product_id": "cd", "name": "CD", "category": "music", "price": 4.16, "quantity": 1},
    ]
    for order in orders.values():
        assert products_total(order) == Decimal(str(order["properties"]["total"]))
        assert sum(product["quantity"] for product in order["properties"]["products"]) >= 1


def test_cdnow_orders_dated_on_their_day(tmp_path: Path) -> None:
    calls = read_calls(write(tmp_path, "cdnow.txt", CDNOW_EXCERPT), "cdnow")

    days = [call.at.date() for call in calls if call.body.get("event") == "Order Completed"]
    assert days == [date(1997, 1, 1), date(1997, 1, 2), date(1997, 1, 2), date(1997, 3, 15)]
    assert {call.at.tzinfo for call in calls} == {UTC}
    assert calls[-1].at == datetime(1997, 3, 15, 12, tzinfo=UTC)


def test_cdnow_without_header_detected(tmp_path: Path) -> None:
    path = write(tmp_path, "cdnow.txt", CDNOW_EXCERPT.split("\r\n", 1)[1])

    assert detect_format(path) == "cdnow"
    assert len(orders_of(read_calls(path))) == 4


def test_cdnow_rereading_gives_same_message_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "cdnow.txt", CDNOW_EXCERPT)

    first = [call.body["messageId"] for call in read_calls(path, "cdnow")]
    second = [call.body["messageId"] for call in read_calls(path, "cdnow")]

    assert first == second


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (" 00009 1997031  1   11.77", "date '1997031' is not YYYYMMDD"),
        (" 00009 19970231  1   11.77", "date '19970231' is not a calendar day"),
        (" 00009 19970301  1", "expected 4 fields, got 3"),
        (" 00009 19970301  1   11.77  x", "expected 4 fields, got 5"),
        (" 00009 19970301  0   11.77", "number of CDs '0' is not a whole number of at least 1"),
        (" 00009 19970301  two 11.77", "number of CDs 'two' is not a whole number of at least 1"),
        (" 00009 19970301  1   nan", "dollar value 'nan' is not an amount in dollars and cents"),
        (" 00009 19970301  1   -3.00", "dollar value '-3.00' is not an amount in dollars and cents"),
    ],
)
def test_cdnow_malformed_line_raises_naming_line(tmp_path: Path, line: str, problem: str) -> None:
    path = write(tmp_path, "cdnow.txt", CDNOW_EXCERPT + line + "\r\n")

    with pytest.raises(ReplayFormatError) as raised:
        read_calls(path, "cdnow")

    assert str(raised.value) == f"{path}:6: {problem} in {line.strip()!r}, expected `customer YYYYMMDD cds dollars`"


def test_cdnow_header_only_skipped_on_first_line(tmp_path: Path) -> None:
    path = write(tmp_path, "cdnow.txt", CDNOW_EXCERPT + CDNOW_EXCERPT.splitlines()[0] + "\r\n")

    with pytest.raises(ReplayFormatError, match=r"cdnow.txt:6: date 'date' is not YYYYMMDD"):
        read_calls(path, "cdnow")


# REES46


def test_rees46_one_identify_per_user(tmp_path: Path) -> None:
    calls = read_calls(write(tmp_path, "rees46.csv", REES46_HEADER + "\n".join(REES46_ROWS) + "\n"))

    identifies = [call.body for call in calls if call.body["type"] == "identify"]
    assert [body["userId"] for body in identifies] == ["501", "502"]
    assert identifies[1]["traits"]["email"] == "user-502@example.com"


def test_rees46_maps_view_cart_and_remove(tmp_path: Path) -> None:
    calls = read_calls(write(tmp_path, "rees46.csv", REES46_HEADER + "\n".join(REES46_ROWS) + "\n"))

    tracks = [call.body for call in calls if call.body["type"] == "track" and call.body["event"] != "Order Completed"]
    assert [(body["userId"], body["event"]) for body in tracks] == [
        ("501", "Product Viewed"),
        ("501", "Product Added"),
        ("502", "Product Viewed"),
        ("501", "Product Removed"),
    ]
    viewed = tracks[0]["properties"]
    assert viewed["product_id"] == "100"
    assert viewed["name"] == "Samsung Smartphone"
    assert viewed["category"] == "electronics.smartphone"
    assert viewed["brand"] == "samsung"
    assert viewed["price"] == 199.99
    assert tracks[0]["context"] == {"session_id": "s-1"}
    unbranded = tracks[2]["properties"]
    assert unbranded["category"] == "2003"
    assert "brand" not in unbranded


def test_rees46_purchases_at_one_moment_form_one_order(tmp_path: Path) -> None:
    calls = read_calls(write(tmp_path, "rees46.csv", REES46_HEADER + "\n".join(REES46_ROWS) + "\n"))

    orders = orders_of(calls)
    assert [(order["userId"], len(order["properties"]["products"])) for order in orders] == [
        ("501", 2),
        ("502", 1),
        ("501", 1),
    ]
    first = orders[0]["properties"]
    assert first["order_id"] == f"501-{int(datetime(2019, 10, 1, 0, 1, tzinfo=UTC).timestamp())}"
    assert first["total"] == 209.99
    assert [product["product_id"] for product in first["products"]] == ["100", "200"]
    assert orders[0]["messageId"] != orders[2]["messageId"]


def test_rees46_unknown_event_type_raises(tmp_path: Path) -> None:
    row = "2019-10-01 00:04:00 UTC,wishlist,100,2001,,,1.00,501,s-1"
    path = write(tmp_path, "rees46.csv", REES46_HEADER + "\n".join([*REES46_ROWS, row]) + "\n")

    with pytest.raises(ReplayFormatError, match=r"rees46.csv:10: unknown event_type 'wishlist'"):
        read_calls(path)


def test_rees46_wrong_columns_raise(tmp_path: Path) -> None:
    path = write(tmp_path, "rees46.csv", "event_time,event_type,product_id\n2019-10-01 00:00:00 UTC,view,1\n")

    with pytest.raises(ReplayFormatError, match="expected the columns"):
        read_calls(path)


# Segment JSON lines


SEGMENT_LINES = [
    {"type": "identify", "userId": "u-1", "traits": {"email": "sari@example.com"}, "originalTimestamp": "2026-01-05T08:00:00Z", "messageId": "m-1"},
    {"type": "track", "userId": "u-1", "event": "Product Viewed", "properties": {"product_id": "p-1"}, "timestamp": "2026-01-05T07:59:00+07:00"},
    {"type": "page", "anonymousId": "a-1", "name": "Home", "timestamp": "2026-01-05T09:00:00"},
]


def test_segment_lines_read_in_time_order(tmp_path: Path) -> None:
    text = json.dumps(SEGMENT_LINES[0]) + "\n\n" + "\n".join(json.dumps(line) for line in SEGMENT_LINES[1:]) + "\n"
    path = write(tmp_path, "calls.jsonl", text)

    calls = read_calls(path)

    assert detect_format(path) == "segment"
    assert [call.body["type"] for call in calls] == ["track", "identify", "page"]
    assert [call.at for call in calls] == [
        datetime(2026, 1, 5, 0, 59, tzinfo=UTC),
        datetime(2026, 1, 5, 8, 0, tzinfo=UTC),
        datetime(2026, 1, 5, 9, 0, tzinfo=UTC),
    ]
    assert calls[1].body["messageId"] == "m-1"
    assert calls[0].body["messageId"].startswith("replay-")
    assert calls[0].body["properties"] == {"product_id": "p-1"}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"userId": "u-1", "timestamp": "2026-01-05T08:00:00Z"}', "expected a Segment call with a `type`"),
        ('{"type": "track", "event": "X", "userId": "u-1"}', "a replayed call needs a `timestamp`"),
        ('{"type": "track", "event": "X", "userId": "u-1", "timestamp": "yesterday"}', "timestamp 'yesterday' is not ISO 8601"),
    ],
)
def test_segment_malformed_line_raises_naming_line(tmp_path: Path, line: str, problem: str) -> None:
    path = write(tmp_path, "calls.jsonl", json.dumps(SEGMENT_LINES[0]) + "\n" + line + "\n")

    with pytest.raises(ReplayFormatError) as raised:
        read_calls(path, "segment")

    assert str(raised.value).startswith(f"{path}:2: {problem}")


# Replaying through the API


@pytest.mark.timeout(180)
async def test_cdnow_excerpt_replayed_into_postgres(
    tmp_path: Path, api_server: ApiServer, pool: asyncpg.Pool
) -> None:
    with CDNOW.open(encoding="utf-8", newline="") as file:
        excerpt = [next(file) for _ in range(300)]
    path = write(tmp_path, "cdnow-300.txt", "".join(excerpt))
    lines = [line.split() for line in excerpt[1:]]
    customers = sorted({line[0] for line in lines})
    calls = read_calls(path, "cdnow")

    # The excerpt spans about 18 months; at this scale that is about 3 seconds.
    stats = await replay(calls, api_url=api_server.url, write_key=WRITE_KEY, time_scale=2e7, show_progress=False)

    assert stats.calls == len(lines) + len(customers)
    assert stats.stored == stats.calls
    assert stats.duplicates == 0
    counts = Counter(
        (row["type"], row["name"]) for row in await pool.fetch("SELECT type, name FROM events")
    )
    assert counts == {("track", "Order Completed"): len(lines), ("identify", None): len(customers)}
    rows = await pool.fetch("SELECT user_id, email, traits FROM customers WHERE merged_into IS NULL ORDER BY user_id")
    assert [row["user_id"] for row in rows] == customers
    assert all(row["email"] == f"user-{row['user_id']}@example.com" for row in rows)
    assert all(row["traits"]["locale"] in ("en", "id") for row in rows)

    # Every line is one stored order of its customer, with the file's total, in the file's order.
    stored = await pool.fetch(
        """
        SELECT c.user_id, e.properties
        FROM events e JOIN customers c ON c.id = e.customer_id
        WHERE e.name = 'Order Completed'
        ORDER BY c.user_id, e.timestamp, e.id
        """
    )
    assert [(row["user_id"], row["properties"]["total"]) for row in stored] == sorted(
        ((line[0], float(line[3])) for line in lines), key=lambda pair: pair[0]
    )
    assert len({row["properties"]["order_id"] for row in stored}) == len(lines)
    assert all(products_total({"properties": row["properties"]}) == Decimal(str(row["properties"]["total"])) for row in stored)


@pytest.mark.timeout(180)
async def test_cdnow_replayed_twice_stores_nothing_new(
    tmp_path: Path, api_server: ApiServer, pool: asyncpg.Pool
) -> None:
    with CDNOW.open(encoding="utf-8", newline="") as file:
        excerpt = [next(file) for _ in range(40)]
    calls = read_calls(write(tmp_path, "cdnow-40.txt", "".join(excerpt)), "cdnow")

    first = await replay(calls, api_url=api_server.url, write_key=WRITE_KEY, time_scale=1e8, show_progress=False)
    second = await replay(calls, api_url=api_server.url, write_key=WRITE_KEY, time_scale=1e8, show_progress=False)

    assert first.stored == len(calls)
    assert second.stored == 0
    assert second.duplicates == len(calls)
    assert await pool.fetchval("SELECT count(*) FROM events") == len(calls)


def test_real_cdnow_file_detected_without_format() -> None:
    from bisik.replay import detect_format

    assert detect_format(Path(__file__).resolve().parents[2] / "shared" / "data" / "cdnow" / "CDNOW_master.txt") == "cdnow"


def test_rees46_bad_price_names_the_line(tmp_path: Path) -> None:
    from bisik.replay import ReplayFormatError, read_calls

    csv_file = tmp_path / "bad.csv"
    csv_file.write_text(
        "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
        "2019-10-01 00:00:00 UTC,view,1,2,a.b,x,12.5,7,s\n"
        "2019-10-01 00:00:01 UTC,view,1,2,a.b,x,cheap,7,s\n"
    )

    with pytest.raises(ReplayFormatError, match=r"bad.csv:3: price 'cheap' is not a number"):
        read_calls(csv_file)
