"""Settings: read once at start-up from TOML, then `GATEWAY_*` environment variables, then flags.

Every value is cast and validated here; a bad one stops start-up with a message naming the setting. Nothing
else in the code base reads the environment.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import netaddr

from gateway.access_levels import RULE_CASES, AccessLevel, AccessLevelConfigError, parse_access_levels
from gateway.request_target import TargetRefused, canonical_path
from gateway.secrets import Argon2Parameters
from gateway.cluster_url import CLUSTER_SCHEMES, parse_cluster_url
from gateway.sentinel_url import SENTINEL_SCHEME, parse_sentinel_url
from gateway.token_format import PREFIX_PATTERN

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_config.toml")
# forward_auth.py: where each calling proxy names the original request.
FORWARD_AUTH_CONVENTIONS = ("nginx", "traefik", "caddy", "envoy")


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it and is fit for one line on stderr."""


class Secret:
    """A configured secret that never shows itself in `repr`, `str` or a traceback's locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    upstream: str | None
    proxy_listen: ListenAddress
    admin_listen: ListenAddress
    database_path: Path | None
    """The SQLite file, when the store is embedded; None with PostgreSQL."""
    postgres_url: Secret | None
    """The PostgreSQL URL (it may hold a password), when the store is PostgreSQL."""
    database_password: Secret | None
    database_pool_size: int
    database_statement_timeout: float
    database_connect_timeout: float
    admin_key: Secret | None
    trusted_proxies: tuple[str, ...]
    redis_url: Secret | None
    token_prefix: str
    upstream_connect_timeout: float
    upstream_timeout: float
    usage_flush_interval: float
    cache_max_entries: int
    negative_cache_ttl: float
    cache_ttl: float
    redis_key_prefix: str
    redis_entry_ttl: float
    shutdown_timeout: float
    max_body_bytes: int
    client_body_timeout: float
    client_header_timeout: float
    keepalive_timeout: float
    websocket_idle_timeout: float
    websocket_max_tunnels: int
    websocket_max_tunnels_per_token: int
    max_header_count: int
    max_header_bytes: int
    failure_limit_per_source: int
    failure_limit_per_token: int
    limit_leases: bool
    failure_window: float
    token_recheck_interval: float
    admin_allow_remote: bool
    admin_tls_cert: Path | None
    admin_tls_key: Path | None
    proxy_tls_cert: Path | None
    proxy_tls_key: Path | None
    log_level: str
    log_format: str
    access_log: bool
    proxy_health_path: str | None
    body_method_override: bool
    metrics_public: bool
    metrics_listen: ListenAddress | None
    metrics_token_labels: bool
    forward_auth_listen: ListenAddress | None
    forward_auth_convention: str
    forward_auth_path_prefix: str
    access_log_file: Path | None
    argon2: Argon2Parameters
    access_rule_case: str
    access_levels: Mapping[str, AccessLevel] = field(repr=False)

    def admin_exposure_problem(self) -> str | None:
        """Why the admin API must not start where it is configured to listen, or None."""
        host = self.admin_listen.host
        loopback = host == "localhost" or (
            _is_address(host) and netaddr.IPAddress(host).is_loopback()
        )
        if loopback or self.admin_tls_cert is not None or self.admin_allow_remote:
            return None
        return (
            f"the admin API would listen on {self.admin_listen}, beyond loopback, without TLS: set admin_tls_cert"
            " and admin_tls_key, or GATEWAY_ADMIN_ALLOW_REMOTE=true if a private network or TLS proxy protects it"
        )

    def require_upstream(self) -> str:
        if self.upstream is None:
            raise SettingsError(
                "setting 'upstream' is missing: set GATEWAY_UPSTREAM, --upstream or 'upstream' in the config file"
                " to the URL of the API the gateway protects"
            )
        return self.upstream


def _is_address(text: str) -> bool:
    try:
        netaddr.IPAddress(text, flags=netaddr.INET_PTON)
    except (netaddr.AddrFormatError, ValueError):
        return False
    return True


# --- casts: each takes the raw value (TOML-typed or a string from the environment / a flag) ---------------


def _as_str(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError("must be a string")
    return raw


def _as_float(low: float, high: float) -> Callable[[Any], float]:
    def cast(raw: Any) -> float:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError("must be a number") from None
        if isinstance(raw, bool) or not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g}")
        return value

    return cast


def _as_int(low: int, high: int) -> Callable[[Any], int]:
    def cast(raw: Any) -> int:
        if isinstance(raw, bool):
            raise ValueError("must be an integer")
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise ValueError("must be an integer") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return cast


def _as_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _is_canonical(path: str) -> bool:
    """Whether a configured path is already in the one form request_target.py gives a request's path."""
    try:
        return canonical_path(path) == path
    except TargetRefused:
        return False


def _as_upstream(raw: Any) -> str:
    text = _as_str(raw).strip()
    parts = urlsplit(text)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, got {text!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must not contain a query, a fragment or credentials")
    try:
        _ = parts.port  # urlsplit checks the port only when asked
    except ValueError:
        raise ValueError(f"has an invalid port in {text!r}") from None
    base_path = parts.path.rstrip("/")
    if base_path and not _is_canonical(base_path):
        raise ValueError(f"has a base path that is not a plain path ('/v1', '/api/v2'), got {parts.path!r}")
    return text.rstrip("/")


def parse_listen_address(raw: Any) -> ListenAddress:
    text = _as_str(raw).strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"must be HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    host = host.strip("[]") or "0.0.0.0"
    return ListenAddress(host, port)


def _as_database(raw: Any) -> Path | Secret:
    """A SQLite path, or a PostgreSQL URL kept as a secret: it may carry the password."""
    text = _as_str(raw).strip()
    if urlsplit(text).scheme in {"postgresql", "postgres"}:
        if not urlsplit(text).hostname and "host=" not in urlsplit(text).query:
            raise ValueError("must name the PostgreSQL host: postgresql://USER@HOST:PORT/DATABASE")
        return Secret(text)
    prefix = "sqlite:///"
    if not text.startswith(prefix) or len(text) == len(prefix):
        raise ValueError(
            "must be sqlite:///RELATIVE/PATH, sqlite:////ABSOLUTE/PATH or postgresql://USER@HOST:PORT/DATABASE"
            f", got {redact_url(text)!r}"
        )
    path = text[len(prefix) :]
    if path == ":memory:":
        raise ValueError("an in-memory database would lose every token on restart")
    return Path(path)


def redact_url(text: str) -> str:
    """The URL with its password (if any, in the user part or as libpq's `?password=`) replaced by stars, fit
    for a message or a repr."""
    parts = urlsplit(text)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":**********@", 1))
    if "password" in parts.query.lower():
        query = "&".join(
            f"{key}=**********" if key.lower() == "password" else f"{key}{sign}{value}"
            for key, sign, value in (item.partition("=") for item in parts.query.split("&"))
        )
        parts = parts._replace(query=query)
    return parts.geturl()


def _as_secret(minimum_length: int) -> Callable[[Any], Secret]:
    def cast(raw: Any) -> Secret:
        text = _as_str(raw).strip()
        if len(text) < minimum_length:
            raise ValueError(f"must be at least {minimum_length} characters")
        return Secret(text)

    return cast


def _as_redis_url(raw: Any) -> Secret:
    text = _as_str(raw).strip()
    scheme = urlsplit(text).scheme.lower()
    if scheme == SENTINEL_SCHEME:
        parse_sentinel_url(text)
    elif scheme in CLUSTER_SCHEMES:
        parse_cluster_url(text)
    elif scheme not in {"redis", "rediss", "unix"}:
        raise ValueError(
            "must be a redis://, rediss://, unix://, redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE"
            " or redis+cluster://HOST:PORT[,HOST:PORT...] URL"
        )
    return Secret(text)


def _as_networks(raw: Any) -> tuple[str, ...]:
    items = [item.strip() for item in raw.split(",")] if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise ValueError("must be a list of addresses or CIDRs")
    networks = []
    for item in items:
        if item == "":
            continue
        try:
            networks.append(str(netaddr.IPNetwork(_as_str(item)).cidr))
        except (netaddr.AddrFormatError, ValueError, TypeError):
            raise ValueError(f"{item!r} is not an IP address or CIDR") from None
    return tuple(networks)


def _as_prefix(raw: Any) -> str:
    text = _as_str(raw)
    if not PREFIX_PATTERN.fullmatch(text):
        raise ValueError("must be 1-16 lower-case letters and digits, starting with a letter")
    return text


def _as_file(raw: Any) -> Path:
    path = Path(_as_str(raw))
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a readable file")
    return path


def _as_key_prefix(raw: Any) -> str:
    text = _as_str(raw)
    if not 1 <= len(text) <= 64 or any(char.isspace() for char in text):
        raise ValueError("must be 1-64 characters without spaces")
    return text


def _as_convention(raw: Any) -> str:
    text = _as_str(raw).strip().lower()
    if text not in FORWARD_AUTH_CONVENTIONS:
        raise ValueError(f"must be one of {', '.join(FORWARD_AUTH_CONVENTIONS)}, got {text!r}")
    return text


def _as_path_prefix(raw: Any) -> str:
    text = _as_str(raw).strip()
    if not text.startswith("/") or text.endswith("/") or not text.isascii() or not _is_canonical(text):
        raise ValueError(f"must be a normalised path without a trailing slash, such as /auth, got {text!r}")
    if "?" in text or "#" in text or "%" in text:
        raise ValueError(f"must be a plain path without a query, got {text!r}")
    return text


def _as_health_path(raw: Any) -> str:
    """A path matched exactly against normalised request paths, so it must be in normal form itself."""
    text = _as_str(raw).strip()
    if not text.startswith("/") or text == "/":
        raise ValueError("must be an absolute path other than '/', such as /.gateway/health, or empty for none")
    if "?" in text or "#" in text or "%" in text or not text.isascii() or not _is_canonical(text):
        raise ValueError(f"must be a normalised ASCII path without a query, got {text!r}")
    return text


def _as_rule_case(raw: Any) -> str:
    text = _as_str(raw).strip().lower()
    if text not in RULE_CASES:
        raise ValueError("must be " + ", ".join(f"'{name}'" for name in RULE_CASES))
    return text


def _as_log_level(raw: Any) -> str:
    text = _as_str(raw).upper()
    if text not in logging.getLevelNamesMapping():
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return text


def _as_log_format(raw: Any) -> str:
    text = _as_str(raw).strip().lower()
    if text not in {"text", "json"}:
        raise ValueError("must be text or json")
    return text


def _as_log_file(raw: Any) -> Path:
    """A file the gateway can append to (created if missing): checked here, so that a typo stops start-up."""
    path = Path(_as_str(raw).strip())
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ValueError(f"{str(path)!r} is not writable")
    elif not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"{str(path)!r} cannot be created (is its directory there and writable?)")
    return path


_CASTS: dict[str, Callable[[Any], Any]] = {
    "upstream": _as_upstream,
    "proxy_listen": parse_listen_address,
    "admin_listen": parse_listen_address,
    "database_url": _as_database,
    "database_password": _as_secret(1),
    "database_pool_size": _as_int(1, 1000),
    "database_statement_timeout": _as_float(0.1, 3600),
    "database_connect_timeout": _as_float(0.1, 600),
    "admin_key": _as_secret(16),
    "trusted_proxies": _as_networks,
    "redis_url": _as_redis_url,
    "token_prefix": _as_prefix,
    "upstream_connect_timeout": _as_float(0.1, 600),
    "upstream_timeout": _as_float(0.1, 3600),
    "usage_flush_interval": _as_float(0.05, 10),
    "cache_max_entries": _as_int(1, 100_000_000),
    "negative_cache_ttl": _as_float(0, 3600),
    "cache_ttl": _as_float(0.1, 60),
    "redis_key_prefix": _as_key_prefix,
    "redis_entry_ttl": _as_float(1, 86400),
    "shutdown_timeout": _as_float(0, 3600),
    "max_body_bytes": _as_int(0, 2**50),
    "client_body_timeout": _as_float(0.1, 3600),
    "client_header_timeout": _as_float(0.1, 3600),
    "keepalive_timeout": _as_float(0.1, 3600),
    "websocket_idle_timeout": _as_float(1, 86400),
    "websocket_max_tunnels": _as_int(1, 10_000_000),
    "websocket_max_tunnels_per_token": _as_int(1, 10_000_000),
    "max_header_count": _as_int(8, 1000),
    "max_header_bytes": _as_int(1024, 65536),
    "failure_limit_per_source": _as_int(1, 1_000_000),
    "failure_limit_per_token": _as_int(1, 1_000_000),
    "limit_leases": _as_bool,
    "failure_window": _as_float(1, 86400),
    "token_recheck_interval": _as_float(0, 3600),
    "admin_allow_remote": _as_bool,
    "admin_tls_cert": _as_file,
    "admin_tls_key": _as_file,
    "proxy_tls_cert": _as_file,
    "proxy_tls_key": _as_file,
    "log_level": _as_log_level,
    "log_format": _as_log_format,
    "access_log": _as_bool,
    "proxy_health_path": _as_health_path,
    "body_method_override": _as_bool,
    "metrics_public": _as_bool,
    "metrics_listen": parse_listen_address,
    "metrics_token_labels": _as_bool,
    "forward_auth_listen": parse_listen_address,
    "forward_auth_convention": _as_convention,
    "forward_auth_path_prefix": _as_path_prefix,
    "access_log_file": _as_log_file,
    "access_rule_case": _as_rule_case,
    "argon2.time_cost": _as_int(1, 100),
    "argon2.memory_cost_kib": _as_int(8, 4 * 1024 * 1024),
    "argon2.parallelism": _as_int(1, 64),
}
_OPTIONAL = {
    "upstream",
    "admin_key",
    "database_password",
    "redis_url",
    "admin_tls_cert",
    "admin_tls_key",
    "proxy_tls_cert",
    "proxy_tls_key",
    "proxy_health_path",
    "metrics_listen",
    "forward_auth_listen",
    "forward_auth_path_prefix",
    "access_log_file",
}


def env_name(setting: str) -> str:
    return "GATEWAY_" + setting.replace(".", "_").upper()


def _read_toml(path: Path, *, what: str) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise SettingsError(f"{what} {str(path)!r} cannot be read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"{what} {str(path)!r} is not valid TOML: {error}") from None


def _flatten(table: Mapping[str, Any], path: Path) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if key == "access_levels":
            continue
        if key == "argon2" and isinstance(value, Mapping):
            flat.update({f"argon2.{inner}": inner_value for inner, inner_value in value.items()})
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(_CASTS))
    if unknown:
        raise SettingsError(f"config file {str(path)!r}: unknown setting {unknown[0]!r}")
    return flat


def load_settings(
    *,
    config_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings: packaged defaults < config file < environment < `overrides` (flags, tests)."""
    environ = os.environ if environ is None else environ
    defaults = _read_toml(DEFAULT_CONFIG_PATH, what="default config")
    raw: dict[str, Any] = _flatten(defaults, DEFAULT_CONFIG_PATH)
    levels_raw = defaults["access_levels"]

    config_path = config_path or environ.get("GATEWAY_CONFIG") or None
    if config_path is not None:
        path = Path(config_path)
        table = _read_toml(path, what="config file")
        raw.update(_flatten(table, path))
        levels_raw = table.get("access_levels", levels_raw)

    sources = {name: f"'{name}' in the config" for name in raw}
    for name in _CASTS:
        if env_name(name) in environ:
            raw[name] = environ[env_name(name)]
            sources[name] = env_name(name)
    for name, value in (overrides or {}).items():
        if name not in _CASTS:
            raise SettingsError(f"unknown setting {name!r}")
        if value is not None:
            raw[name] = value
            sources[name] = f"'{name}'"

    values: dict[str, Any] = {}
    for name, cast in _CASTS.items():
        if name not in raw or (name in _OPTIONAL and raw[name] in ("", None)):
            if name not in _OPTIONAL:
                raise SettingsError(f"setting '{name}' is missing ({env_name(name)})")
            values[name] = None
            continue
        try:
            values[name] = cast(raw[name])
        except ValueError as error:
            raise SettingsError(f"setting {sources[name]} {error}") from None

    try:
        access_levels = parse_access_levels(levels_raw, rule_case=values["access_rule_case"])
    except AccessLevelConfigError as error:
        raise SettingsError(f"setting {error}") from None
    if (values["admin_tls_cert"] is None) != (values["admin_tls_key"] is None):
        raise SettingsError("settings 'admin_tls_cert' and 'admin_tls_key' must be given together")
    if (values["proxy_tls_cert"] is None) != (values["proxy_tls_key"] is None):
        raise SettingsError("settings 'proxy_tls_cert' and 'proxy_tls_key' must be given together")

    database = values["database_url"]
    return Settings(
        upstream=values["upstream"],
        proxy_listen=values["proxy_listen"],
        admin_listen=values["admin_listen"],
        database_path=database if isinstance(database, Path) else None,
        postgres_url=database if isinstance(database, Secret) else None,
        database_password=values["database_password"],
        database_pool_size=values["database_pool_size"],
        database_statement_timeout=values["database_statement_timeout"],
        database_connect_timeout=values["database_connect_timeout"],
        admin_key=values["admin_key"],
        trusted_proxies=values["trusted_proxies"],
        redis_url=values["redis_url"],
        token_prefix=values["token_prefix"],
        upstream_connect_timeout=values["upstream_connect_timeout"],
        upstream_timeout=values["upstream_timeout"],
        usage_flush_interval=values["usage_flush_interval"],
        cache_max_entries=values["cache_max_entries"],
        negative_cache_ttl=values["negative_cache_ttl"],
        cache_ttl=values["cache_ttl"],
        redis_key_prefix=values["redis_key_prefix"],
        redis_entry_ttl=values["redis_entry_ttl"],
        shutdown_timeout=values["shutdown_timeout"],
        max_body_bytes=values["max_body_bytes"],
        client_body_timeout=values["client_body_timeout"],
        client_header_timeout=values["client_header_timeout"],
        keepalive_timeout=values["keepalive_timeout"],
        websocket_idle_timeout=values["websocket_idle_timeout"],
        websocket_max_tunnels=values["websocket_max_tunnels"],
        websocket_max_tunnels_per_token=values["websocket_max_tunnels_per_token"],
        max_header_count=values["max_header_count"],
        max_header_bytes=values["max_header_bytes"],
        failure_limit_per_source=values["failure_limit_per_source"],
        failure_limit_per_token=values["failure_limit_per_token"],
        limit_leases=values["limit_leases"],
        failure_window=values["failure_window"],
        token_recheck_interval=values["token_recheck_interval"],
        admin_allow_remote=values["admin_allow_remote"],
        admin_tls_cert=values["admin_tls_cert"],
        admin_tls_key=values["admin_tls_key"],
        proxy_tls_cert=values["proxy_tls_cert"],
        proxy_tls_key=values["proxy_tls_key"],
        log_level=values["log_level"],
        log_format=values["log_format"],
        access_log=values["access_log"],
        proxy_health_path=values["proxy_health_path"],
        body_method_override=values["body_method_override"],
        metrics_public=values["metrics_public"],
        metrics_listen=values["metrics_listen"],
        metrics_token_labels=values["metrics_token_labels"],
        forward_auth_listen=values["forward_auth_listen"],
        forward_auth_convention=values["forward_auth_convention"],
        forward_auth_path_prefix=values["forward_auth_path_prefix"] or "",
        access_log_file=values["access_log_file"],
        argon2=Argon2Parameters(
            time_cost=values["argon2.time_cost"],
            memory_cost_kib=values["argon2.memory_cost_kib"],
            parallelism=values["argon2.parallelism"],
        ),
        access_rule_case=values["access_rule_case"],
        access_levels=access_levels,
    )
