"""What the HTTP channels share: one POST per message, and every failure sorted into three kinds.

The kinds are the ones the SMTP sender raises (activities/email.py), so `send_message` records
them the same way:

- `RetryableSendError`: the provider did not take the message, so Temporal's activity retry may
  try again. Raised for network errors before the request was sent, HTTP 408, 429 and 5xx
  (except 504), and for provider error codes that mean "slow down" or "try later".
- `PermanentSendError`: retrying cannot help. Raised for other 4xx responses, redirects, an
  invalid phone number, missing configuration and a provider URL that `check_public_url` rejects.
- `DeliveryUnknownError`: the request had started to leave when the connection failed or timed
  out, or a gateway responded with 504, so the provider may have the message. It is not sent
  again.

No adapter retries inside one attempt. The moment "the request started to leave" is taken from
httpcore's trace extension: `before_send` (which records `sending` in the message log) runs when
the request headers start to go out on an open connection, so a refused or timed-out connection
is still a safe retry.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, NoReturn
from urllib.parse import urlsplit

import httpx

from activities.email import DeliveryUnknownError, PermanentSendError, RetryableSendError
from bisik.logs import mask_email
from bisik.phones import mask_phone
from bisik.settings import Settings
from bisik.urls import UnsafeUrlError, check_public_url

__all__ = [
    "Delivery",
    "DeliveryUnknownError",
    "HttpChannel",
    "PermanentSendError",
    "RetryAfterError",
    "RetryableSendError",
    "mask_recipient",
]

# A provider asking to wait longer than this is retried after this long instead.
MAX_RETRY_AFTER_SECONDS = 3600.0
# Provider error text kept in the message log and logs.
MAX_DETAIL_LENGTH = 300

BeforeSend = Callable[[], Awaitable[None]]


class RetryAfterError(RetryableSendError):
    """A retryable failure whose response gave a wait in `Retry-After`, kept in seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Delivery:
    """The provider's response to an accepted message."""

    provider_message_id: str | None
    provider_response: str


class HttpChannel:
    """Base of the HTTP adapters: a shared `httpx.AsyncClient`, URL checks, failure classification."""

    label: ClassVar[str] = "provider"

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self._client = client

    @property
    def client(self) -> httpx.AsyncClient:
        # Created on first use, so activities built outside an event loop do not need one.
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, headers={"User-Agent": "Bisik/1"})
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def post_json(
        self, url: str, body: bytes, *, headers: dict[str, str], before_send: BeforeSend
    ) -> httpx.Response:
        """POST `body` to `url` once; return the response, whatever its status.

        Raises PermanentSendError for a URL that must not be called, RetryableSendError when the
        request never left, and DeliveryUnknownError when it failed after it began to leave.
        """
        try:
            await check_public_url(url, allow_private=self.settings.allow_private_urls)
        except UnsafeUrlError as error:
            raise PermanentSendError(f"{self.label} URL rejected: {error}") from error

        started = False

        async def trace(event: str, info: dict[str, Any]) -> None:
            nonlocal started
            if event.endswith("send_request_headers.started") and not started:
                started = True
                await before_send()

        try:
            return await self.client.post(
                url,
                content=body,
                headers={"Content-Type": "application/json", **headers},
                timeout=httpx.Timeout(self.settings.channel_timeout_seconds),
                extensions={"trace": trace},
            )
        except httpx.HTTPError as error:
            where = _origin(url)
            if started:
                raise DeliveryUnknownError(
                    f"no response from {self.label} at {where} after the request was sent: {_describe(error)}"
                ) from error
            raise RetryableSendError(f"{self.label} at {where} was not reached: {_describe(error)}") from error

    def check_status(self, response: httpx.Response, detail: str | None) -> None:
        """Raise the failure kind for a non-2xx `response`; `detail` is the provider's own error text."""
        status = response.status_code
        if 200 <= status < 300:
            return
        text = f"{self.label} responded with HTTP {status}" + (f": {detail}" if detail else "")
        if status == 504:
            # A gateway timed out waiting for the provider, which may have taken the message.
            raise DeliveryUnknownError(text)
        if status in (408, 429) or 500 <= status < 600:
            self.raise_retryable(text, response)
        if 300 <= status < 400:
            raise PermanentSendError(f"{text}; redirects are not followed, so configure the URL it points to")
        raise PermanentSendError(text)

    @staticmethod
    def raise_retryable(text: str, response: httpx.Response) -> NoReturn:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if retry_after is not None:
            raise RetryAfterError(text, retry_after)
        raise RetryableSendError(text)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Return a `Retry-After` header (seconds or an HTTP date) as seconds to wait, capped; None if absent."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_SECONDS)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = (moment - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def json_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def response_json(response: httpx.Response) -> Any:
    """Return the parsed JSON body, or None when the body is empty or not JSON."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL_LENGTH else text[: MAX_DETAIL_LENGTH - 3] + "..."


def mask_recipient(channel: str, recipient: str | None) -> str:
    """Mask a message log recipient for logs: an address, a phone number or a webhook URL."""
    if not recipient:
        return ""
    if channel in ("whatsapp", "sms"):
        return mask_phone(recipient)
    if channel == "webhook":
        return _origin(recipient) + "/..."
    return mask_email(recipient)


def _origin(url: str) -> str:
    """Return scheme and host of `url`: paths and query strings can carry tokens."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _describe(error: httpx.HTTPError) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
