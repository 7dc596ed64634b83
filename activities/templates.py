"""Message templates: Jinja2 in a sandbox, one YAML file per template and locale.

`templates/email/<name>.<locale>.yaml` holds three templates: `subject`, `text` and `html`.
The HTML part is rendered with autoescape on, so a product named `<b>` shows as text; subject
and text parts are plain text and are not escaped. Undefined variables raise, so a template
that expects data the journey did not give fails that one message instead of sending a broken
one; personal fields that may be missing (a first name) are always present, possibly None, and
templates give them a fallback: `{{ customer.first_name or "there" }}`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from babel.numbers import format_currency, format_decimal
from jinja2 import FileSystemLoader, StrictUndefined, Template, TemplateError
from jinja2.sandbox import SandboxedEnvironment

PARTS = ("subject", "text", "html")
BABEL_LOCALES = {"en": "en_US", "id": "id_ID"}


class TemplateNotFound(LookupError):
    """No template file exists for that name and locale."""


class RenderError(ValueError):
    """A template failed to render: a missing variable, a syntax error, a sandbox violation."""


@dataclass(frozen=True)
class RenderedMessage:
    subject: str
    text: str
    html: str
    locale: str


def default_template_dir() -> Path:
    return Path(str(resources.files("templates")))


def money(amount: Any, currency: str | None = None, locale: str = "en", *, default_currency: str = "USD") -> str:
    """Format an amount as the customer's locale writes money: `$1,081.98`, `Rp150.000,00`."""
    try:
        value = Decimal(str(amount))
    except (InvalidOperation, ValueError):
        return str(amount)
    return format_currency(value, currency or default_currency, locale=BABEL_LOCALES.get(locale, locale))


def number(amount: Any, locale: str = "en") -> str:
    try:
        value = Decimal(str(amount))
    except (InvalidOperation, ValueError):
        return str(amount)
    return format_decimal(value, locale=BABEL_LOCALES.get(locale, locale))


class TemplateRenderer:
    def __init__(self, template_dir: Path | None = None, *, default_currency: str = "USD") -> None:
        self.template_dir = template_dir or default_template_dir()
        loader = FileSystemLoader(str(self.template_dir / "email" / "layouts"))
        self._html = SandboxedEnvironment(
            loader=loader, autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True
        )
        self._plain = SandboxedEnvironment(
            loader=loader, autoescape=False, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True
        )
        for environment in (self._html, self._plain):
            environment.filters["money"] = functools.partial(money, default_currency=default_currency)
            environment.filters["number"] = number
        self._compiled = functools.lru_cache(maxsize=256)(self._compile)

    def available_locales(self, name: str) -> list[str]:
        return sorted(
            path.name.split(".")[-2] for path in (self.template_dir / "email").glob(f"{name}.*.yaml")
        )

    def render(self, name: str, locale: str, context: dict[str, Any]) -> RenderedMessage:
        """Render template `name` in `locale`, falling back to English when that locale is missing."""
        if not (self.template_dir / "email" / f"{name}.{locale}.yaml").exists():
            locale = "en"
        parts = self._compiled(name, locale)
        context = {**context, "locale": locale}
        try:
            rendered = {part: parts[part].render(context) for part in PARTS}
        except TemplateError as error:
            raise RenderError(f"template {name}.{locale} failed to render: {error}") from error
        return RenderedMessage(
            subject=" ".join(rendered["subject"].split()),
            text=rendered["text"].strip() + "\n",
            html=rendered["html"],
            locale=locale,
        )

    def _compile(self, name: str, locale: str) -> dict[str, Template]:
        path = self.template_dir / "email" / f"{name}.{locale}.yaml"
        if not path.exists():
            raise TemplateNotFound(f"no template {name!r} for locale {locale!r} at {path}")
        source = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(source, dict):
            raise RenderError(f"template {path.name} must be a mapping of subject, text and html")
        missing = [part for part in PARTS if not isinstance(source.get(part), str)]
        if missing:
            raise RenderError(f"template {path.name} lacks the parts {missing}")
        try:
            return {
                "subject": self._plain.from_string(source["subject"]),
                "text": self._plain.from_string(source["text"]),
                "html": self._html.from_string(source["html"]),
            }
        except TemplateError as error:
            raise RenderError(f"template {path.name} does not compile: {error}") from error
