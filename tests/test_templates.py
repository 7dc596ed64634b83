"""Rendering message templates: locales, missing personal fields, escaping."""

from __future__ import annotations

import pytest

from activities.templates import RenderError, TemplateRenderer, money

CART = {
    "items": [
        {"product_id": "p1", "name": "Sepatu <b>Lari</b> & Co", "price": 450.5, "quantity": 2, "image_url": "https://cdn.example.com/p1.jpg", "url": None},
        {"product_id": "p2", "name": "Kaos Kaki", "price": 25.0, "quantity": 1, "image_url": None, "url": None},
    ],
    "total": 926.0,
    "currency": "USD",
}
BASE = {
    "brand_name": "Toko Bisik",
    "shop_url": "https://shop.example.com",
    "public_url": "http://127.0.0.1:8000",
    "unsubscribe_url": "http://127.0.0.1:8000/u/token",
    "transactional": False,
}


def context(first_name: str | None) -> dict:
    return {**BASE, "cart": CART, "customer": {"first_name": first_name, "email": "a@example.com", "traits": {}}}


@pytest.fixture(scope="module")
def renderer() -> TemplateRenderer:
    return TemplateRenderer()


def test_cart_reminder_in_english_with_first_name(renderer: TemplateRenderer) -> None:
    message = renderer.render("cart_reminder_1", "en", context("Sari"))

    assert message.locale == "en"
    assert message.subject == "Sari, you left something in your cart"
    assert message.text.startswith("Hi Sari,")
    assert "$901.00" in message.text
    assert "Total: $926.00" in message.text
    assert "https://shop.example.com/cart" in message.text


def test_cart_reminder_in_english_without_first_name(renderer: TemplateRenderer) -> None:
    message = renderer.render("cart_reminder_1", "en", context(None))

    assert message.subject == "You left something in your cart"
    assert message.text.startswith("Hi there,")
    assert "None" not in message.text + message.html


def test_cart_reminder_in_indonesian_with_first_name(renderer: TemplateRenderer) -> None:
    message = renderer.render("cart_reminder_1", "id", context("Sari"))

    assert message.locale == "id"
    assert message.subject == "Kak Sari, keranjangmu masih nungguin nih 🛒"
    assert message.text.startswith("Hai Kak Sari!")
    assert "Total: US$926,00" in message.text


def test_cart_reminder_in_indonesian_without_first_name(renderer: TemplateRenderer) -> None:
    message = renderer.render("cart_reminder_1", "id", context(None))

    assert message.subject == "Keranjangmu masih nungguin nih 🛒"
    assert message.text.startswith("Hai Kak!")
    assert "None" not in message.text + message.html


def test_html_in_product_name_escaped_in_html_part(renderer: TemplateRenderer) -> None:
    message = renderer.render("cart_reminder_1", "en", context("Sari"))

    assert "Sepatu &lt;b&gt;Lari&lt;/b&gt; &amp; Co" in message.html
    assert "<b>Lari</b>" not in message.html
    assert "Sepatu <b>Lari</b> & Co" in message.text


def test_html_in_first_name_escaped(renderer: TemplateRenderer) -> None:
    message = renderer.render("cart_reminder_1", "en", context('<img src=x onerror="alert(1)">'))

    assert "<img src=x" not in message.html
    assert "&lt;img src=x" in message.html


@pytest.mark.parametrize("locale", ["en", "id"])
@pytest.mark.parametrize(
    ("template", "data"),
    [
        ("cart_reminder_1", {"cart": CART}),
        ("cart_reminder_2", {"cart": CART, "voucher_code": "FREESHIP-ABC123"}),
        ("order_thank_you", {"order": {**CART, "order_id": "o-1"}}),
        ("review_request", {"order": {**CART, "order_id": "o-1"}, "recommendations": []}),
        (
            "review_request",
            {
                "order": {**CART, "order_id": "o-1"},
                "recommendations": [{"product_id": "p9", "name": "Tea", "price": 3.5, "currency": "USD", "image_url": None, "url": "https://shop.example.com/p9"}],
            },
        ),
    ],
)
def test_every_template_renders_in_both_locales(
    renderer: TemplateRenderer, template: str, data: dict, locale: str
) -> None:
    for first_name in ("Budi", None):
        message = renderer.render(template, locale, {**BASE, **data, "customer": {"first_name": first_name, "email": None, "traits": {}}})

        assert message.subject
        assert message.text.strip()
        assert message.html.lstrip().startswith("<!DOCTYPE html>")
        assert "None" not in message.subject


def test_unknown_locale_falls_back_to_english(renderer: TemplateRenderer) -> None:
    assert renderer.render("cart_reminder_1", "fr", context("Ann")).locale == "en"


def test_missing_template_variable_raises(renderer: TemplateRenderer) -> None:
    with pytest.raises(RenderError, match="'cart' is undefined"):
        renderer.render("cart_reminder_1", "en", {**BASE, "customer": {"first_name": "A", "email": None, "traits": {}}})


def test_sandbox_blocks_unsafe_attribute_access(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "email" / "layouts").mkdir(parents=True)
    (tmp_path / "email" / "evil.en.yaml").write_text(
        'subject: "{{ customer.__class__.__mro__ }}"\ntext: "x"\nhtml: "x"\n'
    )

    with pytest.raises(RenderError, match="unsafe"):
        TemplateRenderer(tmp_path).render("evil", "en", {"customer": {}})


def test_money_formats_per_locale() -> None:
    assert money(150000, "IDR", "id") == "Rp150.000"
    assert money(149999.6, "IDR", "id") == "Rp150.000"
    assert money(1081.98, "USD", "en") == "$1,081.98"
    assert money(5, None, "en") == "$5.00"
