"""WhatsApp, SMS and webhook channels against local HTTP servers that check requests the way each
provider documents them and respond the way it does.

The servers run on 127.0.0.1 in threads, so BISIK_ALLOW_PRIVATE_URLS is on in these tests, except
where a test checks that loopback, private and link-local provider URLs are rejected.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr
from temporalio.client import WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from activities.channels import (
    DeliveryUnknownError,
    PermanentSendError,
    RetryableSendError,
    RetryAfterError,
    SmsMessage,
    SmsSender,
    WebhookMessage,
    WebhookSender,
    WhatsAppMessage,
    WhatsAppSender,
    mask_recipient,
    sms_length,
)
from activities.messaging import MessagingActivities
from activities.suppressions import SuppressionStore
from activities.templates import RenderedWhatsApp, RenderError, TemplateNotFound, TemplateRenderer
from activities.webhooks import verify_signature
from bisik.models import SendRequest
from bisik.phones import InvalidPhoneNumber, mask_phone, normalize_phone, parse_phone
from bisik.settings import Settings
from tests.helpers import assert_eventually, store_call
from tests.journey_fixtures import JourneyHarness
from tests.journeys import ChannelProbe, ConsentProbe
from workers.stack import MailSink, free_port
from workers.worker import build_worker

API_VERSION = "v21.0"
PHONE_NUMBER_ID = "106540352242922"
ACCESS_TOKEN = "test-whatsapp-token"
SMS_API_KEY = "test-sms-key"
WEBHOOK_SECRET = "test-webhook-secret"
CART = {
    "items": [
        {"product_id": "kaos-1", "name": "Kaos Polos", "price": 150000.0, "quantity": 1},
        {"product_id": "topi-2", "name": "Topi Rimba", "price": 50000.0, "quantity": 1},
    ],
    "total": 200000.0,
    "currency": "IDR",
}
TEMPLATE = RenderedWhatsApp(name="bisik_cart_reminder", language="id", parameters=["Kak Siti", "Kaos Polos"], locale="id")


# A provider on loopback


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int
    body: Any = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


class FakeProvider:
    """An HTTP server on 127.0.0.1 that responds to each request like a provider would.

    `check` returns the provider's error reply for a request that breaks its documented rules, or
    None; a valid request gets the next scripted reply, else `success(request)`. Requests given
    a 2xx status are `accepted`, with their reply, even when the client stopped waiting.
    """

    def __init__(self, check: Callable[[ReceivedRequest], Reply | None], success: Callable[[ReceivedRequest], Reply]):
        self.check = check
        self.success = success
        self.script: deque[Reply] = deque()
        self.requests: list[ReceivedRequest] = []
        self.accepted: list[tuple[ReceivedRequest, Reply]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def queue(self, *replies: Reply) -> None:
        """Reply to the next valid requests with `replies`, in order."""
        self.script.extend(replies)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _reply_to(self, request: ReceivedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            reply = self.check(request) or (self.script.popleft() if self.script else self.success(request))
            if 200 <= reply.status < 300:
                self.accepted.append((request, reply))
        return reply

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {name.lower(): value for name, value in self.headers.items()}
                reply = provider._reply_to(ReceivedRequest("POST", self.path, headers, body))
                time.sleep(reply.delay)
                content = b"" if reply.body is None else json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(content)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(content)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def graph_error(status: int, code: int, message: str) -> Reply:
    """An error reply shaped like the Cloud API's."""
    return Reply(status, {"error": {"message": f"(#{code}) {message}", "type": "OAuthException", "code": code, "fbtrace_id": "trace"}})


def check_cloud_api(request: ReceivedRequest) -> Reply | None:
    """Reject requests the way the Cloud API does when they break its documented shape."""
    if request.headers.get("authorization") != f"Bearer {ACCESS_TOKEN}":
        return graph_error(401, 190, "Invalid OAuth access token")
    problems = []
    if request.path != f"/{API_VERSION}/{PHONE_NUMBER_ID}/messages":
        problems.append(f"unknown path {request.path}")
    if not request.headers.get("content-type", "").startswith("application/json"):
        problems.append("body must be JSON")
    try:
        body = request.json
    except ValueError:
        return graph_error(400, 100, "Invalid parameter: body is not JSON")
    template = body.get("template") or {}
    components = template.get("components") or []
    if body.get("messaging_product") != "whatsapp":
        problems.append("messaging_product must be whatsapp")
    if body.get("recipient_type") != "individual":
        problems.append("recipient_type must be individual")
    if not str(body.get("to", "")).isdigit():
        problems.append("to must be the phone number's digits")
    if body.get("type") != "template" or not isinstance(template.get("name"), str):
        problems.append("type must be template, with a template name")
    if not isinstance((template.get("language") or {}).get("code"), str):
        problems.append("template.language.code is required")
    for component in components:
        if component.get("type") != "body":
            problems.append("only body components are expected")
        for parameter in component.get("parameters", []):
            if parameter.get("type") != "text" or not parameter.get("text"):
                problems.append("body parameters must be non-empty text")
    return graph_error(400, 100, "Invalid parameter: " + "; ".join(problems)) if problems else None


def cloud_api_success(request: ReceivedRequest) -> Reply:
    to = request.json["to"]
    return Reply(200, {"messaging_product": "whatsapp", "contacts": [{"input": to, "wa_id": to}], "messages": [{"id": f"wamid.{len(to)}-{time.monotonic_ns()}"}]})


def check_sms_api(request: ReceivedRequest) -> Reply | None:
    if request.headers.get("authorization") != f"Bearer {SMS_API_KEY}":
        return Reply(401, {"error": "invalid API key"})
    body = request.json
    if request.path != "/sms" or set(body) != {"to", "from", "text"} or not str(body["to"]).startswith("+"):
        return Reply(400, {"error": "expected {to: E.164, from, text} at /sms"})
    return None


def check_webhook(request: ReceivedRequest) -> Reply | None:
    if not verify_signature(WEBHOOK_SECRET, request.headers.get("x-bisik-signature", ""), request.body):
        return Reply(401, {"error": "bad signature"})
    return None


@pytest.fixture
def providers() -> Iterator[Callable[..., FakeProvider]]:
    started: list[FakeProvider] = []

    def start(kind: str) -> FakeProvider:
        checks = {
            "whatsapp": (check_cloud_api, cloud_api_success),
            "sms": (check_sms_api, lambda request: Reply(201, {"message_id": 4711})),
            "webhook": (check_webhook, lambda request: Reply(204)),
        }
        provider = FakeProvider(*checks[kind])
        provider.start()
        started.append(provider)
        return provider

    yield start
    for provider in started:
        provider.stop()


def channel_settings(settings: Settings | None = None, **overrides: Any) -> Settings:
    """Settings with every channel configured; `settings` (a test's own) is changed in place."""
    settings = settings or Settings(_env_file=None)  # type: ignore[call-arg]
    values: dict[str, Any] = {
        "allow_private_urls": True,
        "whatsapp_api_version": API_VERSION,
        "whatsapp_phone_number_id": PHONE_NUMBER_ID,
        "whatsapp_access_token": SecretStr(ACCESS_TOKEN),
        "sms_api_key": SecretStr(SMS_API_KEY),
        "sms_sender": "BisikShop",
        "webhook_secret": SecretStr(WEBHOOK_SECRET),
        "channel_timeout_seconds": 1.0,
        **overrides,
    }
    for name, value in values.items():
        setattr(settings, name, value)
    return settings


class SendingMarks:
    """Counts calls of `before_send`: each is the moment a request began to leave."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1


# Phone numbers


@pytest.mark.parametrize(
    ("written", "e164"),
    [
        ("0812-3456-7890", "+6281234567890"),
        ("0812 3456 7890", "+6281234567890"),
        ("+62 812-3456-7890", "+6281234567890"),
        ("+6281234567890", "+6281234567890"),
        ("6281234567890", "+6281234567890"),
        ("62 812 3456 7890", "+6281234567890"),
        ("81234567890", "+6281234567890"),
        ("812-3456-7890", "+6281234567890"),
        ("(021) 5550 1234", "+622155501234"),
        (6281234567890, "+6281234567890"),
        ("+1 650-253-0000", "+16502530000"),
        ("+44 20 7946 0958", "+442079460958"),
    ],
)
def test_phone_normalised_to_e164(written: object, e164: str) -> None:
    assert normalize_phone(written, "ID") == e164


@pytest.mark.parametrize("written", ["0812345", "08123456789012345", "abc", "", "   ", None, True, 8.12, "+62 000 0000", "x" * 100])
def test_invalid_phone_normalised_to_none(written: object) -> None:
    assert normalize_phone(written, "ID") is None


def test_parse_phone_error_omits_number() -> None:
    with pytest.raises(InvalidPhoneNumber) as raised:
        parse_phone("0812345", "ID")

    assert str(raised.value) == "not a valid phone number for region ID"
    assert "812345" not in str(raised.value)


def test_recipients_masked_per_channel() -> None:
    assert mask_phone("+6281234567890") == "+628*******890"
    assert mask_recipient("whatsapp", "+6281234567890") == "+628*******890"
    assert mask_recipient("sms", "+16502530000") == "+165*****000"
    assert mask_recipient("email", "siti@example.com") == "s***@example.com"
    assert mask_recipient("webhook", "https://user:pw@hooks.example.com/in/secret?token=x") == "https://hooks.example.com/..."


# SMS length


@pytest.mark.parametrize(
    ("text", "encoding", "segments"),
    [
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),
        ("a" * 307, "GSM-7", 3),
        ("€" * 80, "GSM-7", 1),  # extension characters take two septets
        ("€" * 81, "GSM-7", 2),
        ("Hai Kak! 🛒" + "a" * 60, "UCS-2", 2),
        ("é" * 70, "GSM-7", 1),
        ("ê" * 70, "UCS-2", 1),
        ("ê" * 71, "UCS-2", 2),
    ],
)
def test_sms_length_counts_segments(text: str, encoding: str, segments: int) -> None:
    length = sms_length(text)

    assert length.encoding == encoding
    assert length.segments == segments


# Channel templates


def template_context(locale: str = "en", first_name: str | None = "Siti", unsubscribe_url: str | None = None) -> dict[str, Any]:
    return {
        "customer": {"first_name": first_name, "email": None, "phone": "+6281234567890", "traits": {}},
        "brand_name": "Bisik Demo Store",
        "shop_url": "https://shop.example.com",
        "public_url": "http://127.0.0.1:8000",
        "transactional": False,
        "unsubscribe_url": unsubscribe_url,
        "cart": CART,
        "locale": locale,
    }


def test_whatsapp_mapping_renders_per_locale() -> None:
    renderer = TemplateRenderer()

    english = renderer.render_whatsapp("cart_reminder_1", "en", template_context())
    indonesian = renderer.render_whatsapp("cart_reminder_1", "id", template_context(first_name=None))

    assert english.name == "bisik_cart_reminder"
    assert english.language == "en"
    assert english.parameters == ["Siti", "Kaos Polos and 1 more", "IDR200,000", "https://shop.example.com/cart"]
    assert indonesian.language == "id"
    assert indonesian.parameters == ["Kak", "Kaos Polos dan 1 barang lainnya", "Rp200.000", "https://shop.example.com/cart"]


def test_sms_templates_fit_two_segments() -> None:
    renderer = TemplateRenderer()
    link = "http://127.0.0.1:8000/u/" + "x" * 110  # as long as a signed unsubscribe token

    for locale in ("en", "id"):
        text = renderer.render_sms("cart_reminder_1", locale, template_context(locale, unsubscribe_url=link)).text
        without_link = renderer.render_sms("cart_reminder_1", locale, template_context(locale)).text

        assert sms_length(text).encoding == "GSM-7"
        assert sms_length(text).segments == 2
        assert sms_length(without_link).segments == 1
        assert text.endswith(link)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ("languages: {en: en}\nbody: []\n", "name must be the approved WhatsApp template's name"),
        ("name: t\nlanguages: [en]\n", "languages must map each locale to a WhatsApp language code"),
        ("name: t\nlanguages: {en: en, id: id}\nbody: {en: ['x']}\n", "body must be a list of parameters, or a mapping"),
        ("name: t\nlanguages: {en: en}\nbody: ['{{ broken']\n", "does not compile"),
    ],
)
def test_whatsapp_mapping_validated(tmp_path: Path, mapping: str, message: str) -> None:
    (tmp_path / "whatsapp").mkdir()
    (tmp_path / "whatsapp" / "broken.yaml").write_text(mapping)

    with pytest.raises(RenderError, match=message):
        TemplateRenderer(tmp_path).render_whatsapp("broken", "en", template_context())


def test_whatsapp_parameter_rendering_empty_rejected(tmp_path: Path) -> None:
    (tmp_path / "whatsapp").mkdir()
    (tmp_path / "whatsapp" / "empty.yaml").write_text("name: t\nlanguages: {en: en}\nbody: ['{{ customer.first_name or \"\" }}']\n")

    with pytest.raises(RenderError, match="body parameter 1 rendered empty"):
        TemplateRenderer(tmp_path).render_whatsapp("empty", "en", template_context(first_name=None))


def test_missing_channel_templates_not_found() -> None:
    renderer = TemplateRenderer()

    with pytest.raises(TemplateNotFound, match="no WhatsApp template mapping 'nope'"):
        renderer.render_whatsapp("nope", "en", template_context())
    with pytest.raises(TemplateNotFound, match="no SMS template 'nope'"):
        renderer.render_sms("nope", "en", template_context())


# The WhatsApp adapter


async def test_whatsapp_request_matches_cloud_api(providers: Callable[..., FakeProvider]) -> None:
    provider = providers("whatsapp")
    sender = WhatsAppSender(channel_settings(whatsapp_api_base_url=provider.url))
    marks = SendingMarks()

    delivery = await sender.send(WhatsAppMessage(to="+6281234567890", template=TEMPLATE), marks)
    await sender.aclose()

    (request,) = provider.requests
    assert request.method == "POST"
    assert request.path == f"/{API_VERSION}/{PHONE_NUMBER_ID}/messages"
    assert request.headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert request.headers["content-type"] == "application/json"
    assert request.json == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "6281234567890",
        "type": "template",
        "template": {
            "name": "bisik_cart_reminder",
            "language": {"code": "id"},
            "components": [
                {"type": "body", "parameters": [{"type": "text", "text": "Kak Siti"}, {"type": "text", "text": "Kaos Polos"}]}
            ],
        },
    }
    assert delivery.provider_message_id is not None
    assert delivery.provider_message_id.startswith("wamid.")
    assert delivery.provider_response == "200 OK"
    assert marks.count == 1


@pytest.mark.parametrize(
    ("reply", "error_type", "message"),
    [
        (graph_error(400, 100, "Invalid parameter"), PermanentSendError, "WhatsApp Cloud API responded with HTTP 400: error 100: (#100) Invalid parameter"),
        (graph_error(400, 132001, "Template name does not exist in the translation"), PermanentSendError, "error 132001"),
        (graph_error(401, 190, "Access token has expired"), PermanentSendError, "check BISIK_WHATSAPP_ACCESS_TOKEN"),
        (graph_error(500, 3, "Capability or permissions issue"), PermanentSendError, "error 3"),
        (graph_error(429, 130429, "Rate limit hit"), RetryableSendError, "HTTP 429: error 130429"),
        (graph_error(400, 131056, "Pair rate limit hit"), RetryableSendError, "HTTP 400: error 131056"),
        (graph_error(400, 4, "Too many calls"), RetryableSendError, "error 4"),
        (graph_error(500, 131000, "Something went wrong"), RetryableSendError, "HTTP 500"),
        (graph_error(503, 131016, "Service unavailable"), RetryableSendError, "HTTP 503"),
        (Reply(502, None), RetryableSendError, "HTTP 502"),
        (Reply(504, None), DeliveryUnknownError, "HTTP 504"),
        (Reply(301, None, headers={"Location": "https://example.com/"}), PermanentSendError, "redirects are not followed"),
    ],
)
async def test_whatsapp_failures_classified(
    providers: Callable[..., FakeProvider], reply: Reply, error_type: type[Exception], message: str
) -> None:
    provider = providers("whatsapp")
    provider.queue(reply)
    sender = WhatsAppSender(channel_settings(whatsapp_api_base_url=provider.url))

    with pytest.raises(error_type) as raised:
        await sender.send(WhatsAppMessage(to="+6281234567890", template=TEMPLATE), SendingMarks())
    await sender.aclose()

    assert type(raised.value) in (error_type, RetryAfterError)
    assert message in str(raised.value)
    assert len(provider.requests) == 1


async def test_whatsapp_rate_limit_honours_retry_after(providers: Callable[..., FakeProvider]) -> None:
    provider = providers("whatsapp")
    limited = graph_error(429, 130429, "Rate limit hit")
    limited.headers["Retry-After"] = "7"
    provider.queue(limited)
    sender = WhatsAppSender(channel_settings(whatsapp_api_base_url=provider.url))

    with pytest.raises(RetryAfterError) as raised:
        await sender.send(WhatsAppMessage(to="+6281234567890", template=TEMPLATE), SendingMarks())
    await sender.aclose()

    assert raised.value.retry_after == 7


async def test_whatsapp_slow_response_delivery_unknown(providers: Callable[..., FakeProvider]) -> None:
    provider = providers("whatsapp")
    provider.queue(Reply(200, {"messages": [{"id": "wamid.late"}]}, delay=2.5))
    sender = WhatsAppSender(channel_settings(whatsapp_api_base_url=provider.url, channel_timeout_seconds=0.5))
    marks = SendingMarks()

    with pytest.raises(DeliveryUnknownError, match="after the request was sent: ReadTimeout"):
        await sender.send(WhatsAppMessage(to="+6281234567890", template=TEMPLATE), marks)
    await sender.aclose()

    assert marks.count == 1
    assert len(provider.accepted) == 1


async def test_unreachable_provider_retryable_before_send() -> None:
    closed_port = free_port()  # nothing listens there
    sender = WhatsAppSender(channel_settings(whatsapp_api_base_url=f"http://127.0.0.1:{closed_port}"))
    marks = SendingMarks()

    with pytest.raises(RetryableSendError, match="was not reached: ConnectError"):
        await sender.send(WhatsAppMessage(to="+6281234567890", template=TEMPLATE), marks)
    await sender.aclose()

    assert marks.count == 0


@pytest.mark.parametrize(
    ("overrides", "to", "message"),
    [
        ({"whatsapp_phone_number_id": None}, "+6281234567890", "WhatsApp is not configured: set BISIK_WHATSAPP_PHONE_NUMBER_ID"),
        ({"whatsapp_access_token": None}, "+6281234567890", "and BISIK_WHATSAPP_ACCESS_TOKEN"),
        ({}, "0812345", "invalid recipient for WhatsApp: not a valid phone number for region ID"),
    ],
)
async def test_whatsapp_unsendable_without_request(
    providers: Callable[..., FakeProvider], overrides: dict[str, Any], to: str, message: str
) -> None:
    provider = providers("whatsapp")
    sender = WhatsAppSender(channel_settings(whatsapp_api_base_url=provider.url, **overrides))

    with pytest.raises(PermanentSendError, match=message):
        await sender.send(WhatsAppMessage(to=to, template=TEMPLATE), SendingMarks())

    assert provider.requests == []


@pytest.mark.parametrize(
    ("kind", "url"),
    [
        ("whatsapp", "loopback"),
        ("sms", "http://10.1.2.3/sms"),
        ("webhook", "http://169.254.169.254/latest/meta-data"),
        ("whatsapp", "http://[::1]:9/"),
    ],
)
async def test_private_provider_url_rejected(providers: Callable[..., FakeProvider], kind: str, url: str) -> None:
    # Only the loopback case has a server behind it; the others must fail before any connection.
    provider = providers(kind)
    url = provider.url + "/sms" if url == "loopback" else url
    settings = channel_settings(allow_private_urls=False, whatsapp_api_base_url=url, sms_api_url=url)
    senders = {
        "whatsapp": lambda marks: WhatsAppSender(settings).send(WhatsAppMessage(to="+6281234567890", template=TEMPLATE), marks),
        "sms": lambda marks: SmsSender(settings).send(SmsMessage(to="+6281234567890", text="hi"), marks),
        "webhook": lambda marks: WebhookSender(settings).send(WebhookMessage(url=url, delivery_id="d", payload={}), marks),
    }
    marks = SendingMarks()

    with pytest.raises(PermanentSendError) as raised:
        await senders[kind](marks)

    assert "URL rejected" in str(raised.value)
    assert "a private or loopback address; set BISIK_ALLOW_PRIVATE_URLS=true only where that is intended" in str(raised.value)
    assert marks.count == 0
    assert provider.requests == []


# The SMS and webhook adapters


async def test_sms_request_matches_provider(providers: Callable[..., FakeProvider]) -> None:
    provider = providers("sms")
    sender = SmsSender(channel_settings(sms_api_url=provider.url + "/sms"))

    delivery = await sender.send(SmsMessage(to="+6281234567890", text="Hai Kak!"), SendingMarks())
    await sender.aclose()

    (request,) = provider.requests
    assert request.path == "/sms"
    assert request.headers["authorization"] == f"Bearer {SMS_API_KEY}"
    assert request.json == {"to": "+6281234567890", "from": "BisikShop", "text": "Hai Kak!"}
    assert delivery.provider_message_id == "4711"
    assert delivery.provider_response == "201 Created"


@pytest.mark.parametrize(
    ("reply", "error_type", "message"),
    [
        (Reply(400, {"error": {"message": "invalid parameter: to"}}), PermanentSendError, "SMS provider responded with HTTP 400: invalid parameter: to"),
        (Reply(401, {"message": "bad key"}), PermanentSendError, "HTTP 401: bad key"),
        (Reply(408, None), RetryableSendError, "HTTP 408"),
        (Reply(429, {"error": "slow down"}), RetryableSendError, "HTTP 429: slow down"),
        (Reply(500, None), RetryableSendError, "HTTP 500"),
        (Reply(503, None), RetryableSendError, "HTTP 503"),
        (Reply(504, None), DeliveryUnknownError, "HTTP 504"),
        (Reply(200, None, delay=2.5), DeliveryUnknownError, "ReadTimeout"),
    ],
)
async def test_sms_failures_classified(
    providers: Callable[..., FakeProvider], reply: Reply, error_type: type[Exception], message: str
) -> None:
    provider = providers("sms")
    provider.queue(reply)
    sender = SmsSender(channel_settings(sms_api_url=provider.url + "/sms", channel_timeout_seconds=0.5))

    with pytest.raises(error_type, match=message):
        await sender.send(SmsMessage(to="+6281234567890", text="Hai Kak!"), SendingMarks())
    await sender.aclose()

    assert len(provider.requests) == 1


async def test_sms_without_configuration_rejected(providers: Callable[..., FakeProvider]) -> None:
    sender = SmsSender(channel_settings(sms_api_url=None))

    with pytest.raises(PermanentSendError, match="SMS is not configured: set BISIK_SMS_API_URL and BISIK_SMS_API_KEY"):
        await sender.send(SmsMessage(to="+6281234567890", text="Hai"), SendingMarks())


async def test_webhook_request_signed(providers: Callable[..., FakeProvider]) -> None:
    provider = providers("webhook")
    sender = WebhookSender(channel_settings())

    delivery = await sender.send(WebhookMessage(url=provider.url + "/in", delivery_id="abc", payload={"data": {"step": "s"}}), SendingMarks())
    await sender.aclose()

    (request,) = provider.requests
    assert verify_signature(WEBHOOK_SECRET, request.headers["x-bisik-signature"], request.body)
    assert request.headers["x-bisik-event"] == "message.webhook"
    assert request.headers["x-bisik-delivery"] == "abc"
    assert request.json == {"id": "abc", "type": "message.webhook", "data": {"step": "s"}}
    assert delivery.provider_response == "204 No Content"


async def test_webhook_without_secret_rejected(providers: Callable[..., FakeProvider]) -> None:
    provider = providers("webhook")
    sender = WebhookSender(channel_settings(webhook_secret=None))

    with pytest.raises(PermanentSendError, match="set BISIK_WEBHOOK_SECRET"):
        await sender.send(WebhookMessage(url=provider.url, delivery_id="d", payload={}), SendingMarks())

    assert provider.requests == []


# send_message over the message log


async def shopper(pool: asyncpg.Pool, user_id: str, *, consent: bool = True, **traits: Any) -> str:
    event = await store_call(pool, {"type": "identify", "userId": user_id, "traits": {"email": f"{user_id}@example.com", **traits}})
    if consent:
        for channel in ("whatsapp", "sms"):
            await store_call(pool, {"type": "track", "userId": user_id, "event": "Consent Updated", "properties": {"channel": channel, "granted": True}})
    return event.customer_id


def send_request(customer_id: str, channel: str, **overrides: Any) -> SendRequest:
    fields: dict[str, Any] = {
        "idempotency_key": f"test:{customer_id}:{channel}",
        "customer_id": customer_id,
        "journey": "abandoned_cart",
        "workflow_id": f"abandoned_cart:{customer_id}",
        "step": "reminder_1",
        "template": "cart_reminder_1",
        "channel": channel,
        "data": {"cart": CART},
        "step_at": datetime.now(UTC),
    }
    return SendRequest(**{**fields, **overrides})


@pytest.fixture
async def messaging(pool: asyncpg.Pool, settings: Settings) -> AsyncIterator[MessagingActivities]:
    activities = MessagingActivities(pool, channel_settings(settings))
    yield activities
    await activities.close()


async def test_whatsapp_send_recorded_like_email(
    pool: asyncpg.Pool, messaging: MessagingActivities, providers: Callable[..., FakeProvider]
) -> None:
    provider = providers("whatsapp")
    messaging.settings.whatsapp_api_base_url = provider.url
    customer_id = await shopper(pool, "wa-1", phone="0812-3456-7890", first_name="Siti", locale="id")

    result = await messaging.send_message(send_request(customer_id, "whatsapp"))

    row = await pool.fetchrow("SELECT * FROM messages")
    (request,) = provider.requests
    assert result.status == "sent"
    assert row["status"] == "sent"
    assert row["channel"] == "whatsapp"
    assert row["recipient"] == "+6281234567890"
    assert row["locale"] == "id"
    assert row["attempts"] == 1
    assert row["provider_response"] == "200 OK"
    assert row["provider_message_id"] == result.provider_message_id
    assert row["provider_message_id"].startswith("wamid.")
    assert request.json["to"] == "6281234567890"
    assert request.json["template"]["language"] == {"code": "id"}
    assert [parameter["text"] for parameter in request.json["template"]["components"][0]["parameters"]] == [
        "Kak Siti", "Kaos Polos dan 1 barang lainnya", "Rp200.000", "https://shop.example.com/cart",
    ]


@pytest.mark.parametrize(
    ("traits", "status", "reason"),
    [
        ({}, "skipped", "no phone number"),
        ({"phone": "  "}, "skipped", "no phone number"),
        ({"phone": "0812345"}, "failed", "invalid phone number in traits.phone: not a valid phone number for region ID"),
    ],
)
async def test_whatsapp_without_usable_phone_not_sent(
    pool: asyncpg.Pool,
    messaging: MessagingActivities,
    providers: Callable[..., FakeProvider],
    traits: dict[str, Any],
    status: str,
    reason: str,
) -> None:
    provider = providers("whatsapp")
    messaging.settings.whatsapp_api_base_url = provider.url
    customer_id = await shopper(pool, "wa-nophone", **traits)

    result = await messaging.send_message(send_request(customer_id, "whatsapp"))

    assert result.status == status
    assert result.reason == reason
    assert provider.requests == []


async def test_whatsapp_timeout_unknown_not_resent(
    pool: asyncpg.Pool, messaging: MessagingActivities, providers: Callable[..., FakeProvider]
) -> None:
    provider = providers("whatsapp")
    provider.queue(Reply(200, {"messages": [{"id": "wamid.late"}]}, delay=2))
    messaging.settings.whatsapp_api_base_url = provider.url
    customer_id = await shopper(pool, "wa-slow", phone="+62 812 3456 7890")
    request = send_request(customer_id, "whatsapp")

    first = await messaging.send_message(request)
    again = await messaging.send_message(request)
    await asyncio.sleep(1.5)  # the held response ends; nothing more may arrive

    assert first.status == "unknown"
    assert first.reason.startswith("no response from WhatsApp Cloud API at http://127.0.0.1:")
    assert again.status == "unknown"
    assert len(provider.requests) == 1


async def test_retry_after_delays_temporal_retry(
    pool: asyncpg.Pool, messaging: MessagingActivities, providers: Callable[..., FakeProvider]
) -> None:
    provider = providers("whatsapp")
    limited = graph_error(429, 130429, "Rate limit hit")
    limited.headers["Retry-After"] = "30"
    provider.queue(limited)
    messaging.settings.whatsapp_api_base_url = provider.url
    customer_id = await shopper(pool, "wa-limited", phone="081234567890")

    with pytest.raises(ApplicationError) as raised:
        await messaging.send_message(send_request(customer_id, "whatsapp"))

    assert raised.value.next_retry_delay == timedelta(seconds=30)
    assert raised.value.non_retryable is False
    row = await pool.fetchrow("SELECT status, reason FROM messages")
    assert row["status"] == "claimed"
    assert "error 130429" in row["reason"]


async def test_sms_send_recorded(
    pool: asyncpg.Pool, messaging: MessagingActivities, providers: Callable[..., FakeProvider]
) -> None:
    provider = providers("sms")
    messaging.settings.sms_api_url = provider.url + "/sms"
    customer_id = await shopper(pool, "sms-1", phone="6281234567890", first_name="Budi")

    result = await messaging.send_message(send_request(customer_id, "sms"))

    row = await pool.fetchrow("SELECT status, recipient, provider_message_id, locale FROM messages")
    (request,) = provider.requests
    assert result.status == "sent"
    assert dict(row) == {"status": "sent", "recipient": "+6281234567890", "provider_message_id": "4711", "locale": "en"}
    assert request.json["text"].startswith("Bisik Demo Store: Hi Budi, you left Kaos Polos +1 more in your cart (IDR200,000).")
    assert "\nOpt out: http://127.0.0.1:8000/u/" in request.json["text"]


async def test_webhook_send_recorded(
    pool: asyncpg.Pool, messaging: MessagingActivities, providers: Callable[..., FakeProvider]
) -> None:
    provider = providers("webhook")
    customer_id = await shopper(pool, "hook-1", consent=False, first_name="Ayu", phone="0812-3456-7890")
    url = provider.url + "/bisik"

    result = await messaging.send_message(send_request(customer_id, "webhook", data={"cart": CART, "webhook_url": url}))

    row = await pool.fetchrow("SELECT status, recipient FROM messages")
    (request,) = provider.requests
    body = request.json
    assert result.status == "sent"
    assert dict(row) == {"status": "sent", "recipient": url}
    assert body["type"] == "message.webhook"
    assert body["id"] == request.headers["x-bisik-delivery"]
    assert body["data"]["customer_id"] == customer_id
    assert body["data"]["journey"] == "abandoned_cart"
    assert body["data"]["step"] == "reminder_1"
    assert body["data"]["template"] == "cart_reminder_1"
    assert body["data"]["message_id"] == result.message_id
    assert body["data"]["customer"]["phone"] == "+6281234567890"
    assert body["data"]["data"] == {"cart": CART}


async def test_webhook_without_url_failed(pool: asyncpg.Pool, messaging: MessagingActivities) -> None:
    customer_id = await shopper(pool, "hook-2", consent=False)

    result = await messaging.send_message(send_request(customer_id, "webhook"))

    assert result.status == "failed"
    assert result.reason == "no webhook URL: pass data['webhook_url'] in the send or set BISIK_WEBHOOK_URL"


# Journeys on the time-skipping server


@pytest.fixture
async def channel_journeys(
    time_skipping_env: WorkflowEnvironment, pool: asyncpg.Pool, settings: Settings, mail_sink: MailSink
) -> AsyncIterator[JourneyHarness]:
    settings.smtp_port = mail_sink.port
    channel_settings(settings)
    worker = build_worker(time_skipping_env.client, pool, settings, journeys=[ConsentProbe, ChannelProbe])
    async with worker:
        harness = JourneyHarness(time_skipping_env, worker, pool, mail_sink)
        yield harness
        await harness.terminate_open_workflows()


def days_between(later, earlier) -> float:  # type: ignore[no-untyped-def]
    return round((later - earlier).total_seconds() / 86400, 3)


async def test_email_unsubscribe_keeps_consented_whatsapp(
    channel_journeys: JourneyHarness, settings: Settings, providers: Callable[..., FakeProvider]
) -> None:
    """Consent: email unsubscribe on day 1 stops the day-3 email while a WhatsApp message with
    consent on day 5 still goes."""
    journeys = channel_journeys
    provider = providers("whatsapp")
    settings.whatsapp_api_base_url = provider.url
    customer = await journeys.customer("both-channels", first_name="Siti", locale="id", phone="0812-3456-7890")
    start = await journeys.now()
    await journeys.event("both-channels", "Consent Updated", start, channel="whatsapp", granted=True)
    handle = await journeys.deliver("consent_probe", await journeys.event("both-channels", "Consent Probe Started", start, cart=CART))

    await journeys.env.sleep(timedelta(days=1))
    await SuppressionStore(journeys.pool).suppress(customer, channel="email", reason="unsubscribed", source="link")
    await journeys.env.sleep(timedelta(days=4, hours=1))

    async def finished() -> None:
        assert (await handle.describe()).status.name == "COMPLETED"

    await assert_eventually(finished)
    day_0, day_3, day_5 = await journeys.messages(customer)
    assert (day_0["channel"], day_0["status"]) == ("email", "sent")
    assert (day_3["channel"], day_3["template"]) == ("email", "welcome_tips")
    assert day_3["status"] == "suppressed"
    assert day_3["reason"] == "unsubscribed"
    assert day_3["attempts"] == 1
    assert days_between(day_3["step_at"], start) == 3
    assert len(journeys.mail_to("both-channels@example.com")) == 1
    assert (day_5["channel"], day_5["status"]) == ("whatsapp", "sent")
    assert days_between(day_5["step_at"], start) == 5
    ((request, reply),) = provider.accepted
    assert day_5["provider_message_id"] == reply.body["messages"][0]["id"]
    assert request.json["to"] == "6281234567890"
    assert request.json["template"]["name"] == "bisik_cart_reminder"
    assert request.json["template"]["language"] == {"code": "id"}
    assert [parameter["text"] for parameter in request.json["template"]["components"][0]["parameters"]] == [
        "Kak Siti", "Kaos Polos dan 1 barang lainnya", "Rp200.000", "https://shop.example.com/cart",
    ]


async def start_channel_probe(
    journeys: JourneyHarness, user_id: str, channel: str, *, consent: bool = True, **traits: Any
) -> tuple[str, WorkflowHandle]:
    customer = await journeys.customer(user_id, **traits)
    if consent:
        await journeys.event(user_id, "Consent Updated", None, channel=channel, granted=True)
    event = await journeys.event(user_id, "Channel Probe Started", None, channel=channel, template="cart_reminder_1", data={"cart": CART})
    return customer, await journeys.deliver("channel_probe", event)


async def test_whatsapp_without_consent_suppressed_unsent(
    channel_journeys: JourneyHarness, settings: Settings, providers: Callable[..., FakeProvider]
) -> None:
    provider = providers("whatsapp")
    settings.whatsapp_api_base_url = provider.url
    customer, handle = await start_channel_probe(
        channel_journeys, "no-consent", "whatsapp", consent=False, phone="0812-3456-7890"
    )

    result = await handle.result()

    (row,) = await channel_journeys.messages(customer)
    assert result.outcome == "completed"
    assert row["status"] == "suppressed"
    assert row["reason"] == "no consent: whatsapp marketing needs the customer's consent"
    assert provider.requests == []


async def test_whatsapp_503_retried_accepted_once(
    channel_journeys: JourneyHarness, settings: Settings, providers: Callable[..., FakeProvider]
) -> None:
    provider = providers("whatsapp")
    provider.queue(graph_error(503, 131016, "Service unavailable"), Reply(503, None))
    settings.whatsapp_api_base_url = provider.url
    customer, handle = await start_channel_probe(channel_journeys, "wa-503", "whatsapp", phone="0812-3456-7890")

    await handle.result()

    (row,) = await channel_journeys.messages(customer)
    assert row["status"] == "sent"
    assert row["attempts"] == 3
    assert len(provider.requests) == 3
    assert len(provider.accepted) == 1


async def test_whatsapp_timeout_in_journey_unknown_once(
    channel_journeys: JourneyHarness, settings: Settings, providers: Callable[..., FakeProvider]
) -> None:
    provider = providers("whatsapp")
    provider.queue(Reply(200, {"messages": [{"id": "wamid.late"}]}, delay=2))
    settings.whatsapp_api_base_url = provider.url
    customer, handle = await start_channel_probe(channel_journeys, "wa-slow-journey", "whatsapp", phone="0812-3456-7890")

    await handle.result()
    await asyncio.sleep(1.5)  # the held response ends; nothing more may arrive

    (row,) = await channel_journeys.messages(customer)
    assert row["status"] == "unknown"
    assert row["attempts"] == 1
    assert len(provider.requests) == 1
