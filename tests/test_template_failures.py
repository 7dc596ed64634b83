"""A template that fails for one customer fails that one message only, and nothing is sent twice."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from activities.templates import default_template_dir
from bisik.settings import Settings
from tests.journey_fixtures import JourneyHarness


@pytest.fixture
def strict_templates(settings: Settings, tmp_path: Path) -> Path:
    """The shipped templates, with a thank-you that needs a loyalty tier some customers lack."""
    folder = tmp_path / "templates"
    shutil.copytree(default_template_dir(), folder)
    thank_you = folder / "email" / "order_thank_you.en.yaml"
    thank_you.write_text(
        thank_you.read_text().replace(
            "Thank you for shopping with {{ brand_name }}.",
            "Thank you for shopping with {{ brand_name }}, {{ customer.traits.loyalty_tier }} member.",
        )
    )
    settings.template_dir = folder
    return folder


async def test_missing_variable_fails_only_that_customer(
    strict_templates: Path, journeys: JourneyHarness
) -> None:
    customers = {}
    for number in range(8):
        traits = {} if number == 3 else {"loyalty_tier": "Gold"}
        customers[number] = await journeys.customer(f"many-{number}", **traits)
    orders = [
        await journeys.event(f"many-{number}", "Order Completed", order_id=f"o-{number}", total=5.0, products=[{"product_id": "p", "name": "Tea", "price": 5.0}])
        for number in range(8)
    ]

    for order in orders:
        await journeys.deliver("post_purchase", order)
    await journeys.env.sleep(timedelta(minutes=1))
    # A rerun from scratch: the journeys are gone and every order is delivered again.
    await journeys.terminate_open_workflows()
    for order in orders:
        await journeys.deliver("post_purchase", order)
    await journeys.env.sleep(timedelta(minutes=1))

    for number, customer in customers.items():
        thanks = [row for row in await journeys.messages(customer) if row["template"] == "order_thank_you"]
        assert len(thanks) == 1, number
        mails = [mail for mail in journeys.mail_to(f"many-{number}@example.com") if "Thanks" in mail.subject]
        if number == 3:
            assert thanks[0]["status"] == "failed"
            assert "loyalty_tier" in thanks[0]["reason"]
            assert mails == []
        else:
            assert thanks[0]["status"] == "sent"
            assert len(mails) == 1
            assert "Gold member" in mails[0].text()
