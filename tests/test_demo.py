"""`bisik demo` on the real REES46 file, its counts checked against counts computed here from the CSV."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from workers.stack import free_port

REES46 = Path(__file__).resolve().parents[2] / "shared" / "data" / "rees46" / "2019-Oct-first-3h.csv"


def expected_from_csv(path: Path) -> tuple[set[str], set[str], set[tuple[str, str]]]:
    """Return (users due cart reminders, users who ordered after their last cart add, orders).

    A shopper gets reminders when no purchase of theirs happened at or after their last cart add;
    the purchase rows of one user at one moment are one order.
    """
    cart_times: dict[str, list[str]] = defaultdict(list)
    purchase_times: dict[str, list[str]] = defaultdict(list)
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            if row["event_type"] == "cart":
                cart_times[row["user_id"]].append(row["event_time"])
            elif row["event_type"] == "purchase":
                purchase_times[row["user_id"]].append(row["event_time"])
    reminded, ordered_after = set(), set()
    for user, times in cart_times.items():
        last_cart = max(times)
        if any(bought >= last_cart for bought in purchase_times.get(user, [])):
            ordered_after.add(user)
        else:
            reminded.add(user)
    orders = {(user, moment) for user, moments in purchase_times.items() for moment in moments}
    return reminded, ordered_after, orders


def user_of(address: str) -> str:
    return address.removeprefix("user-").removesuffix("@example.com")


@pytest.mark.timeout(600)
async def test_demo_counts_match_the_csv(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    environment = {
        **os.environ,
        "BISIK_HOME": str(tmp_path / ".bisik"),
        "BISIK_API_PORT": str(free_port()),
        "BISIK_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "BISIK_TEMPORAL_UI_PORT": str(free_port()),
        "BISIK_SMTP_PORT": str(free_port()),
        "BISIK_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bisik.cli", "demo", str(REES46),
        "--time-scale", "720", "--report-json", str(report_path),
        env=environment, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), timeout=540)

    assert process.returncode == 0, output.decode()[-4000:]
    report = json.loads(report_path.read_text())
    reminded, ordered_after, orders = expected_from_csv(REES46)
    mail = [json.loads(line) for line in (tmp_path / ".bisik" / "demo" / "mail" / "index.jsonl").read_text().splitlines()]
    first_reminders = [user_of(entry["to"][0]) for entry in mail if entry["step"] == "reminder_1"]
    second_reminders = [user_of(entry["to"][0]) for entry in mail if entry["step"] == "reminder_2"]
    thank_yous = [entry for entry in mail if entry["journey"] == "post_purchase" and entry["step"].startswith("thank_you:")]

    assert report["settled"] is True
    assert report["events_by_name"] == {"Order Completed": 214, "Product Added": 165, "Product Viewed": 17056, "identify": 4505}
    assert report["customers"] == 4505
    assert sorted(first_reminders) == sorted(reminded)
    assert sorted(second_reminders) == sorted(reminded)
    assert set(first_reminders).isdisjoint(ordered_after)
    assert len(thank_yous) == len(orders)
    assert len({entry["step"] for entry in thank_yous}) == len(orders)
    assert report["journeys"]["abandoned_cart"]["completed"] == len(reminded)
    assert report["failures"] == {"messages_failed_or_unknown": 0, "events_waiting_in_outbox": 0, "events_retried_in_outbox": 0}
    sent_locales = {row["locale"] for row in report["messages"] if row["status"] == "sent"}
    assert sent_locales == {"en", "id"}
    assert all(row["reason"] for row in report["messages"] if row["status"] == "skipped")
