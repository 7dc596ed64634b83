"""Open and click tracking for email HTML, and the signed tokens behind tracking links.

`add_tracking` rewrites every http(s) link of an email's HTML part to go through
`/t/c/{token}` and adds a 1x1 open pixel (`/t/o/{token}`) at the end of the body. Each token is
signed with its own purpose (`click`, `open`, `preferences`), so a token made for one link cannot
be used at another. A click token carries its target URL, so the redirect can only lead where
Bisik itself pointed it.

Links that are not rewritten: Bisik's own pages (unsubscribe `/u/`, preferences `/p/`,
tracking `/t/`), `mailto:`, `tel:` and every other non-http(s) scheme, relative links and
fragments (an email has no base URL to resolve them against), and links inside HTML comments
such as Outlook's conditional comments.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import urlsplit

from bisik.links import LinkSigner

OPEN_PURPOSE = "open"
CLICK_PURPOSE = "click"
PREFERENCES_PURPOSE = "preferences"
# Paths of Bisik's own pages under BISIK_PUBLIC_URL; links to them are never wrapped.
BISIK_PATHS = ("/u/", "/p/", "/t/")
TRACKED_SCHEMES = ("http", "https")
# Elements whose `href` a reader can click.
LINK_TAGS = ("a", "area")


@dataclass(frozen=True)
class OpenToken:
    message_id: int
    customer_id: str


@dataclass(frozen=True)
class ClickToken:
    message_id: int
    customer_id: str
    url: str


def is_trackable_url(url: str) -> bool:
    """Tell whether `url` is an absolute http(s) URL with a host, the only kind a click may lead to."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in TRACKED_SCHEMES and bool(parts.hostname)


def open_url(signer: LinkSigner, public_url: str, *, message_id: int, customer_id: str) -> str:
    token = signer.sign(OPEN_PURPOSE, {"m": message_id, "c": customer_id})
    return f"{public_url.rstrip('/')}/t/o/{token}"


def click_url(signer: LinkSigner, public_url: str, *, message_id: int, customer_id: str, target: str) -> str:
    token = signer.sign(CLICK_PURPOSE, {"m": message_id, "c": customer_id, "u": target})
    return f"{public_url.rstrip('/')}/t/c/{token}"


def preference_url(signer: LinkSigner, public_url: str, customer_id: str) -> str:
    token = signer.sign(PREFERENCES_PURPOSE, {"c": customer_id})
    return f"{public_url.rstrip('/')}/p/{token}"


def read_open_token(signer: LinkSigner, token: str) -> OpenToken | None:
    """Return the open token's contents, or None when Bisik did not sign it for opens."""
    payload = signer.verify(OPEN_PURPOSE, token)
    if payload is None or not _is_message_id(payload.get("m")) or not isinstance(payload.get("c"), str):
        return None
    return OpenToken(message_id=payload["m"], customer_id=payload["c"])


def read_click_token(signer: LinkSigner, token: str) -> ClickToken | None:
    """Return the click token's contents, or None when Bisik did not sign it for clicks.

    A signed target that is not an absolute http(s) URL reads as None too, so the redirect can
    never lead to `javascript:` or `data:` even if such a token were signed by mistake.
    """
    payload = signer.verify(CLICK_PURPOSE, token)
    if payload is None or not _is_message_id(payload.get("m")) or not isinstance(payload.get("c"), str):
        return None
    url = payload.get("u")
    if not isinstance(url, str) or not is_trackable_url(url):
        return None
    return ClickToken(message_id=payload["m"], customer_id=payload["c"], url=url)


def read_preference_token(signer: LinkSigner, token: str) -> str | None:
    """Return the customer id of a preference page token, or None when Bisik did not sign it."""
    payload = signer.verify(PREFERENCES_PURPOSE, token)
    if payload is None or not isinstance(payload.get("c"), str):
        return None
    return payload["c"]


def add_tracking(html_text: str, *, signer: LinkSigner, public_url: str, message_id: int, customer_id: str) -> str:
    """Wrap the email's http(s) links in signed click links and add an open pixel; a pure function.

    `message_id` is the `messages.id` of the email. Everything outside the rewritten `<a>` and
    `<area>` start tags is returned byte for byte; see the module docstring for what is left alone.
    """
    own_pages = tuple(public_url.rstrip("/") + path for path in BISIK_PATHS)

    def wrap(target: str) -> str | None:
        if not is_trackable_url(target) or target.startswith(own_pages):
            return None
        return click_url(signer, public_url, message_id=message_id, customer_id=customer_id, target=target)

    pixel = open_url(signer, public_url, message_id=message_id, customer_id=customer_id)
    return insert_open_pixel(rewrite_links(html_text, wrap), pixel)


def rewrite_links(html_text: str, rewrite: Callable[[str], str | None]) -> str:
    """Replace the `href` of each `<a>` and `<area>` with `rewrite(href)`; None keeps the link as it is.

    `rewrite` gets the URL with character references decoded and surrounding whitespace
    stripped, as a browser would follow it. A rewritten tag is written out again with its
    attributes in order and each value escaped; the rest of the document is not touched.
    """
    scanner = _TagScanner(html_text)
    pieces: list[str] = []
    copied_up_to = 0
    for start, tag, raw, attributes in scanner.links:
        new_tag = _rewritten_tag(tag, raw, attributes, rewrite)
        if new_tag is None:
            continue
        pieces.append(html_text[copied_up_to:start])
        pieces.append(new_tag)
        copied_up_to = start + len(raw)
    pieces.append(html_text[copied_up_to:])
    return "".join(pieces)


def insert_open_pixel(html_text: str, pixel_url: str) -> str:
    """Insert a 1x1 image loading `pixel_url` just before the last `</body>`, or at the end."""
    image = (
        f'<img src="{html.escape(pixel_url, quote=True)}" width="1" height="1" alt="" '
        'style="display:block;width:1px;height:1px;border:0;">'
    )
    body_end = _TagScanner(html_text).body_end
    if body_end is None:
        return html_text + image
    return html_text[:body_end] + image + html_text[body_end:]


def _is_message_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rewritten_tag(
    tag: str, raw: str, attributes: list[tuple[str, str | None]], rewrite: Callable[[str], str | None]
) -> str | None:
    """Return the start tag with its first `href` rewritten, or None when nothing changes."""
    for position, (name, value) in enumerate(attributes):
        if name != "href" or value is None:
            continue
        replacement = rewrite(value.strip())
        if replacement is None:
            return None
        attributes = [*attributes[:position], ("href", replacement), *attributes[position + 1 :]]
        break
    else:
        return None

    written = "".join(
        f" {name}" if value is None else f' {name}="{html.escape(value, quote=True)}"' for name, value in attributes
    )
    closing = "/>" if raw.rstrip().endswith("/>") else ">"
    return f"<{tag}{written}{closing}"


class _TagScanner(HTMLParser):
    """Find link start tags and the last `</body>` with their offsets in the source text.

    Only positions are collected, and the caller splices the original text. Everything the
    parser does not report (comments, doctype, whitespace, character references) stays as it was.
    """

    def __init__(self, html_text: str) -> None:
        super().__init__(convert_charrefs=True)
        self._text = html_text
        self._line_starts = [0]
        for index, character in enumerate(html_text):
            if character == "\n":
                self._line_starts.append(index + 1)
        # (offset, tag name, start tag as written, attributes) of each link tag.
        self.links: list[tuple[int, str, str, list[tuple[str, str | None]]]] = []
        self.body_end: int | None = None
        self.feed(html_text)
        self.close()

    def _offset(self) -> int:
        line, column = self.getpos()
        return self._line_starts[line - 1] + column

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in LINK_TAGS:
            return
        raw = self.get_starttag_text()
        start = self._offset()
        # The parser reports the tag's start; splicing relies on the text there being this tag.
        if raw is not None and self._text.startswith(raw, start):
            self.links.append((start, tag, raw, attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "body":
            start = self._offset()
            if self._text.startswith("</", start):
                self.body_end = start
