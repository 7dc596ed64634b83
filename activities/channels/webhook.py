"""The webhook channel: a journey step posted as signed JSON to a URL, for a system of the shop's
own to act on (a call-centre queue, a push service, a CRM task).

The URL is `data["webhook_url"]` of the send, else BISIK_WEBHOOK_URL. Bodies are signed like the
journey-event webhooks (activities/webhooks.py): `X-Bisik-Signature: t=<unix seconds>,v1=<hex
HMAC-SHA256 of "<t>.<body>">` keyed with BISIK_WEBHOOK_SECRET. `X-Bisik-Delivery` is derived from
the message's idempotency key and is the same on every attempt, so a receiver can drop repeats.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from activities.channels.base import (
    BeforeSend,
    Delivery,
    HttpChannel,
    PermanentSendError,
    json_body,
    response_json,
)
from activities.channels.sms import error_detail, provider_message_id
from activities.webhooks import sign

EVENT_TYPE = "message.webhook"
# The key of a send's `data` that names the URL; it is not repeated in the posted body.
URL_KEY = "webhook_url"


@dataclass(frozen=True)
class WebhookMessage:
    url: str
    delivery_id: str
    payload: dict[str, Any]


def delivery_id_for(idempotency_key: str) -> str:
    return hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


class WebhookSender(HttpChannel):
    label = "webhook receiver"

    async def send(self, message: WebhookMessage, before_send: BeforeSend) -> Delivery:
        """Post one signed message; raise one of the three failure kinds of `channels.base`."""
        secret = self.settings.webhook_secret
        if secret is None:
            raise PermanentSendError("the webhook channel signs its requests: set BISIK_WEBHOOK_SECRET")
        body = json_body({"id": message.delivery_id, "type": EVENT_TYPE, **message.payload})
        response = await self.post_json(
            message.url,
            body,
            headers={
                "User-Agent": "Bisik-Webhooks/1",
                "X-Bisik-Event": EVENT_TYPE,
                "X-Bisik-Delivery": message.delivery_id,
                "X-Bisik-Signature": sign(secret.get_secret_value(), int(time.time()), body),
            },
            before_send=before_send,
        )
        response_body = response_json(response)
        self.check_status(response, error_detail(response_body))
        return Delivery(
            provider_message_id=provider_message_id(response_body),
            provider_response=f"{response.status_code} {response.reason_phrase}",
        )
