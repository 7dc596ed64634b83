"""SMS through a generic HTTP provider: one JSON POST per message.

    POST {BISIK_SMS_API_URL}
    Authorization: Bearer {BISIK_SMS_API_KEY}
    {"to": "+6281234567890", "from": BISIK_SMS_SENDER, "text": "..."}

Any 2xx response means the provider took the message; its id is read from `id` or `message_id`
in a JSON response when there is one. Providers with another request shape need an adapter of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from activities.channels.base import (
    BeforeSend,
    Delivery,
    HttpChannel,
    PermanentSendError,
    json_body,
    response_json,
    shorten,
)
from bisik.phones import InvalidPhoneNumber, parse_phone

# GSM 03.38 default alphabet; the escape character 0x1B is left out because it only introduces
# the extension table, whose characters take two septets each.
GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = set("\f^{}\\[~]|€")


@dataclass(frozen=True)
class SmsMessage:
    to: str  # E.164, as on the profile
    text: str


@dataclass(frozen=True)
class SmsLength:
    encoding: str  # "GSM-7" or "UCS-2"
    units: int  # septets for GSM-7, UTF-16 code units for UCS-2
    segments: int


def sms_length(text: str) -> SmsLength:
    """Count how many SMS segments `text` takes.

    GSM-7 fits 160 septets in one SMS and 153 in each part of a longer one. Text with any other
    character is sent as UCS-2, which fits 70 code units, or 67 in each part.
    """
    if all(character in GSM7_BASIC or character in GSM7_EXTENSION for character in text):
        units = sum(2 if character in GSM7_EXTENSION else 1 for character in text)
        single, part, encoding = 160, 153, "GSM-7"
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, part, encoding = 70, 67, "UCS-2"
    segments = 1 if units <= single else -(-units // part)
    return SmsLength(encoding=encoding, units=units, segments=segments)


class SmsSender(HttpChannel):
    label = "SMS provider"

    async def send(self, message: SmsMessage, before_send: BeforeSend) -> Delivery:
        """Send one SMS; raise one of the three failure kinds of `channels.base`."""
        settings = self.settings
        if not settings.sms_api_url or settings.sms_api_key is None:
            raise PermanentSendError("SMS is not configured: set BISIK_SMS_API_URL and BISIK_SMS_API_KEY")
        try:
            to = parse_phone(message.to, settings.default_phone_region)
        except InvalidPhoneNumber as error:
            raise PermanentSendError(f"invalid recipient for SMS: {error}") from error

        response = await self.post_json(
            settings.sms_api_url,
            json_body({"to": to, "from": settings.sms_sender, "text": message.text}),
            headers={"Authorization": f"Bearer {settings.sms_api_key.get_secret_value()}"},
            before_send=before_send,
        )
        body = response_json(response)
        self.check_status(response, error_detail(body))
        return Delivery(
            provider_message_id=provider_message_id(body),
            provider_response=f"{response.status_code} {response.reason_phrase}",
        )


def provider_message_id(body: Any) -> str | None:
    """Return `id` or `message_id` from a JSON object response, as a string."""
    if not isinstance(body, dict):
        return None
    for key in ("id", "message_id"):
        value = body.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
            return str(value)
    return None


def error_detail(body: Any) -> str | None:
    """Return a provider's error text from the usual JSON shapes: `error`, `message`, `detail`."""
    if not isinstance(body, dict):
        return None
    for key in ("error", "message", "detail"):
        value = body.get(key)
        if isinstance(value, dict):
            value = value.get("message") or value.get("code")
        if isinstance(value, (str, int)) and str(value):
            return shorten(str(value))
    return None
