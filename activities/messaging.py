"""Activities that look up profiles and send journey messages, at most once per idempotency key.

`send_message` walks one row of the message log through its states:

    claimed  -> the row exists; nothing has reached the provider, so a retry may send
    sending  -> recorded just before the message body goes to the provider
    sent | skipped | suppressed | failed | unknown   (final)

A retry that finds a final row returns it unchanged. A retry that finds `sending` means an
earlier attempt died while the provider may have taken the message (worker killed, reply lost):
it records `unknown` and does not send. For email that window is the DATA exchange plus one
database write, and no SMTP client can make it smaller, because SMTP has no way to ask whether a
message was delivered. For WhatsApp, SMS and webhooks it is one HTTP request and its answer plus
one database write (activities/channels/).

Email goes to the profile's address, WhatsApp and SMS to its phone (`traits.phone` in E.164),
and webhook messages to `data["webhook_url"]` or BISIK_WEBHOOK_URL.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import webhooks
from activities.catalog import carted_or_bought_since
from activities.channels import (
    Delivery,
    RetryAfterError,
    SmsMessage,
    SmsSender,
    WebhookMessage,
    WebhookSender,
    WhatsAppMessage,
    WhatsAppSender,
    delivery_id_for,
    mask_recipient,
    sms_length,
)
from activities.channels.webhook import URL_KEY as WEBHOOK_URL_KEY
from activities.email import (
    DeliveryUnknownError,
    EmailSender,
    OutgoingEmail,
    PermanentSendError,
    RetryableSendError,
)
from activities.policy import ContactPolicy
from activities.suppressions import SuppressionStore
from activities.templates import RenderError, TemplateNotFound, TemplateRenderer
from activities.tracking import add_tracking, preference_url
from bisik.links import LinkSigner
from bisik.logs import get_logger
from bisik.models import PRODUCTS_CARTED_OR_BOUGHT, Profile, SendRequest, SendResult
from bisik.phones import InvalidPhoneNumber, normalize_phone, parse_phone
from bisik.settings import Settings

log = get_logger(__name__)

FINAL_STATUSES = {"sent", "skipped", "suppressed", "dropped", "failed", "unknown"}
LOG_EVENTS = {
    "sent": "message.sent",
    "skipped": "message.skipped",
    "suppressed": "message.suppressed",
    "dropped": "message.dropped",
    "failed": "message.failed",
    "unknown": "message.outcome_unknown",
}

MarkSending = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class NoRecipient:
    """The final status and reason recorded for a message that has no recipient."""

    status: str
    reason: str


def normalize_locale(value: Any, default: str) -> str:
    """Map `id`, `id-ID`, `id_ID` to `id` and `en-US` to `en`; anything else to `default`."""
    if isinstance(value, str):
        language = value.replace("_", "-").split("-")[0].lower()
        if language in ("en", "id"):
            return language
    return default


class MessagingActivities:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        renderer: TemplateRenderer | None = None,
        sender: EmailSender | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.renderer = renderer or TemplateRenderer(settings.template_dir, default_currency=settings.default_currency)
        self.sender = sender or EmailSender(settings)
        self.whatsapp = WhatsAppSender(settings)
        self.sms = SmsSender(settings)
        self.webhook = WebhookSender(settings)
        self.suppressions = SuppressionStore(pool)
        self.policy = ContactPolicy(pool, settings)
        self.links = LinkSigner(settings.secret_key.get_secret_value())

    async def close(self) -> None:
        """Close the HTTP clients of the WhatsApp, SMS and webhook channels."""
        for channel in (self.whatsapp, self.sms, self.webhook):
            await channel.aclose()

    @activity.defn(name="load_profile")
    async def load_profile(self, customer_id: str) -> Profile:
        profile = await self.fetch_profile(customer_id)
        if profile is None:
            raise ApplicationError(f"customer {customer_id} not found", non_retryable=True)
        return profile

    async def fetch_profile(self, customer_id: str) -> Profile | None:
        row = await self.pool.fetchrow(
            """
            SELECT c.id, c.email, c.traits FROM customers c
            WHERE c.id = (SELECT COALESCE(merged_into, id) FROM customers WHERE id = $1)
            """,
            customer_id,
        )
        if row is None:
            return None
        traits = row["traits"] or {}
        first_name = traits.get("first_name") or traits.get("firstName")
        if not first_name and isinstance(traits.get("name"), str):
            first_name = traits["name"].split()[0] if traits["name"].split() else None
        return Profile(
            customer_id=row["id"],
            email=row["email"],
            first_name=first_name if isinstance(first_name, str) and first_name.strip() else None,
            locale=normalize_locale(traits.get("locale"), self.settings.default_locale),  # type: ignore[arg-type]
            timezone=traits.get("timezone") if isinstance(traits.get("timezone"), str) else self.settings.default_timezone,
            phone=normalize_phone(traits.get("phone"), self.settings.default_phone_region),
            traits=traits,
        )

    @activity.defn(name="send_message")
    async def send_message(self, request: SendRequest) -> SendResult:
        row = await self._claim(request)
        if row["status"] in FINAL_STATUSES:
            return self._result_of(row)
        if row["status"] == "sending":
            # An earlier attempt handed the message to the provider and did not live to record
            # the answer. Sending again could deliver it twice; at most once wins.
            return await self._finish(
                row["id"], "unknown", "an earlier attempt stopped after handing the message to the provider"
            )

        profile = await self.fetch_profile(request.customer_id)
        if request.channel == "email" and (profile is None or profile.email is None):
            return await self._finish(row["id"], "skipped", "no email address")
        if profile is None:
            return await self._finish(row["id"], "skipped", "customer not found")
        recipient = self._recipient(request, profile)
        if isinstance(recipient, NoRecipient):
            level = "warning" if recipient.status == "failed" else "info"
            return await self._finish(row["id"], recipient.status, recipient.reason, level=level)

        if not request.transactional:
            refusal = await self.suppressions.reason_suppressed(profile.customer_id, request.channel)
            refusal = refusal or await self.policy.consent_refusal(profile.customer_id, request.channel, request.topic)
            if refusal is not None:
                return await self._finish(row["id"], "suppressed", refusal)

        goal = await self._stored_since(request.goal_events, request.goal_since, profile.customer_id)
        if goal is not None:
            result = await self._finish(row["id"], "skipped", f"goal reached: {goal}")
            return result.model_copy(update={"status": "goal_reached"})
        skip = await self._stored_since(request.skip_if_events, request.goal_since, profile.customer_id)
        if skip is not None:
            return await self._finish(row["id"], "skipped", f"{skip} stored since the journey began")
        if request.skip_if_products and request.goal_since is not None:
            found = await carted_or_bought_since(self.pool, profile.customer_id, request.goal_since)
            if found.covers(request.skip_if_products):
                return await self._finish(row["id"], "skipped", PRODUCTS_CARTED_OR_BOUGHT)

        if not request.transactional:
            decision = await self.policy.decide(row["id"], request, profile)
            if decision.action == "drop":
                return await self._finish(row["id"], "dropped", decision.reason)
            if decision.action == "defer":
                log.info(
                    "message.deferred",
                    message_id=row["id"],
                    customer_id=request.customer_id,
                    journey=request.journey,
                    workflow_id=request.workflow_id,
                    step=request.step,
                    until=decision.until.isoformat() if decision.until else None,
                    reason=decision.reason,
                )
                return SendResult(
                    status="deferred", reason=decision.reason, deferred_until=decision.until, message_id=row["id"]
                )

        unsubscribe_url = None
        if not request.transactional and request.channel != "webhook":
            token = self.links.unsubscribe_token(profile.customer_id, row["id"], request.channel)
            unsubscribe_url = f"{self.settings.public_url.rstrip('/')}/u/{token}"
        if request.channel != "email":
            return await self._send_by_channel(row["id"], request, profile, recipient, unsubscribe_url)

        context = self._context(request, profile, unsubscribe_url)
        try:
            rendered = self.renderer.render(request.template, profile.locale, context)
        except (RenderError, TemplateNotFound) as error:
            return await self._finish(row["id"], "failed", str(error), level="error")

        # Opens and clicks come back as events that journeys and the re-engagement clock see.
        html = add_tracking(
            rendered.html,
            signer=self.links,
            public_url=self.settings.public_url,
            message_id=row["id"],
            customer_id=profile.customer_id,
        )
        outgoing = OutgoingEmail(
            recipient=profile.email,
            subject=rendered.subject,
            text=rendered.text,
            html=html,
            idempotency_key=request.idempotency_key,
            headers=self._headers(request, unsubscribe_url),
        )
        message = self.sender.build(outgoing)
        await self.pool.execute(
            "UPDATE messages SET locale = $2, recipient = $3, subject = $4, provider_message_id = $5, updated_at = now() WHERE id = $1",
            row["id"],
            rendered.locale,
            profile.email,
            rendered.subject,
            str(message["Message-ID"]),
        )

        async def send_email(mark_sending: MarkSending) -> Delivery:
            reply = await self.sender.send(message, before_data=mark_sending)
            return Delivery(provider_message_id=None, provider_response=reply)

        return await self._deliver(row["id"], request, send_email)

    async def _send_by_channel(
        self, message_row: int, request: SendRequest, profile: Profile, recipient: str, unsubscribe_url: str | None
    ) -> SendResult:
        """Render and send a WhatsApp, SMS or webhook message to `recipient`."""
        context = self._context(request, profile, unsubscribe_url)
        send: Callable[[MarkSending], Awaitable[Delivery]]
        try:
            if request.channel == "whatsapp":
                template = self.renderer.render_whatsapp(request.template, profile.locale, context)
                whatsapp = WhatsAppMessage(to=recipient, template=template)
                locale = template.locale
                send = functools.partial(self.whatsapp.send, whatsapp)
            elif request.channel == "sms":
                text = self.renderer.render_sms(request.template, profile.locale, context)
                sms = SmsMessage(to=recipient, text=text.text)
                locale = text.locale
                self._warn_if_multipart(message_row, request, text.text)
                send = functools.partial(self.sms.send, sms)
            else:
                webhook = self._webhook_message(message_row, request, profile, recipient)
                locale = profile.locale
                send = functools.partial(self.webhook.send, webhook)
        except (RenderError, TemplateNotFound) as error:
            return await self._finish(message_row, "failed", str(error), level="error")

        await self.pool.execute(
            "UPDATE messages SET locale = $2, recipient = $3, updated_at = now() WHERE id = $1",
            message_row,
            locale,
            recipient,
        )
        return await self._deliver(message_row, request, send)

    def _recipient(self, request: SendRequest, profile: Profile) -> str | NoRecipient:
        """Return where the message goes: an email address, an E.164 phone number or a webhook URL."""
        if request.channel == "email":
            return profile.email or NoRecipient("skipped", "no email address")
        if request.channel in ("whatsapp", "sms"):
            if profile.phone is not None:
                return profile.phone
            raw = profile.traits.get("phone")
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                return NoRecipient("skipped", "no phone number")
            try:
                return parse_phone(raw, self.settings.default_phone_region)
            except InvalidPhoneNumber as error:
                return NoRecipient("failed", f"invalid phone number in traits.phone: {error}")
        url = request.data.get(WEBHOOK_URL_KEY) or self.settings.webhook_url
        if not isinstance(url, str) or not url:
            return NoRecipient("failed", f"no webhook URL: pass data['{WEBHOOK_URL_KEY}'] in the send or set BISIK_WEBHOOK_URL")
        return url

    def _webhook_message(self, message_row: int, request: SendRequest, profile: Profile, url: str) -> WebhookMessage:
        return WebhookMessage(
            url=url,
            delivery_id=delivery_id_for(request.idempotency_key),
            payload={
                "created_at": request.step_at.isoformat(),
                "data": {
                    "message_id": message_row,
                    "customer_id": profile.customer_id,
                    "journey": request.journey,
                    "workflow_id": request.workflow_id,
                    "step": request.step,
                    "template": request.template,
                    "transactional": request.transactional,
                    "locale": profile.locale,
                    "customer": {
                        "first_name": profile.first_name,
                        "email": profile.email,
                        "phone": profile.phone,
                        "locale": profile.locale,
                        "timezone": profile.timezone,
                    },
                    "data": {key: value for key, value in request.data.items() if key != WEBHOOK_URL_KEY},
                },
            },
        )

    @staticmethod
    def _warn_if_multipart(message_row: int, request: SendRequest, text: str) -> None:
        length = sms_length(text)
        if length.segments > 1:
            # Sent anyway: phones join the parts into one message, but providers bill each part.
            log.info(
                "message.sms_multipart",
                message_id=message_row,
                journey=request.journey,
                step=request.step,
                template=request.template,
                encoding=length.encoding,
                segments=length.segments,
            )

    async def _deliver(
        self, message_row: int, request: SendRequest, send: Callable[[MarkSending], Awaitable[Delivery]]
    ) -> SendResult:
        """Run `send`, which calls its argument just before the message can reach the provider."""

        async def mark_sending() -> None:
            await self.pool.execute(
                "UPDATE messages SET status = 'sending', updated_at = now() WHERE id = $1", message_row
            )

        try:
            delivery = await send(mark_sending)
        except PermanentSendError as error:
            return await self._finish(message_row, "failed", str(error), level="error")
        except DeliveryUnknownError as error:
            return await self._finish(message_row, "unknown", str(error), level="warning")
        except RetryableSendError as error:
            await self.pool.execute(
                "UPDATE messages SET status = 'claimed', reason = $2, updated_at = now() WHERE id = $1 AND status IN ('claimed', 'sending')",
                message_row,
                str(error),
            )
            log.warning(
                "message.send_retried",
                message_id=message_row,
                journey=request.journey,
                step=request.step,
                channel=request.channel,
                error=str(error),
            )
            if isinstance(error, RetryAfterError):
                # The provider said when to come back; Temporal waits that long instead of its backoff.
                raise ApplicationError(
                    str(error), type=type(error).__name__, next_retry_delay=timedelta(seconds=error.retry_after)
                ) from error
            raise
        return await self._finish(
            message_row,
            "sent",
            None,
            provider_response=delivery.provider_response,
            provider_message_id=delivery.provider_message_id,
        )

    async def _claim(self, request: SendRequest) -> asyncpg.Record:
        row = await self.pool.fetchrow(
            """
            INSERT INTO messages (
                idempotency_key, customer_id, journey, workflow_id, step, template, channel,
                transactional, status, step_at, attempts, priority, topic, droppable, deadline
            ) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'claimed', $9, 1, $10, $11, $12, $13)
            ON CONFLICT (idempotency_key) DO UPDATE SET attempts = messages.attempts + 1, updated_at = now()
            RETURNING id, status, reason, provider_message_id
            """,
            request.idempotency_key,
            request.customer_id,
            request.journey,
            request.workflow_id,
            request.step,
            request.template,
            request.channel,
            request.transactional,
            request.step_at,
            request.priority,
            request.topic,
            request.droppable,
            request.deadline,
        )
        if row is None:
            raise RuntimeError("claiming the message row returned nothing")
        return row

    async def _stored_since(self, names: list[str], since: datetime | None, customer_id: str) -> str | None:
        """Return the name of the first event among `names` stored for the customer since `since`.

        Catches events stored but not yet delivered to the journey, such as an order placed
        before a reminder is due that reaches the workflow after it.
        """
        if not names or since is None:
            return None
        return await self.pool.fetchval(
            """
            SELECT name FROM events
            WHERE customer_id = $1 AND type = 'track' AND name = ANY($2::text[]) AND timestamp >= $3
            ORDER BY timestamp LIMIT 1
            """,
            customer_id,
            names,
            since,
        )

    @staticmethod
    def _headers(request: SendRequest, unsubscribe_url: str | None) -> dict[str, str]:
        headers = {"X-Bisik-Journey": request.journey, "X-Bisik-Step": request.step}
        if unsubscribe_url is not None:
            # One-click unsubscribe (RFC 8058): mail clients POST to this URL on the user's behalf.
            headers["List-Unsubscribe"] = f"<{unsubscribe_url}>"
            headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        return headers

    def _context(self, request: SendRequest, profile: Profile, unsubscribe_url: str | None) -> dict[str, Any]:
        return {
            **request.data,
            "unsubscribe_url": unsubscribe_url,
            "preference_url": preference_url(self.links, self.settings.public_url, profile.customer_id),
            "transactional": request.transactional,
            "customer": {
                "first_name": profile.first_name,
                "email": profile.email,
                "phone": profile.phone,
                "traits": profile.traits,
            },
            "brand_name": self.settings.brand_name,
            "shop_url": self.settings.shop_url.rstrip("/"),
            "public_url": self.settings.public_url.rstrip("/"),
        }

    async def _finish(
        self,
        message_row: int,
        status: str,
        reason: str | None,
        *,
        provider_response: str | None = None,
        provider_message_id: str | None = None,
        level: str = "info",
    ) -> SendResult:
        row = await self.pool.fetchrow(
            """
            UPDATE messages SET
                status = $2,
                reason = $3,
                provider_response = COALESCE($4, provider_response),
                provider_message_id = COALESCE($5, provider_message_id),
                sent_at = CASE WHEN $2 = 'sent' THEN now() ELSE sent_at END,
                updated_at = now()
            WHERE id = $1
            RETURNING id, status, reason, provider_message_id, customer_id, journey, workflow_id, step, template,
                recipient, channel
            """,
            message_row,
            status,
            reason,
            provider_response,
            provider_message_id,
        )
        if status == "sent":
            await webhooks.enqueue(
                self.pool,
                self.settings,
                "message.sent",
                {
                    "message_id": row["id"],
                    "customer_id": row["customer_id"],
                    "journey": row["journey"],
                    "workflow_id": row["workflow_id"],
                    "step": row["step"],
                    "template": row["template"],
                    "channel": row["channel"],
                },
            )
        getattr(log, level)(
            LOG_EVENTS[status],
            message_id=row["id"],
            workflow_id=row["workflow_id"],
            customer_id=row["customer_id"],
            journey=row["journey"],
            step=row["step"],
            template=row["template"],
            channel=row["channel"],
            recipient=mask_recipient(row["channel"], row["recipient"]),
            reason=reason,
        )
        return self._result_of(row)

    @staticmethod
    def _result_of(row: asyncpg.Record) -> SendResult:
        return SendResult(
            status=row["status"],
            reason=row["reason"],
            message_id=row["id"],
            provider_message_id=row["provider_message_id"],
        )
