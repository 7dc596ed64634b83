"""Content engagement: after an e-book or a whole video, three emails that go deeper into its topic.

Trigger: `E-book Downloaded`; or `Video Completed`, or `Video Content Completed` (the name in
Segment's video spec), when the video was watched to the end:
- `percent_complete`, when it is a number, must be at least 90 (a percentage, 0 to 100);
- otherwise `position` must be at least 90% of `total_length` (both in seconds, as in Segment's
  video spec), when both are numbers and `total_length` is above zero;
- otherwise (a bare event, or values that cannot be compared) the event counts as watched.
The topic is the first non-empty property of `topic`, `category` and `genre`, then the content's
`title` or `name`. Without any of them, the emails speak of the e-book or video in general.
1. One day after the trigger: more on the topic, with a link back to the content (`url`).
2. Three days after: an idea to put it into practice, and an invitation to reply with questions.
3. Seven days after: up to three catalog products whose category equals the event's `topic` or
   `category`, in stock and not bought by the customer before, or a link to search the shop for
   the topic when there are none.
Exits: the customer unsubscribes (the next send is suppressed and the journey stops).
Re-entry: not within 7 days of this journey's last message to the customer. A download or video
during a series starts no second series: one series runs at a time, then a week of rest.
Under the contact policy the emails have priority 3, below the default of 5, so cart reminders
and welcome emails competing for a frequency-cap slot go first. A deferred email goes later and
the steps after it keep their own days, with the caps spacing them.
"""

from __future__ import annotations

import math
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, Field
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from bisik.models import CatalogProduct, JourneyEvent, JourneyInput, JourneyResult, ReentryRule
    from workflows.matching import EventView, track
    from workflows.toolkit import Journey

# A video counts as watched to the end from this share of its length, so a viewer who skips the
# credits or outro still counts.
WATCHED_SHARE = 0.9
TOPIC_PROPERTIES = ("topic", "category", "genre")
TITLE_PROPERTIES = ("title", "name")
# Subject lines show topics and titles, so longer ones are cut with an ellipsis.
MAX_SUBJECT_TEXT = 80
PICKS_LIMIT = 3
# Below the default of 5, so a cart reminder or welcome email competing for a slot goes first.
EMAIL_PRIORITY = 3


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def watched_to_end(event: EventView) -> bool:
    """Return whether a video event reports the video as watched to the end (rule in the module docstring)."""
    properties = event.properties or {}
    percent = _number(properties.get("percent_complete"))
    if percent is not None:
        return percent >= WATCHED_SHARE * 100
    position = _number(properties.get("position"))
    length = _number(properties.get("total_length"))
    if position is not None and length is not None and length > 0:
        return position >= WATCHED_SHARE * length
    return True


EBOOK_DOWNLOADED = track("E-book Downloaded")
VIDEO_COMPLETED = (
    track("Video Completed", where=watched_to_end),
    track("Video Content Completed", where=watched_to_end),
)


class Content(BaseModel):
    """The e-book or video that started the series, as the templates see it."""

    kind: Literal["ebook", "video"]
    title: str | None = None
    topic: str | None = None
    url: str | None = Field(None, description="Where the content lives. Only http and https links are kept.")
    more_path: str = Field("/", description="Path of the shop's search for the topic, or / without a topic.")
    catalog_categories: list[str] = Field(default_factory=list)


def _text(value: Any) -> str | None:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
        return " ".join(str(value).split())
    return None


def _first_text(properties: dict[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        text = _text(properties.get(name))
        if text is not None:
            return text
    return None


def _shorten(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_SUBJECT_TEXT:
        return text
    return text[: MAX_SUBJECT_TEXT - 1].rstrip() + "…"


def content_from(event: JourneyEvent) -> Content:
    """Read the content, its topic and where to find more from the trigger's properties."""
    properties = event.properties
    title = _first_text(properties, TITLE_PROPERTIES)
    topic = _first_text(properties, TOPIC_PROPERTIES) or title
    url = _text(properties.get("url"))
    if url is not None and not url.lower().startswith(("https://", "http://")):
        url = None
    categories = [text for name in ("topic", "category") if (text := _text(properties.get(name)))]
    return Content(
        kind="ebook" if event.name == "E-book Downloaded" else "video",
        title=_shorten(title),
        topic=_shorten(topic),
        url=url,
        more_path=f"/search?q={quote(topic, safe='')}" if topic else "/",
        catalog_categories=list(dict.fromkeys(categories)),
    )


def picks_data(products: list[CatalogProduct]) -> dict[str, Any]:
    """Build the item table's data: the products with a price, in the first one's currency."""
    priced = [product for product in products if product.price is not None]
    currency = priced[0].currency if priced else None
    items = [
        {
            "product_id": product.product_id,
            "name": product.name,
            "price": product.price,
            "quantity": 1,
            "image_url": product.image_url,
            "url": product.url,
        }
        for product in priced
        if product.currency == currency
    ]
    return {"items": items, "currency": currency}


@workflow.defn(name="content_engagement")
class ContentEngagement(Journey):
    name = "content_engagement"
    starts_on = (EBOOK_DOWNLOADED, *VIDEO_COMPLETED)
    reentry = ReentryRule.after_last_message(days=7)

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        return await self.play()

    async def steps(self) -> None:
        content = content_from(self.trigger)
        data = {"content": content.model_dump()}

        await self.sleep_until(self.after(self.entered_at, days=1))
        await self.send("content_deeper_1", step="deeper_1", data=data, priority=EMAIL_PRIORITY)

        await self.sleep_until(self.after(self.entered_at, days=3))
        await self.send("content_deeper_2", step="deeper_2", data=data, priority=EMAIL_PRIORITY)

        await self.sleep_until(self.after(self.entered_at, days=7))
        products = await self.similar_products(content.catalog_categories, limit=PICKS_LIMIT)
        picks = picks_data(products)
        await self.send("content_picks", step="picks", data={**data, "picks": picks}, priority=EMAIL_PRIORITY)
