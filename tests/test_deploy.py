"""deploy/compose.yaml, checked without a Docker engine: the topology it promises, and that every command and
setting it gives a gateway container is one this gateway has (an unknown GATEWAY_* variable is silently
ignored by the gateway, so a typo there would only show in production).

tests/gateway/test_many_hosts.py is the proof that the topology works; this keeps the file in step with it.
Where `docker compose` is installed, it validates the file too.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import PLANES, build_parser
from gateway.settings import _CASTS, env_name, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
_VARIABLE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::?[?-][^}]*)?\})")


def _example_environment() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in (DEPLOY / "env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {name: value for name, value in pairs}


def _interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Compose's `${NAME}`, `${NAME:?message}`, `${NAME:-default}` and `$$`, from env.example's values."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            if match[0] == "$$":
                return "$"
            assert match[1] in variables, f"${{{match[1]}}} is used but not in deploy/env.example"
            return variables[match[1]]

        return _VARIABLE.sub(substitute, value)
    if isinstance(value, list):
        return [_interpolate(item, variables) for item in value]
    if isinstance(value, dict):
        return {key: _interpolate(item, variables) for key, item in value.items()}
    return value


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return dict(_interpolate(document["services"], _example_environment()))


def _gateway_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in services.items() if "build" in service}


def test_the_topology_is_postgres_redis_a_migration_one_admin_and_two_proxies(
    services: dict[str, dict[str, Any]],
) -> None:
    assert set(services) == {"postgres", "redis", "migrate", "grants", "admin", "proxy"}
    commands = {name: service["command"][:2] for name, service in _gateway_services(services).items()}
    assert commands == {
        "migrate": ["gateway", "migrate"],
        "admin": ["gateway", "admin"],
        "proxy": ["gateway", "proxy"],
    }
    assert services["proxy"]["deploy"]["replicas"] == 2
    assert services["admin"].get("deploy", {}).get("replicas", 1) == 1
    for one_shot in ("migrate", "grants"):
        assert services[one_shot]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["grants"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for serving in ("admin", "proxy"):
        assert services[serving]["depends_on"]["grants"]["condition"] == "service_completed_successfully"
        assert services[serving]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_gateway_services_build_the_repository_dockerfile_and_run_real_subcommands(
    services: dict[str, dict[str, Any]],
) -> None:
    commands = next(
        action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)
    )
    for name, service in _gateway_services(services).items():
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile", name
        program, subcommand, *flags = service["command"]
        assert program == "gateway" and subcommand in commands.choices and subcommand in PLANES, name
        commands.choices[subcommand].parse_args(flags)  # exits (SystemExit) on an unknown flag


def test_every_gateway_variable_is_a_real_setting_with_a_valid_value(
    services: dict[str, dict[str, Any]],
) -> None:
    known = {env_name(setting) for setting in _CASTS} | {"GATEWAY_CONFIG"}
    for name, service in _gateway_services(services).items():
        environment = {key: str(value) for key, value in service["environment"].items()}
        unknown = {key for key in environment if key.startswith("GATEWAY_")} - known
        assert not unknown, (name, unknown)
        settings = load_settings(environ=environment)  # raises SettingsError naming a bad value
        assert settings.postgres_url is not None and settings.database_path is None, name
        assert settings.redis_url is not None, name
        if name == "proxy":
            settings.require_upstream()
        if name == "admin":
            assert settings.admin_exposure_problem() is None


def test_each_process_connects_as_its_own_database_role(services: dict[str, dict[str, Any]]) -> None:
    roles = {
        name: service["environment"]["GATEWAY_DATABASE_URL"].split("//", 1)[1].split("@", 1)[0]
        for name, service in _gateway_services(services).items()
    }
    assert roles == {"migrate": "gateway_migrate", "admin": "gateway_admin", "proxy": "gateway_proxy"}
    assert services["grants"]["environment"]["PGUSER"] == "gateway_migrate"
    for name in roles:
        assert "@" not in services[name]["environment"]["GATEWAY_DATABASE_PASSWORD"]


def test_healthchecks_ask_readiness_on_each_process_port(services: dict[str, dict[str, Any]]) -> None:
    defaults = load_settings(environ={})
    admin_check = " ".join(services["admin"]["healthcheck"]["test"])
    assert "127.0.0.1:8081/readyz" in admin_check
    proxy_check = " ".join(services["proxy"]["healthcheck"]["test"])
    environment = services["proxy"]["environment"]
    health_path = environment.get("GATEWAY_PROXY_HEALTH_PATH", defaults.proxy_health_path)
    assert f"127.0.0.1:8080{health_path}" in proxy_check
    # A one-shot: the image's own check (the admin port) would never pass.
    assert services["migrate"]["healthcheck"] == {"disable": True}


def test_every_file_the_services_mount_is_in_the_repository(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (DEPLOY / source).is_file(), (name, source)


def _compose_client() -> list[str] | None:
    """`docker compose` (the plugin) or Debian's `docker-compose`: either validates without an engine."""
    if shutil.which("docker") is not None:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") is not None else None


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    client = _compose_client()
    if client is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (scripts/test installs it)")
    environment = tmp_path / ".env"
    environment.write_text((DEPLOY / "env.example").read_text())
    result = subprocess.run(
        [*client, "--env-file", str(environment), "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
