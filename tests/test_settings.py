"""Settings: BISIK_ variables, and development secrets rejected in production."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bisik.settings import DEVELOPMENT_SECRET_KEY, DEVELOPMENT_WRITE_KEY, Settings, source_id

STRONG_SECRET = "s" * 40


def test_settings_read_from_bisik_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BISIK_API_PORT", "9001")
    monkeypatch.setenv("BISIK_WRITE_KEYS", "key-one, key-two")
    monkeypatch.setenv("BISIK_TIME_SCALE", "60")

    settings = Settings(_env_file=None)  # type: ignore[call-arg]

    assert settings.api_port == 9001
    assert [key.get_secret_value() for key in settings.write_keys] == ["key-one", "key-two"]
    assert settings.time_scale == 60


def test_development_defaults_work_in_development() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]

    assert settings.sources_by_write_key == {DEVELOPMENT_WRITE_KEY: source_id(DEVELOPMENT_WRITE_KEY)}


def test_production_rejects_development_write_key() -> None:
    with pytest.raises(ValidationError, match="BISIK_WRITE_KEYS contains the development key"):
        Settings(_env_file=None, environment="production", secret_key=STRONG_SECRET)  # type: ignore[call-arg]


def test_production_rejects_development_secret_key() -> None:
    with pytest.raises(ValidationError, match="BISIK_SECRET_KEY is the development default"):
        Settings(_env_file=None, environment="production", write_keys="real-key", secret_key=DEVELOPMENT_SECRET_KEY)  # type: ignore[call-arg]


def test_production_rejects_short_secret_key() -> None:
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(_env_file=None, environment="production", write_keys="real-key", secret_key="short")  # type: ignore[call-arg]


def test_production_accepts_own_secrets() -> None:
    settings = Settings(_env_file=None, environment="production", write_keys="real-key", secret_key=STRONG_SECRET)  # type: ignore[call-arg]

    assert settings.environment == "production"


def test_empty_write_keys_rejected() -> None:
    with pytest.raises(ValidationError, match="at least one write key is required"):
        Settings(_env_file=None, write_keys=" , ")  # type: ignore[call-arg]


def test_time_scale_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="time_scale"):
        Settings(_env_file=None, time_scale=0)  # type: ignore[call-arg]


def test_source_id_hides_the_write_key() -> None:
    assert source_id("my-secret-key").startswith("src_")
    assert "my-secret-key" not in source_id("my-secret-key")
