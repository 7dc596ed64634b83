"""Browse abandonment: email a shopper about a product they keep coming back to without carting it.

Trigger: `Product Viewed` that is at least the second view of that product by the customer in
24 hours (`product_views_24h`, counted at ingest, so first views never reach Temporal).
1. Twenty-four hours after the qualifying view, one email with the viewed product (image, name,
   price, link) and up to three similar products: same category, in stock, never bought by the
   customer. Products that qualify meanwhile join the email, up to three viewed products in all,
   each listed once.
Follows `Product Added` and `Order Completed` while it waits: a product added to the cart or
bought at or after the entry began is dropped, and is not listed again in this entry. Such
events stored but not yet delivered when the email is due count as delivered. While the contact
policy defers the email, they cancel it only once every listed product is carted or bought.
At send time a listed product that is out of stock or has no known price is left out.
Exits when no listed product is left (carted, bought, out of stock), or on an order that does not
list its products, since the customer may have bought the viewed product.
Under the contact policy the email has priority 3, below the default of 5, and it is dropped when
the policy would delay it past 48 hours after the qualifying view.
Re-entry: not within 7 days of this journey's last email to the customer.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from bisik.commerce import product_from, product_ids_named
    from bisik.models import (
        PRODUCTS_CARTED_OR_BOUGHT,
        CartedOrBought,
        CartedOrBoughtRequest,
        CatalogProduct,
        JourneyEvent,
        JourneyInput,
        JourneyResult,
        ReentryRule,
    )
    from workflows.matching import EventView, track
    from workflows.toolkit import PROFILE_TIMEOUT, Journey, JourneyExit

MAX_VIEWED_PRODUCTS = 3
MAX_SIMILAR_PRODUCTS = 3
# Below the default of 5, so a cart reminder competing for the same frequency-cap slot goes first.
EMAIL_PRIORITY = 3
# The contact policy may defer the email, but drops it rather than send it later than this many
# hours after the qualifying view.
EMAIL_DEADLINE_HOURS = 48
# Patch id: the email names its viewed products so a cart add or order not yet delivered skips it.
SKIP_CARTED_OR_BOUGHT = "browse-skip-carted-or-bought"


def _viewed_at_least_twice(event: EventView) -> bool:
    """A second view within 24 hours of a product not added to the cart in those 24 hours.

    Both counts come from ingest, because a cart add from before the entry never reaches this
    journey: the relay delivers listened-to events only to an active run.
    """
    views = event.derived.get("product_views_24h")
    carted = event.derived.get("product_carted_24h", 0)
    return isinstance(views, int) and not isinstance(views, bool) and views >= 2 and not carted


QUALIFYING_VIEW = track("Product Viewed", where=_viewed_at_least_twice)
PRODUCT_ADDED = track("Product Added")
ORDER_COMPLETED = track("Order Completed")


class BrowseState(BaseModel):
    email_due_at: datetime | None = None
    viewed: list[CatalogProduct] = Field(
        default_factory=list, description="Products to email about, as their qualifying view described them."
    )
    carted_or_bought: list[str] = Field(
        default_factory=list, description="Product ids carted or bought during this entry, never listed again."
    )


@workflow.defn(name="browse_abandonment")
class BrowseAbandonment(Journey[BrowseState]):
    name = "browse_abandonment"
    starts_on = (QUALIFYING_VIEW,)
    listens_to = (PRODUCT_ADDED, ORDER_COMPLETED)
    reentry = ReentryRule.after_last_message(days=7)
    State = BrowseState

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        return await self.play()

    async def steps(self) -> None:
        if self.state.email_due_at is None:
            self.state.email_due_at = self.after(self.entered_at, hours=24)
            self._note_view(self.trigger)

        await self._follow_products(until=self.state.email_due_at)
        # Journeys that began before this change take the old path. They all end within 48 hours
        # of their qualifying view, so after that `workflow.deprecate_patch` can replace this check.
        catch_up = workflow.patched(SKIP_CARTED_OR_BOUGHT)
        if catch_up:
            await self._drop_stored_carted_or_bought()

        products = await self._products_to_show()
        currency = _currency_of(products)
        similar = await self._similar_to(products, currency)
        sent = await self.send(
            "browse_abandonment",
            step="email",
            data={"products": _listing(products), "similar": _listing(similar), "currency": currency},
            priority=EMAIL_PRIORITY,
            deadline=self.after(self.entered_at, hours=EMAIL_DEADLINE_HOURS),
            skip_if_products=[product.product_id for product in products] if catch_up else None,
        )
        if sent.status == "dropped":
            # The message log keeps the policy's reason on the message row.
            raise JourneyExit("email dropped by the contact policy")
        if sent.status == "skipped" and sent.reason == PRODUCTS_CARTED_OR_BOUGHT:
            raise JourneyExit("viewed products carted or bought")

    async def _follow_products(self, *, until: datetime) -> None:
        """List products that qualify and drop those carted or bought, until `until`.

        Cart adds and orders stored but not yet delivered when the email is due are read back
        from the event store before it is written (`_drop_stored_carted_or_bought`).
        """
        while True:
            event = await self.wait_for(QUALIFYING_VIEW, PRODUCT_ADDED, ORDER_COMPLETED, until=until)
            if event is None:
                return
            if event.name == "Product Viewed":
                self._note_view(event)
            elif event.timestamp >= self.entered_at:
                # Like a goal, a cart change or order from before this entry belongs to an earlier visit.
                self._drop_carted_or_bought(event)

    def _note_view(self, event: JourneyEvent | None) -> None:
        product = None if event is None else _product_viewed(event.properties)
        if product is None or product.product_id in self.state.carted_or_bought:
            return
        if any(listed.product_id == product.product_id for listed in self.state.viewed):
            return
        if len(self.state.viewed) < MAX_VIEWED_PRODUCTS:
            self.state.viewed.append(product)

    async def _drop_stored_carted_or_bought(self) -> None:
        """Drop the products carted or bought since the entry began, delivered to the journey or not."""
        found = await workflow.execute_activity(
            "find_carted_or_bought",
            CartedOrBoughtRequest(customer_id=self.customer_id, since=self.entered_at),
            result_type=CartedOrBought,
            start_to_close_timeout=PROFILE_TIMEOUT,
        )
        if found.order_without_products:
            raise JourneyExit("order placed without a readable product list")
        self._drop(found.product_ids)

    def _drop(self, product_ids: list[str]) -> None:
        self.state.carted_or_bought.extend(
            product_id for product_id in product_ids if product_id not in self.state.carted_or_bought
        )
        self.state.viewed = [product for product in self.state.viewed if product.product_id not in product_ids]
        if not self.state.viewed:
            raise JourneyExit("viewed products carted or bought")

    def _drop_carted_or_bought(self, event: JourneyEvent) -> None:
        product_ids = product_ids_named(event.name, event.properties)
        if event.name == "Order Completed" and not product_ids:
            raise JourneyExit("order placed without a readable product list")
        self._drop(product_ids)

    async def _products_to_show(self) -> list[CatalogProduct]:
        """Return the listed products with the catalog's current details.

        Products out of stock or without a known price are left out.
        """
        in_catalog = await self._load_products([product.product_id for product in self.state.viewed])
        available = []
        for viewed in self.state.viewed:
            product = _fill_in(in_catalog.get(viewed.product_id), viewed)
            if product.price is not None and (product.stock is None or product.stock > 0):
                available.append(product)
        if not available:
            raise JourneyExit("viewed products out of stock or without a price")
        currency = _currency_of(available)
        return [product for product in available if product.currency in (None, currency)]

    async def _similar_to(self, products: list[CatalogProduct], currency: str | None) -> list[CatalogProduct]:
        categories = list(dict.fromkeys(product.category for product in products if product.category))
        excluded = [product.product_id for product in self.state.viewed] + self.state.carted_or_bought
        # Ask for more than are shown: products without a price or in another currency are left out.
        candidates = await self.similar_products(categories, exclude=excluded, limit=MAX_SIMILAR_PRODUCTS * 2)
        fitting = [
            product
            for product in candidates
            if product.price is not None and product.currency in (None, currency)
        ]
        return fitting[:MAX_SIMILAR_PRODUCTS]

    async def _load_products(self, product_ids: list[str]) -> dict[str, CatalogProduct]:
        products = await workflow.execute_activity(
            "load_products",
            product_ids,
            result_type=list[CatalogProduct],
            start_to_close_timeout=PROFILE_TIMEOUT,
        )
        return {product.product_id: product for product in products}


def _product_viewed(properties: dict[str, Any]) -> CatalogProduct | None:
    """Read the product a view describes. The price stays None when the view sends none."""
    product = product_from(properties)
    if product is None:
        return None
    price = properties.get("price")
    known_price = isinstance(price, (int, float)) and not isinstance(price, bool) and 0 <= price < math.inf
    return CatalogProduct(
        product_id=product.product_id,
        name=product.name,
        brand=product.brand,
        category=product.category,
        price=product.price if known_price else None,
        currency=properties.get("currency") if isinstance(properties.get("currency"), str) else None,
        image_url=product.image_url,
        url=product.url,
    )


def _fill_in(current: CatalogProduct | None, viewed: CatalogProduct) -> CatalogProduct:
    """Prefer the catalog's current details, and fill the fields it lacks from the view."""
    if current is None:
        return viewed
    missing = {field: getattr(viewed, field) for field, value in current if value is None}
    return current.model_copy(update=missing)


def _currency_of(products: list[CatalogProduct]) -> str | None:
    """Return the first currency named, because the email shows every price in one currency."""
    return next((product.currency for product in products if product.currency), None)


def _web_url(url: str | None) -> str | None:
    """Return `url` only if it is an http(s) address.

    Product properties are sent from browsers with a public write key, so a `javascript:` link
    could arrive in them.
    """
    return url if url is not None and url.startswith(("https://", "http://")) else None


def _listing(products: list[CatalogProduct]) -> list[dict[str, Any]]:
    return [
        {
            "product_id": product.product_id,
            "name": product.name,
            "category": product.category,
            "price": product.price,
            "quantity": 1,
            "image_url": _web_url(product.image_url),
            "url": _web_url(product.url),
        }
        for product in products
    ]
