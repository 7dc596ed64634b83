"""Sending one email over SMTP with aiosmtplib, in steps the caller can record between.

SMTP has no idempotency: once the server has the whole message, the only proof of delivery is
its reply to the end of DATA. `EmailSender.send` therefore runs MAIL FROM and RCPT TO first,
then calls `before_data` (which records that the message may now leave), then sends DATA. A
failure before `before_data` returns means nothing left; a lost reply after it means the
message may have been delivered, and the caller must not send it again.
"""

from __future__ import annotations

import email.policy
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, parseaddr

import aiosmtplib

from bisik.settings import Settings


class PermanentSendError(Exception):
    """The server rejected the message for good (a 5xx reply): retrying cannot help."""


class RetryableSendError(Exception):
    """The message did not leave and may be tried again (connection failed, a 4xx reply)."""


class DeliveryUnknownError(Exception):
    """The server may have accepted the message but its reply was lost (timeout, disconnect)."""


@dataclass(frozen=True)
class OutgoingEmail:
    recipient: str
    subject: str
    text: str
    html: str
    idempotency_key: str
    headers: dict[str, str]


def message_id_for(idempotency_key: str, sender: str) -> str:
    """Return a Message-ID derived from the idempotency key, the same on every attempt.

    Receivers and relays that deduplicate on Message-ID then see a resent message as the same.
    """
    domain = parseaddr(sender)[1].rpartition("@")[2] or "bisik.invalid"
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"<{digest}@{domain}>"


# SMTP line endings, and lines up to RFC 5322's limit of 998 characters. At the default of 78, a
# long header without spaces (a List-Unsubscribe URL) is written as RFC 2047 encoded words, and
# mail providers do not decode those in that header.
MAIL_POLICY = email.policy.SMTP.clone(max_line_length=998)


class EmailSender:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def build(self, email: OutgoingEmail) -> EmailMessage:
        message = EmailMessage(policy=MAIL_POLICY)
        message["From"] = self.settings.mail_from
        message["To"] = email.recipient
        message["Subject"] = email.subject
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = message_id_for(email.idempotency_key, self.settings.mail_from)
        for name, value in email.headers.items():
            message[name] = value
        message.set_content(email.text)
        message.add_alternative(email.html, subtype="html")
        return message

    async def send(self, message: EmailMessage, before_data: Callable[[], Awaitable[None]]) -> str:
        """Send `message`; return the server's reply to DATA. Raises one of the three errors above."""
        settings = self.settings
        client = aiosmtplib.SMTP(
            hostname=settings.smtp_host,
            port=settings.smtp_port,
            timeout=settings.smtp_timeout_seconds,
            use_tls=settings.smtp_use_tls,
            start_tls=settings.smtp_start_tls,
        )
        sender = parseaddr(str(message["From"]))[1]
        recipient = parseaddr(str(message["To"]))[1]
        try:
            await client.connect()
            if settings.smtp_username and settings.smtp_password:
                await client.login(settings.smtp_username, settings.smtp_password.get_secret_value())
            await client.mail(sender)
            await client.rcpt(recipient)
        except aiosmtplib.SMTPResponseException as error:
            await _close(client)
            if 500 <= error.code < 600:
                raise PermanentSendError(f"SMTP server rejected the envelope: {error.code} {error.message}") from error
            raise RetryableSendError(f"SMTP server deferred the envelope: {error.code} {error.message}") from error
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            await _close(client)
            raise RetryableSendError(f"SMTP connection to {settings.smtp_host}:{settings.smtp_port} failed: {error}") from error

        await before_data()

        try:
            response = await client.data(message.as_bytes())
        except aiosmtplib.SMTPResponseException as error:
            await _close(client)
            # An explicit rejection of DATA means the server did not take the message.
            if 500 <= error.code < 600:
                raise PermanentSendError(f"SMTP server rejected the message: {error.code} {error.message}") from error
            raise RetryableSendError(f"SMTP server deferred the message: {error.code} {error.message}") from error
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            await _close(client)
            raise DeliveryUnknownError(f"no reply to DATA from {settings.smtp_host}:{settings.smtp_port}: {error}") from error

        await _close(client)
        return f"{response.code} {response.message}"


async def _close(client: aiosmtplib.SMTP) -> None:
    if not client.is_connected:
        return
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()
