"""WhatsApp through Meta's Cloud API: one approved template message per POST.

Request, as Meta's Cloud API reference and its Node SDK example show it:

    POST {BISIK_WHATSAPP_API_BASE_URL}/{BISIK_WHATSAPP_API_VERSION}/{phone number id}/messages
    Authorization: Bearer {BISIK_WHATSAPP_ACCESS_TOKEN}
    {"messaging_product": "whatsapp", "recipient_type": "individual", "to": "6281234567890",
     "type": "template", "template": {"name": ..., "language": {"code": "id"},
     "components": [{"type": "body", "parameters": [{"type": "text", "text": ...}]}]}}

A 2xx response contains `{"messages": [{"id": "wamid..."}]}`, whose id is the provider message
id. Errors contain `{"error": {"code": ..., "message": ...}}`. Meta's error code page
(developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes) advises handling errors by
`code` rather than by HTTP status, and guides that list the codes disagree on the status of the
throttling ones (400 or 429), so the codes below decide first and the HTTP status decides the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

import httpx

from activities.channels.base import (
    BeforeSend,
    Delivery,
    HttpChannel,
    PermanentSendError,
    json_body,
    response_json,
    shorten,
)
from activities.templates import RenderedWhatsApp
from bisik.logs import get_logger
from bisik.phones import InvalidPhoneNumber, parse_phone

log = get_logger(__name__)

# Error codes that mean "not now": 2 service temporarily down or overloaded, 4 too many API
# calls, 80007 business account rate limit, 130429 message throughput reached, 131016 service
# unavailable, 131056 too many messages to the same recipient in a short time.
RETRYABLE_ERROR_CODES = frozenset({2, 4, 80007, 130429, 131016, 131056})
# Error codes that retrying cannot fix whatever the HTTP status: 0 and 190 an invalid or expired
# access token, 3 and 10 a missing capability or permission, 200 to 299 a missing API permission.
PERMANENT_ERROR_CODES = frozenset({0, 3, 10, 190, *range(200, 300)})


@dataclass(frozen=True)
class WhatsAppMessage:
    to: str  # E.164, as on the profile
    template: RenderedWhatsApp


class WhatsAppSender(HttpChannel):
    label = "WhatsApp Cloud API"

    def endpoint(self) -> str:
        settings = self.settings
        base = settings.whatsapp_api_base_url.rstrip("/")
        return f"{base}/{settings.whatsapp_api_version.strip('/')}/{settings.whatsapp_phone_number_id}/messages"

    async def send(self, message: WhatsAppMessage, before_send: BeforeSend) -> Delivery:
        """Send one template message; raise one of the three failure kinds of `channels.base`."""
        settings = self.settings
        if not settings.whatsapp_phone_number_id or settings.whatsapp_access_token is None:
            raise PermanentSendError(
                "WhatsApp is not configured: set BISIK_WHATSAPP_PHONE_NUMBER_ID and BISIK_WHATSAPP_ACCESS_TOKEN"
            )
        try:
            to = parse_phone(message.to, settings.default_phone_region).lstrip("+")
        except InvalidPhoneNumber as error:
            raise PermanentSendError(f"invalid recipient for WhatsApp: {error}") from error

        response = await self.post_json(
            self.endpoint(),
            json_body(template_payload(to, message.template)),
            headers={"Authorization": f"Bearer {settings.whatsapp_access_token.get_secret_value()}"},
            before_send=before_send,
        )
        body = response_json(response)
        if not 200 <= response.status_code < 300:
            self._raise_for_error(response, body)

        provider_id = _message_id(body)
        if provider_id is None:
            log.warning("whatsapp.message_id_missing", status=response.status_code)
        return Delivery(provider_message_id=provider_id, provider_response=f"{response.status_code} {response.reason_phrase}")

    def _raise_for_error(self, response: httpx.Response, body: Any) -> NoReturn:
        error = body.get("error") if isinstance(body, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        code = code if isinstance(code, int) else None
        detail = None
        if isinstance(error, dict):
            detail = shorten(f"error {code}: {error.get('message') or ''}".rstrip(": "))
        text = f"{self.label} responded with HTTP {response.status_code}" + (f": {detail}" if detail else "")
        if code in RETRYABLE_ERROR_CODES:
            self.raise_retryable(text, response)
        if code in PERMANENT_ERROR_CODES:
            raise PermanentSendError(f"{text}; check BISIK_WHATSAPP_ACCESS_TOKEN and the app's permissions")
        self.check_status(response, detail)
        raise PermanentSendError(text)  # check_status raises for every non-2xx status


def template_payload(to: str, template: RenderedWhatsApp) -> dict[str, Any]:
    """Return the Cloud API request body for one template message to `to` (digits, no `+`)."""
    components = []
    if template.parameters:
        components.append(
            {"type": "body", "parameters": [{"type": "text", "text": value} for value in template.parameters]}
        )
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "template",
        "template": {"name": template.name, "language": {"code": template.language}, "components": components},
    }


def _message_id(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[0], dict):
        return None
    message_id = messages[0].get("id")
    return message_id if isinstance(message_id, str) and message_id else None
