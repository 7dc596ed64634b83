"""Message templates: Jinja2 in a sandbox, one file per template (and locale) for each channel.

`templates/email/<name>.<locale>.yaml` holds three templates: `subject`, `text` and `html`.
`templates/sms/<name>.<locale>.txt` is the plain text of an SMS. `templates/whatsapp/<name>.yaml`
maps a Bisik template to a WhatsApp template approved by Meta: its name, its language code for
each locale, and one Jinja2 template per body parameter (see `render_whatsapp`).
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
# Currencies that ISO 4217 gives two decimals but that shops price in whole units: Indonesian
# shops write Rp150.000, never Rp150.000,00.
WHOLE_UNIT_CURRENCIES = {"IDR"}


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


@dataclass(frozen=True)
class RenderedText:
    """The body of an SMS."""

    text: str
    locale: str


@dataclass(frozen=True)
class RenderedWhatsApp:
    """A WhatsApp template message: which approved template, in which language, with what values."""

    name: str
    language: str
    parameters: list[str]
    locale: str


@dataclass(frozen=True)
class WhatsAppMapping:
    name: str
    languages: dict[str, str]
    body: dict[str, list[Template]]


def default_template_dir() -> Path:
    return Path(str(resources.files("templates")))


def money(amount: Any, currency: str | None = None, locale: str = "en", *, default_currency: str = "USD") -> str:
    """Format an amount as the customer's locale writes money: `$1,081.98`, `Rp150.000`."""
    try:
        value = Decimal(str(amount))
    except (InvalidOperation, ValueError):
        return str(amount)
    currency = currency or default_currency
    babel_locale = BABEL_LOCALES.get(locale, locale)
    if currency in WHOLE_UNIT_CURRENCIES:
        return format_currency(value, currency, locale=babel_locale, format="¤#,##0", currency_digits=False)
    return format_currency(value, currency, locale=babel_locale)


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
        self._compiled_sms = functools.lru_cache(maxsize=256)(self._compile_sms)
        self._compiled_whatsapp = functools.lru_cache(maxsize=256)(self._compile_whatsapp)

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

    def render_sms(self, name: str, locale: str, context: dict[str, Any]) -> RenderedText:
        """Render `templates/sms/<name>.<locale>.txt` as plain text, falling back to English."""
        if not (self.template_dir / "sms" / f"{name}.{locale}.txt").exists():
            locale = "en"
        template = self._compiled_sms(name, locale)
        try:
            text = template.render({**context, "locale": locale})
        except TemplateError as error:
            raise RenderError(f"SMS template {name}.{locale} failed to render: {error}") from error
        text = "\n".join(line.rstrip() for line in text.strip().splitlines())
        if not text:
            raise RenderError(f"SMS template {name}.{locale} rendered an empty text")
        return RenderedText(text=text, locale=locale)

    def render_whatsapp(self, name: str, locale: str, context: dict[str, Any]) -> RenderedWhatsApp:
        """Render the body parameters of `templates/whatsapp/<name>.yaml` for `locale`.

        A locale without a language in the file falls back to English. Each parameter has its
        whitespace collapsed to single spaces, and one that renders empty is an error, because
        the approved template would show a gap where a value belongs.
        """
        mapping = self._compiled_whatsapp(name)
        requested = locale
        if locale not in mapping.languages:
            locale = "en"
        if locale not in mapping.languages:
            raise TemplateNotFound(
                f"WhatsApp template mapping {name!r} has a language for neither {requested!r} nor 'en'"
            )
        context = {**context, "locale": locale}
        parameters = []
        for number, template in enumerate(mapping.body[locale], start=1):
            try:
                value = " ".join(template.render(context).split())
            except TemplateError as error:
                raise RenderError(f"WhatsApp template {name}, body parameter {number} failed to render: {error}") from error
            if not value:
                raise RenderError(f"WhatsApp template {name}, body parameter {number} rendered empty for locale {locale}")
            parameters.append(value)
        return RenderedWhatsApp(name=mapping.name, language=mapping.languages[locale], parameters=parameters, locale=locale)

    def _compile_sms(self, name: str, locale: str) -> Template:
        path = self.template_dir / "sms" / f"{name}.{locale}.txt"
        if not path.exists():
            raise TemplateNotFound(f"no SMS template {name!r} for locale {locale!r} at {path}")
        try:
            return self._plain.from_string(path.read_text(encoding="utf-8"))
        except TemplateError as error:
            raise RenderError(f"SMS template {path.name} does not compile: {error}") from error

    def _compile_whatsapp(self, name: str) -> WhatsAppMapping:
        path = self.template_dir / "whatsapp" / f"{name}.yaml"
        if not path.exists():
            raise TemplateNotFound(f"no WhatsApp template mapping {name!r} at {path}")
        source = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(source, dict):
            raise RenderError(f"{path.name} must be a mapping with name, languages and body")
        meta_name, languages, body = source.get("name"), source.get("languages"), source.get("body", [])
        if not isinstance(meta_name, str) or not meta_name.strip():
            raise RenderError(f"{path.name}: name must be the approved WhatsApp template's name")
        if not isinstance(languages, dict) or not languages or not all(
            isinstance(key, str) and isinstance(value, str) and value for key, value in languages.items()
        ):
            raise RenderError(f"{path.name}: languages must map each locale to a WhatsApp language code, e.g. en: en_US")
        if isinstance(body, list):
            body = {locale: body for locale in languages}
        if not isinstance(body, dict) or set(body) != set(languages):
            raise RenderError(
                f"{path.name}: body must be a list of parameters, or a mapping with one list per locale "
                f"in languages ({', '.join(sorted(languages))})"
            )
        compiled: dict[str, list[Template]] = {}
        for locale, parameters in body.items():
            if not isinstance(parameters, list) or not all(isinstance(item, str) for item in parameters):
                raise RenderError(f"{path.name}: body parameters for {locale} must be a list of strings")
            try:
                compiled[locale] = [self._plain.from_string(item) for item in parameters]
            except TemplateError as error:
                raise RenderError(f"{path.name}: a body parameter for {locale} does not compile: {error}") from error
        return WhatsAppMapping(name=meta_name.strip(), languages=dict(languages), body=compiled)
