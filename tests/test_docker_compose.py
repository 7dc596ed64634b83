"""docker-compose.yml, the Dockerfile and .dockerignore, checked without a Docker engine.

Nothing here starts a container. The tests parse the compose file, resolve its `${...}`
references the way Compose does, and compare the result with Bisik's settings class and
command line, so a renamed setting or command breaks a test instead of a deployment.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import typer
import yaml
from pydantic import ValidationError

from bisik.cli import app
from bisik.settings import DEVELOPMENT_SECRET_KEY, DEVELOPMENT_WRITE_KEY, Settings

REPOSITORY = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPOSITORY / "docker-compose.yml"
DOCKERFILE = REPOSITORY / "Dockerfile"
DOCKERIGNORE = REPOSITORY / ".dockerignore"

BISIK_SERVICES = ("migrate", "api", "worker")
IMAGE_BY_SERVICE = {
    "postgres": "postgres",
    "temporal-postgres": "postgres",
    "temporal-schema": "temporalio/admin-tools",
    "temporal": "temporalio/server",
    "temporal-namespace": "temporalio/admin-tools",
    "temporal-ui": "temporalio/ui",
    "mailpit": "axllent/mailpit",
    "migrate": "bisik",
    "api": "bisik",
    "worker": "bisik",
}
COMMAND_BY_SERVICE = {
    "migrate": ["bisik", "migrate", "--temporal"],
    "api": ["bisik", "api"],
    "worker": ["bisik", "worker"],
}

# Host variables the compose file may read besides Bisik's own settings.
HOST_VARIABLES = {"POSTGRES_PASSWORD", "TEMPORAL_POSTGRES_PASSWORD"}

# Stand-ins for what an operator exports before `docker compose up`.
OPERATOR_ENVIRONMENT = {
    "BISIK_WRITE_KEYS": "compose-test-write-key,second-compose-test-write-key",
    "BISIK_SECRET_KEY": "compose-test-secret-key-0123456789abcdef",
}

BISIK_VARIABLE = re.compile(r"\bBISIK_[A-Z0-9_]+\b")

# One Compose variable reference: `$$` (a literal dollar), `${NAME}`, `${NAME:-default}`,
# `${NAME-default}`, `${NAME:?message}`, `${NAME?message}`, or a bare `$NAME`.
REFERENCE = re.compile(
    r"""\$(?:
        (?P<escaped>\$)
      | \{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?])(?P<argument>[^}]*))?\}
      | (?P<bare>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)


class MissingVariableError(ValueError):
    """Error for a `${NAME:?message}` or `${NAME?message}` reference whose variable is unset."""


# Reading and resolving the compose file


@functools.cache
def compose_text() -> str:
    return COMPOSE_FILE.read_text(encoding="utf-8")


@functools.cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(compose_text())


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def interpolate(
    text: str, environment: Mapping[str, str], referenced: set[str] | None = None
) -> str:
    """Replace each variable reference in `text` as Compose does, adding each name to `referenced`.

    Raises MissingVariableError for a `?` reference whose variable is unset (or empty, with `:?`).
    """

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"

        name = match["braced"] or match["bare"]
        if referenced is not None:
            referenced.add(name)

        value = environment.get(name)
        operator = match["operator"] or ""
        unset = value is None or (operator.startswith(":") and value == "")
        if not unset:
            return value
        if operator.endswith("-"):
            return match["argument"]
        if operator.endswith("?"):
            raise MissingVariableError(f"{name}: {match['argument']}")
        return ""

    return REFERENCE.sub(replace, text)


def resolve(node: Any, environment: Mapping[str, str], referenced: set[str] | None = None) -> Any:
    """Interpolate every string value under `node`. Keys stay as written, as in Compose."""
    if isinstance(node, str):
        return interpolate(node, environment, referenced)
    if isinstance(node, dict):
        return {key: resolve(value, environment, referenced) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(item, environment, referenced) for item in node]
    return node


def environment_of(definition: Mapping[str, Any]) -> dict[str, str | None]:
    """Return a service's `environment` as a mapping, from either its mapping or its list form.

    None stands for a name given without a value, which Compose copies from the host.
    """
    environment = definition.get("environment") or {}
    if isinstance(environment, dict):
        return {name: None if value is None else str(value) for name, value in environment.items()}

    variables: dict[str, str | None] = {}
    for entry in environment:
        name, separator, value = entry.partition("=")
        variables[name] = value if separator else None
    return variables


def resolved_environment(service_name: str, operator: Mapping[str, str]) -> dict[str, str]:
    environment = environment_of(service(service_name))
    return {
        name: interpolate(value, operator)
        for name, value in environment.items()
        if value is not None
    }


def bisik_settings(environment: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Build Settings from exactly these variables, as a container started with them would."""
    for name in list(os.environ):
        if name.startswith("BISIK_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        if name.startswith("BISIK_"):
            monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


def field_name(variable: str) -> str:
    return variable.removeprefix("BISIK_").lower()


def depends_on(definition: Mapping[str, Any]) -> dict[str, str]:
    """Return each dependency's condition. The list form means `service_started`."""
    dependencies = definition.get("depends_on") or {}
    if isinstance(dependencies, list):
        return {name: "service_started" for name in dependencies}
    return {name: options["condition"] for name, options in dependencies.items()}


def image_repository(image: str) -> str:
    return image.rsplit(":", 1)[0]


def image_tag(image: str) -> str:
    return image.rsplit(":", 1)[1] if ":" in image else ""


@functools.cache
def bisik_commands() -> dict[str, click.Command]:
    return typer.main.get_command(app).commands


@functools.cache
def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) for each Dockerfile instruction, continuations joined."""
    instructions = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


# Helpers


def test_environment_of_reads_list_form() -> None:
    definition = {"environment": ["BISIK_API_PORT=8001", "BISIK_LOG_LEVEL"]}

    assert environment_of(definition) == {"BISIK_API_PORT": "8001", "BISIK_LOG_LEVEL": None}


def test_environment_of_reads_mapping_form() -> None:
    definition = {"environment": {"BISIK_API_PORT": 8001, "BISIK_LOG_LEVEL": None}}

    assert environment_of(definition) == {"BISIK_API_PORT": "8001", "BISIK_LOG_LEVEL": None}


@pytest.mark.parametrize(
    ("text", "environment", "expected"),
    [
        ("${A}", {"A": "set"}, "set"),
        ("${A}", {}, ""),
        ("${A:-fallback}", {"A": ""}, "fallback"),
        ("${A-fallback}", {"A": ""}, ""),
        ("${A-fallback}", {}, "fallback"),
        ("$A and $$A", {"A": "set"}, "set and $A"),
    ],
)
def test_interpolate_follows_compose_rules(
    text: str, environment: dict[str, str], expected: str
) -> None:
    assert interpolate(text, environment) == expected


def test_interpolate_rejects_unset_required_variable() -> None:
    with pytest.raises(MissingVariableError, match="^A: set A$"):
        interpolate("${A:?set A}", {"A": ""})


# Services and how they start


def test_compose_file_parses_as_mapping() -> None:
    assert isinstance(compose(), dict)


@pytest.mark.parametrize("name", sorted(IMAGE_BY_SERVICE))
def test_compose_defines_service(name: str) -> None:
    assert name in compose()["services"]


@pytest.mark.parametrize(("name", "repository"), sorted(IMAGE_BY_SERVICE.items()))
def test_compose_service_runs_expected_image(name: str, repository: str) -> None:
    assert image_repository(service(name)["image"]) == repository


@pytest.mark.parametrize("name", sorted(IMAGE_BY_SERVICE))
def test_compose_image_has_pinned_tag(name: str) -> None:
    tag = image_tag(service(name)["image"])

    assert tag
    assert tag != "latest"


@pytest.mark.parametrize("name", ["postgres", "temporal-postgres"])
def test_compose_postgres_is_version_16_or_newer(name: str) -> None:
    major = int(image_tag(service(name)["image"]).split(".")[0])

    assert major >= 16


@pytest.mark.parametrize("name", ["postgres", "temporal-postgres"])
def test_compose_postgres_volume_holds_versioned_data(name: str) -> None:
    # From PostgreSQL 18 the official image keeps its data in /var/lib/postgresql/18/docker and
    # refuses to start with a volume on the old /var/lib/postgresql/data.
    targets = [volume.split(":")[1] for volume in service(name)["volumes"]]

    assert targets == ["/var/lib/postgresql"]


@pytest.mark.parametrize("name", BISIK_SERVICES)
def test_compose_bisik_service_builds_from_dockerfile(name: str) -> None:
    assert service(name)["build"] == "."


def test_temporal_persists_to_postgres() -> None:
    environment = environment_of(service("temporal"))

    assert environment["DB"] == "postgres12"
    assert environment["POSTGRES_SEEDS"] in compose()["services"]


def test_temporal_mounts_dynamic_config() -> None:
    mounted = {entry["source"] for entry in service("temporal")["configs"]}

    assert mounted == set(compose()["configs"])


def test_temporal_dynamic_config_parses_as_mapping() -> None:
    content = yaml.safe_load(compose()["configs"]["temporal-dynamic-config"]["content"])

    assert isinstance(content, dict)


@pytest.mark.parametrize("name", ["api", "worker"])
def test_compose_service_waits_for_migrate(name: str) -> None:
    assert depends_on(service(name))["migrate"] == "service_completed_successfully"


def test_migrate_waits_for_postgres() -> None:
    assert depends_on(service("migrate"))["postgres"] == "service_healthy"


def test_migrate_waits_for_temporal_namespace() -> None:
    assert depends_on(service("migrate"))["temporal-namespace"] == "service_completed_successfully"


def test_temporal_waits_for_schema_setup() -> None:
    assert depends_on(service("temporal"))["temporal-schema"] == "service_completed_successfully"


def test_compose_dependencies_are_defined_services() -> None:
    services = compose()["services"]
    for name, definition in services.items():
        for dependency in depends_on(definition):
            assert dependency in services, f"{name} depends on undefined service {dependency}"


def test_compose_healthy_conditions_have_healthchecks() -> None:
    services = compose()["services"]
    for name, definition in services.items():
        for dependency, condition in depends_on(definition).items():
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], (
                    f"{name} waits for {dependency} to be healthy, "
                    f"but {dependency} has no healthcheck"
                )


@pytest.mark.parametrize("name", BISIK_SERVICES)
def test_compose_command_matches_bisik_service(name: str) -> None:
    assert service(name)["command"] == COMMAND_BY_SERVICE[name]


@pytest.mark.parametrize("name", BISIK_SERVICES)
def test_compose_command_is_bisik_subcommand(name: str) -> None:
    program, subcommand, *arguments = service(name)["command"]

    assert program == "bisik"
    assert subcommand in bisik_commands()

    # Parsing the options raises click's UsageError for an unknown or misspelled one.
    bisik_commands()[subcommand].make_context(subcommand, list(arguments))


def test_migrate_command_registers_search_attributes() -> None:
    _, subcommand, *arguments = service("migrate")["command"]

    context = bisik_commands()[subcommand].make_context(subcommand, list(arguments))

    assert context.params["temporal"] is True


def test_compose_publishes_ports_on_loopback_only() -> None:
    for name, definition in compose()["services"].items():
        for port in definition.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


# Bisik's settings in the compose file


def test_compose_names_only_real_settings() -> None:
    for variable in sorted(set(BISIK_VARIABLE.findall(compose_text()))):
        assert field_name(variable) in Settings.model_fields, f"{variable} is not a Bisik setting"


@pytest.mark.parametrize("name", sorted(IMAGE_BY_SERVICE))
def test_compose_environment_keys_are_real_settings(name: str) -> None:
    for variable in environment_of(service(name)):
        if variable.startswith("BISIK_"):
            message = f"{name}: {variable} is not a Bisik setting"
            assert field_name(variable) in Settings.model_fields, message


def test_compose_reads_only_known_host_variables() -> None:
    # Also catches a shell variable in a command written `$name` instead of `$$name`, which
    # Compose would replace with a host value, usually the empty string.
    referenced: set[str] = set()
    resolve(compose(), OPERATOR_ENVIRONMENT, referenced)

    for name in sorted(referenced):
        if name.startswith("BISIK_"):
            assert field_name(name) in Settings.model_fields, f"{name} is not a Bisik setting"
        else:
            assert name in HOST_VARIABLES, f"unexpected host variable {name}"


def test_compose_contains_no_development_write_key() -> None:
    assert DEVELOPMENT_WRITE_KEY not in compose_text()


def test_compose_contains_no_development_secret_key() -> None:
    assert DEVELOPMENT_SECRET_KEY not in compose_text()


@pytest.mark.parametrize("name", BISIK_SERVICES)
def test_compose_values_avoid_development_secrets(name: str) -> None:
    for variable, value in environment_of(service(name)).items():
        if not variable.startswith("BISIK_") or value is None:
            continue
        resolved = interpolate(value, OPERATOR_ENVIRONMENT)
        assert resolved != DEVELOPMENT_SECRET_KEY, f"{name}: {variable}"
        for part in resolved.split(","):
            assert part.strip() != DEVELOPMENT_WRITE_KEY, f"{name}: {variable}"


@pytest.mark.parametrize("variable", ["BISIK_WRITE_KEYS", "BISIK_SECRET_KEY"])
@pytest.mark.parametrize("name", BISIK_SERVICES)
def test_compose_requires_secret_from_operator(name: str, variable: str) -> None:
    operator = {key: value for key, value in OPERATOR_ENVIRONMENT.items() if key != variable}

    with pytest.raises(MissingVariableError, match=f"^{variable}: set {variable} "):
        resolved_environment(name, operator)


@pytest.mark.parametrize("name", BISIK_SERVICES)
def test_compose_settings_validate_in_production(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = bisik_settings(resolved_environment(name, OPERATOR_ENVIRONMENT), monkeypatch)

    assert settings.environment == "production"
    assert settings.temporal_address == "temporal:7233"
    assert settings.smtp_host == "mailpit"
    assert settings.smtp_port == 1025
    assert [key.get_secret_value() for key in settings.write_keys] == [
        "compose-test-write-key",
        "second-compose-test-write-key",
    ]
    assert settings.secret_key.get_secret_value() == OPERATOR_ENVIRONMENT["BISIK_SECRET_KEY"]


@pytest.mark.parametrize("name", ["migrate", "api"])
def test_compose_settings_match_worker_settings(name: str) -> None:
    shared = resolved_environment("worker", OPERATOR_ENVIRONMENT)
    environment = resolved_environment(name, OPERATOR_ENVIRONMENT)
    environment.pop("BISIK_API_HOST", None)

    assert environment == shared


def test_compose_settings_reject_development_write_key(monkeypatch: pytest.MonkeyPatch) -> None:
    operator = {**OPERATOR_ENVIRONMENT, "BISIK_WRITE_KEYS": DEVELOPMENT_WRITE_KEY}
    environment = resolved_environment("api", operator)

    with pytest.raises(ValidationError, match="development key"):
        bisik_settings(environment, monkeypatch)


def test_compose_settings_reject_development_secret_key(monkeypatch: pytest.MonkeyPatch) -> None:
    operator = {**OPERATOR_ENVIRONMENT, "BISIK_SECRET_KEY": DEVELOPMENT_SECRET_KEY}
    environment = resolved_environment("api", operator)

    with pytest.raises(ValidationError, match="development default"):
        bisik_settings(environment, monkeypatch)


def test_api_listens_on_all_container_interfaces(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = bisik_settings(resolved_environment("api", OPERATOR_ENVIRONMENT), monkeypatch)

    assert settings.api_host == "0.0.0.0"
    assert f"127.0.0.1:{settings.api_port}:{settings.api_port}" in service("api")["ports"]


def test_database_url_matches_postgres_service(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = bisik_settings(resolved_environment("api", OPERATOR_ENVIRONMENT), monkeypatch)
    url = urlsplit(settings.database_url)
    postgres = resolved_environment("postgres", OPERATOR_ENVIRONMENT)

    assert url.hostname == "postgres"
    assert url.port == 5432
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"]
    assert url.path == "/" + postgres["POSTGRES_DB"]


def test_database_password_follows_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    operator = {**OPERATOR_ENVIRONMENT, "POSTGRES_PASSWORD": "operator-password"}
    settings = bisik_settings(resolved_environment("api", operator), monkeypatch)
    postgres = resolved_environment("postgres", operator)

    assert urlsplit(settings.database_url).password == "operator-password"
    assert postgres["POSTGRES_PASSWORD"] == "operator-password"


def test_temporal_namespace_matches_bisik_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = bisik_settings(resolved_environment("migrate", OPERATOR_ENVIRONMENT), monkeypatch)

    assert environment_of(service("temporal-namespace"))["NAMESPACE"] == settings.temporal_namespace


# The image


def test_dockerfile_builds_on_python_311_slim() -> None:
    bases = [
        arguments.split()[0]
        for keyword, arguments in dockerfile_instructions()
        if keyword == "FROM"
    ]

    assert bases
    assert set(bases) == {"python:3.11-slim"}


def test_dockerfile_runs_as_non_root_user() -> None:
    users = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "USER"]

    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_default_command_is_bisik_subcommand() -> None:
    commands = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "CMD"]
    program, subcommand, *_ = json.loads(commands[-1])

    assert program == "bisik"
    assert subcommand in bisik_commands()


def test_dockerignore_keeps_env_file_out_of_build() -> None:
    patterns = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()

    assert ".env" in patterns
