"""Abandoned cart: remind a shopper of what they left in their cart, then offer free shipping.

Trigger: `Product Added`. Follows `Product Added` and `Product Removed` to keep the cart.
1. Four hours after the last cart change, a reminder listing the items with prices and total.
2. Twenty-four hours after the last cart change, a second reminder with a free-shipping code.
Exits on `Order Completed` placed after the cart began, when the cart is emptied, or before the
first reminder when no cart add named a product (no `product_id` or `sku`).
Re-entry: not within 24 hours of this journey's last reminder to the customer.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from bisik.models import JourneyEvent, JourneyInput, JourneyResult, ReentryRule
    from bisik.commerce import Cart, add_to_cart, remove_from_cart
    from workflows.matching import track
    from workflows.toolkit import Journey, JourneyExit

PRODUCT_ADDED = track("Product Added")
PRODUCT_REMOVED = track("Product Removed")

# Patch id: exit before the first reminder when no cart add named a product. Journeys that began
# before it end within a day of their last cart change, so `workflow.deprecate_patch` can follow.
EXIT_WITHOUT_PRODUCTS = "cart-exit-without-products"


class CartState(BaseModel):
    cart: Cart = Field(default_factory=Cart)
    last_change_at: datetime | None = None
    voucher_code: str | None = None


@workflow.defn(name="abandoned_cart")
class AbandonedCart(Journey[CartState]):
    name = "abandoned_cart"
    starts_on = (PRODUCT_ADDED,)
    listens_to = (PRODUCT_REMOVED,)
    goals = (track("Order Completed"),)
    reentry = ReentryRule.after_last_message(hours=24)
    State = CartState

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        return await self.play()

    async def steps(self) -> None:
        if self.state.last_change_at is None:
            self._apply(self.trigger)

        await self._follow_cart(quiet_hours=4)
        if workflow.patched(EXIT_WITHOUT_PRODUCTS) and not self.state.cart.items:
            # Cart adds without a product id or sku leave nothing to remind of.
            raise JourneyExit("no product in the cart")
        await self.send("cart_reminder_1", step="reminder_1", data=self._cart_data())

        await self._follow_cart(quiet_hours=24)
        await self.send(
            "cart_reminder_2",
            step="reminder_2",
            data={**self._cart_data(), "voucher_code": self._voucher_code()},
        )

    async def _follow_cart(self, *, quiet_hours: float) -> None:
        """Apply cart changes until `quiet_hours` pass after the last one; leave if the cart empties."""
        while True:
            last_change = self.state.last_change_at or self.entered_at
            quiet_from = self.after(last_change, hours=quiet_hours)
            change = await self.wait_for(PRODUCT_ADDED, PRODUCT_REMOVED, until=quiet_from)
            if change is None:
                return
            self._apply(change)
            if not self.state.cart.items:
                raise JourneyExit("cart emptied")

    def _cart_data(self) -> dict[str, object]:
        return {"cart": self.state.cart.template_data()}

    def _apply(self, event: JourneyEvent | None) -> None:
        if event is None:
            return
        if event.name == "Product Added":
            add_to_cart(self.state.cart, event.properties)
        else:
            remove_from_cart(self.state.cart, event.properties)
        last = self.state.last_change_at
        self.state.last_change_at = event.timestamp if last is None else max(last, event.timestamp)

    def _voucher_code(self) -> str:
        if self.state.voucher_code is None:
            # workflow.random() is seeded by Temporal, so a replay draws the same code.
            suffix = "".join(workflow.random().choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(6))
            self.state.voucher_code = f"FREESHIP-{suffix}"
        return self.state.voucher_code
