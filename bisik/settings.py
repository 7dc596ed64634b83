"""All of Bisik's configuration, read from `BISIK_` environment variables or a `.env` file."""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bisik.policy import QuietHours, parse_caps
from bisik.urls import check_url_syntax

# Values that ship in this file for local development. Outside development they must be replaced.
DEVELOPMENT_WRITE_KEY = "dev-write-key"
DEVELOPMENT_SECRET_KEY = "dev-secret-key-change-me"


class Settings(BaseSettings):
    """Bisik's settings. Every field is read from `BISIK_<FIELD NAME>`, for example `BISIK_API_PORT`."""

    model_config = SettingsConfigDict(
        env_prefix="BISIK_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    environment: Literal["development", "production"] = Field(
        "development",
        description="`production` rejects the development write key and secret key.",
    )
    home: Path = Field(
        Path(".bisik"),
        description="Folder for the local stack's data: PostgreSQL, Temporal's SQLite file, received mail.",
    )

    # PostgreSQL
    database_url: str | None = Field(
        None,
        description="PostgreSQL connection URL. `bisik dev` sets it to its embedded server.",
    )
    database_pool_min_size: int = Field(2, ge=1)
    database_pool_max_size: int = Field(20, ge=1)

    # Temporal
    temporal_address: str = Field("127.0.0.1:7233", description="Temporal frontend, host:port.")
    temporal_namespace: str = "default"
    temporal_task_queue: str = "bisik-journeys"
    temporal_ui_port: int = Field(8233, ge=1, le=65535, description="Web UI port of `bisik dev`'s Temporal.")
    temporal_search_attributes: bool = Field(
        True,
        description="Set the CustomerId and Journey search attributes on each journey workflow.",
    )

    # Worker
    worker_workflow_task_pollers: int = Field(20, ge=1)
    worker_max_cached_workflows: int = Field(
        4000,
        ge=0,
        description=(
            "Journeys a worker keeps in memory, about 85 KB each; fewer than the open journeys it "
            "serves makes it replay histories (see docs/benchmarks.md)."
        ),
    )
    worker_max_concurrent_activities: int = Field(100, ge=1)
    worker_runs_relay: bool = Field(
        True,
        description="Run the outbox relay, which routes stored events into journeys, inside `bisik worker`.",
    )

    # Outbox relay
    relay_batch_size: int = Field(500, ge=1, le=10_000)
    relay_concurrency: int = Field(32, ge=1, le=1000, description="Customers dispatched in parallel.")
    relay_poll_interval_seconds: float = Field(
        1.0, gt=0, description="How often the relay looks for events when no notification arrives."
    )
    relay_max_backoff_seconds: float = Field(60.0, gt=0)
    start_max_delay_hours: float = Field(
        72.0,
        gt=0,
        description=(
            "An event that reaches Bisik more than this many hours after it happened (a backfill, an"
            " import of old history) starts no journey; it still reaches journeys already running."
        ),
    )

    # HTTP API
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    public_url: str = Field(
        "http://127.0.0.1:8000",
        description="Base URL of the API as customers reach it, for links in messages.",
    )
    write_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=lambda: [SecretStr(DEVELOPMENT_WRITE_KEY)],
        description="Accepted Segment write keys, comma-separated.",
    )
    secret_key: SecretStr = Field(
        SecretStr(DEVELOPMENT_SECRET_KEY),
        description="Key that signs links in messages (unsubscribe, click tracking).",
    )
    max_call_bytes: int = Field(32 * 1024, ge=1024, description="Largest single call body, in bytes.")
    max_batch_bytes: int = Field(500 * 1024, ge=1024, description="Largest batch body, in bytes.")

    # Email
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(1025, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_start_tls: bool = False
    smtp_use_tls: bool = False
    smtp_timeout_seconds: float = Field(10.0, gt=0)
    mail_from: str = "Bisik Demo Store <hello@example.com>"
    brand_name: str = Field("Bisik Demo Store", description="Shop name used in message copy.")
    shop_url: str = Field("https://shop.example.com", description="The shop's own site, for cart and review links.")
    default_currency: str = Field("USD", description="Currency of prices that arrive without one (ISO 4217).")
    send_timeout_seconds: float = Field(
        60.0, gt=0, description="Longest one attempt to send a message may take before Temporal retries it."
    )

    # WhatsApp and SMS
    whatsapp_api_base_url: str = Field(
        "https://graph.facebook.com", description="WhatsApp Cloud API host; tests point it at a local server."
    )
    whatsapp_api_version: str = Field("v21.0", description="Graph API version in the message endpoint's path.")
    whatsapp_phone_number_id: str | None = Field(None, description="The WhatsApp business phone number id that sends.")
    whatsapp_access_token: SecretStr | None = None
    sms_api_url: str | None = Field(None, description="Endpoint of the HTTP SMS provider that receives one POST per message.")
    sms_api_key: SecretStr | None = None
    sms_sender: str = Field("Bisik", description="Sender id or number shown on SMS.")
    channel_timeout_seconds: float = Field(10.0, gt=0, description="Timeout of one request to a WhatsApp, SMS or webhook provider.")
    default_phone_region: str = Field(
        "ID", description="ISO 3166 region for phone numbers written without a country code (0812...)."
    )

    # Tracking and preferences
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"],
        description="Origins allowed to call the ingest API from a browser (track.js), comma-separated.",
    )
    preference_topics: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["promotions", "new_arrivals", "tips"],
        description="Marketing topics customers can switch on and off on the preference page.",
    )

    # Outbound webhooks
    webhook_url: str | None = Field(
        None, description="Receives journey events (entered, message sent, exited, converted) as signed JSON."
    )
    webhook_secret: SecretStr | None = Field(None, description="Signs webhook bodies with HMAC-SHA256.")
    webhook_max_attempts: int = Field(12, ge=1, le=100)
    allow_private_urls: bool = Field(
        False,
        description="Let webhook and provider URLs reach loopback and private addresses (development only).",
    )

    # Contact policy
    frequency_caps: str = Field(
        "email:1/16h,email:3/7d",
        description="Marketing caps per customer, CHANNEL:COUNT/WINDOW, comma-separated; empty for none.",
    )
    quiet_hours: str = Field(
        "21:00-08:00",
        description="Local hours without marketing, HH:MM-HH:MM in the customer's time zone, or `off`.",
    )
    email_requires_consent: bool = Field(
        False, description="Send marketing email only to customers who granted email consent."
    )

    # Journeys
    template_dir: Path | None = Field(
        None,
        description="Folder replacing the shipped templates: `email/`, `whatsapp/` and `sms/` as in `templates/`.",
    )
    default_locale: Literal["en", "id"] = "en"
    default_timezone: str = "Asia/Jakarta"
    high_intent_pages: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["/pricing", "/demo", "Pricing", "Demo"],
        description="Page paths or names that count as high intent, comma-separated.",
    )
    time_scale: float = Field(
        1.0,
        gt=0,
        description="Divides every journey delay; 60 turns an hour into a minute. For demos and staging.",
    )

    # Logging
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="`auto` writes JSON unless standard error is a terminal."
    )

    @field_validator("write_keys", "high_intent_pages", "cors_origins", "preference_topics", mode="before")
    @classmethod
    def _split_comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("write_keys")
    @classmethod
    def _require_write_key(cls, value: list[SecretStr]) -> list[SecretStr]:
        if not value:
            raise ValueError("at least one write key is required")
        return value

    @field_validator("frequency_caps")
    @classmethod
    def _check_caps(cls, value: str) -> str:
        parse_caps(value)
        return value

    @field_validator("quiet_hours")
    @classmethod
    def _check_quiet_hours(cls, value: str) -> str:
        QuietHours.parse(value)
        return value

    @field_validator("webhook_url")
    @classmethod
    def _check_webhook_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_url_syntax(value)
        return value

    @model_validator(mode="after")
    def _require_webhook_secret(self) -> Settings:
        if self.webhook_url is not None and not self.webhook_secret:
            raise ValueError("BISIK_WEBHOOK_SECRET is required when BISIK_WEBHOOK_URL is set")
        return self

    @model_validator(mode="after")
    def _reject_development_secrets_in_production(self) -> Settings:
        if self.environment != "production":
            return self
        if any(key.get_secret_value() == DEVELOPMENT_WRITE_KEY for key in self.write_keys):
            raise ValueError(
                f"BISIK_WRITE_KEYS contains the development key {DEVELOPMENT_WRITE_KEY!r}; "
                "set your own keys in production"
            )
        if self.secret_key.get_secret_value() == DEVELOPMENT_SECRET_KEY:
            raise ValueError("BISIK_SECRET_KEY is the development default; set a random secret in production")
        if len(self.secret_key.get_secret_value()) < 32:
            raise ValueError("BISIK_SECRET_KEY must be at least 32 characters in production")
        return self

    @cached_property
    def sources_by_write_key(self) -> dict[str, str]:
        """Map each write key to its source id, a fingerprint stored with events instead of the key."""
        return {key.get_secret_value(): source_id(key.get_secret_value()) for key in self.write_keys}

    @property
    def temporal_host(self) -> str:
        return self.temporal_address.rsplit(":", 1)[0]

    @property
    def temporal_port(self) -> int:
        return int(self.temporal_address.rsplit(":", 1)[1])


def source_id(write_key: str) -> str:
    """Return the id under which events sent with this write key are stored and deduplicated."""
    return "src_" + hashlib.sha256(write_key.encode()).hexdigest()[:16]
