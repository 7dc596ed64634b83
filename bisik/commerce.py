"""Carts and orders as Segment's e-commerce events describe them. Pure functions, safe in workflows."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field



class Product(BaseModel):
    product_id: str
    name: str
    brand: str | None = None
    category: str | None = None
    price: float = 0.0
    quantity: int = Field(1, ge=0)
    url: str | None = None
    image_url: str | None = None


class Cart(BaseModel):
    items: dict[str, Product] = Field(default_factory=dict)
    currency: str | None = None

    @property
    def total(self) -> float:
        return round(sum(item.price * item.quantity for item in self.items.values()), 2)

    def template_data(self) -> dict[str, Any]:
        return {
            "items": [item.model_dump() for item in self.items.values()],
            "total": self.total,
            "currency": self.currency,
        }


class Order(BaseModel):
    order_id: str
    items: list[Product] = Field(default_factory=list)
    total: float = 0.0
    currency: str | None = None

    def template_data(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "items": [item.model_dump() for item in self.items],
            "total": self.total,
            "currency": self.currency,
        }


def _number(value: Any, default: float) -> float:
    if isinstance(value, bool):
        return default
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return default
    return default


def _text(value: Any) -> str | None:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
        return str(value).strip()
    return None


def product_from(properties: dict[str, Any]) -> Product | None:
    """Read a product from Segment product properties; None without a product id or sku."""
    product_id = _text(properties.get("product_id")) or _text(properties.get("sku"))
    if product_id is None:
        return None
    brand = _text(properties.get("brand"))
    category = _text(properties.get("category"))
    name = _text(properties.get("name"))
    if name is None:
        kind = category.rsplit(".", 1)[-1].replace("_", " ") if category else None
        name = " ".join(part.title() for part in (brand, kind) if part) or f"Product {product_id}"
    quantity = int(_number(properties.get("quantity"), 1))
    return Product(
        product_id=product_id,
        name=name,
        brand=brand,
        category=category,
        price=round(_number(properties.get("price"), 0.0), 2),
        quantity=max(quantity, 0),
        url=_text(properties.get("url")),
        image_url=_text(properties.get("image_url")),
    )


def add_to_cart(cart: Cart, properties: dict[str, Any]) -> None:
    product = product_from(properties)
    if product is None or product.quantity == 0:
        return
    cart.currency = _text(properties.get("currency")) or cart.currency
    current = cart.items.get(product.product_id)
    if current is not None:
        product.quantity += current.quantity
    cart.items[product.product_id] = product


def remove_from_cart(cart: Cart, properties: dict[str, Any]) -> None:
    """Remove the product, or only `quantity` of it when the event says how many."""
    product_id = _text(properties.get("product_id")) or _text(properties.get("sku"))
    current = cart.items.get(product_id or "")
    if current is None:
        return
    removed = properties.get("quantity")
    if isinstance(removed, (int, float)) and not isinstance(removed, bool) and 0 < removed < current.quantity:
        current.quantity -= int(removed)
    else:
        del cart.items[current.product_id]


def order_from(properties: dict[str, Any], fallback_id: str) -> Order:
    products = properties.get("products")
    items = []
    if isinstance(products, list):
        items = [product for entry in products if isinstance(entry, dict) and (product := product_from(entry))]
    computed = round(sum(item.price * item.quantity for item in items), 2)
    total = _number(properties.get("total"), _number(properties.get("revenue"), computed))
    return Order(
        order_id=_text(properties.get("order_id")) or fallback_id,
        items=items,
        total=round(total, 2),
        currency=_text(properties.get("currency")),
    )


def product_ids_named(event_name: str | None, properties: dict[str, Any]) -> list[str]:
    """Return the ids of the products a `Product Added` or `Order Completed` names.

    An empty list for an order means it named no readable product.
    """
    if event_name == "Product Added":
        product = product_from(properties)
        return [] if product is None else [product.product_id]
    return [item.product_id for item in order_from(properties, "").items]
