"""Channels other than email: WhatsApp (Meta's Cloud API), SMS (a generic HTTP provider) and webhooks.

Each adapter sends one message per call with one HTTP request, and sorts every failure into the
kinds `send_message` already records for email; see `channels.base`.
"""

from activities.channels.base import (
    Delivery,
    DeliveryUnknownError,
    HttpChannel,
    PermanentSendError,
    RetryableSendError,
    RetryAfterError,
    mask_recipient,
)
from activities.channels.sms import SmsMessage, SmsSender, sms_length
from activities.channels.webhook import WebhookMessage, WebhookSender, delivery_id_for
from activities.channels.whatsapp import WhatsAppMessage, WhatsAppSender

__all__ = [
    "Delivery",
    "DeliveryUnknownError",
    "HttpChannel",
    "PermanentSendError",
    "RetryAfterError",
    "RetryableSendError",
    "SmsMessage",
    "SmsSender",
    "WebhookMessage",
    "WebhookSender",
    "WhatsAppMessage",
    "WhatsAppSender",
    "delivery_id_for",
    "mask_recipient",
    "sms_length",
]
