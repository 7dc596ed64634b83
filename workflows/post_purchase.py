"""Post-purchase: thank the customer for each order at once, and ask for a review two weeks later.

Trigger: `Order Completed`. Further orders during the journey are handled by the same run.
1. A thank-you with the items and total right away, once per order id (transactional: it goes
   out even to customers who unsubscribed from marketing).
2. Fourteen days after each order, a review request with up to three products from the catalog
   in the order's categories that are in stock and not bought yet; skipped when `Review
   Submitted` arrived for that order (or without an order id, for any order).
Ends when no review request is pending. Re-entry: always, each order on its own.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from bisik.models import JourneyEvent, JourneyInput, JourneyResult
    from bisik.commerce import Order, order_from
    from workflows.matching import track
    from workflows.toolkit import Journey

ORDER_COMPLETED = track("Order Completed")
REVIEW_SUBMITTED = track("Review Submitted")


class PendingReview(BaseModel):
    order: Order
    due_at: datetime


class PostPurchaseState(BaseModel):
    pending_reviews: list[PendingReview] = Field(default_factory=list)
    orders_thanked: list[str] = Field(default_factory=list)


@workflow.defn(name="post_purchase")
class PostPurchase(Journey[PostPurchaseState]):
    name = "post_purchase"
    starts_on = (ORDER_COMPLETED,)
    listens_to = (REVIEW_SUBMITTED,)
    State = PostPurchaseState

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        return await self.play()

    async def steps(self) -> None:
        if self.trigger is not None and not self.state.orders_thanked:
            await self._thank(self.trigger)

        while self.state.pending_reviews:
            next_due = min(review.due_at for review in self.state.pending_reviews)
            event = await self.wait_for(ORDER_COMPLETED, REVIEW_SUBMITTED, until=next_due)
            if event is None:
                await self._ask_for_due_reviews()
            elif event.name == "Order Completed":
                await self._thank(event)
            else:
                self._drop_reviewed(event)

    async def _thank(self, event: JourneyEvent) -> None:
        order = order_from(event.properties, fallback_id=event.message_id)
        if order.order_id in self.state.orders_thanked:
            return
        await self.send(
            "order_thank_you",
            step=f"thank_you:{order.order_id}",
            data={"order": order.template_data()},
            transactional=True,
            once_per_customer=True,
        )
        self.state.orders_thanked.append(order.order_id)
        self.state.pending_reviews.append(
            PendingReview(order=order, due_at=self.after(event.timestamp, days=14))
        )

    async def _ask_for_due_reviews(self) -> None:
        now = workflow.now()
        for review in [review for review in self.state.pending_reviews if review.due_at <= now]:
            order = review.order
            cross_sell = await self.similar_products(
                [item.category for item in order.items if item.category],
                exclude=[item.product_id for item in order.items],
            )
            await self.send(
                "review_request",
                step=f"review_request:{order.order_id}",
                data={"order": order.template_data(), "recommendations": [p.model_dump() for p in cross_sell]},
                once_per_customer=True,
            )
            self.state.pending_reviews.remove(review)

    def _drop_reviewed(self, review: JourneyEvent) -> None:
        order_id = review.properties.get("order_id")
        self.state.pending_reviews = [
            pending
            for pending in self.state.pending_reviews
            if order_id is not None and pending.order.order_id != str(order_id)
        ]
