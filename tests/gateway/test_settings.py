"""Settings: the documented table stays true to the code, and precedence is file < environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import _CASTS, SettingsError, env_name, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_documented_in_the_readme_and_the_default_config() -> None:
    readme = (ROOT / "README.md").read_text()
    config = (ROOT / "config" / "gateway.toml").read_text()
    for name in _CASTS:
        assert env_name(name) in readme, name
        assert name.rpartition(".")[2] in config, name


def test_environment_beats_the_config_file_and_flags_beat_both(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('upstream = "http://file:1"\nproxy_listen = "127.0.0.1:1000"\nlog_level = "WARNING"\n')
    settings = load_settings(
        config_path=config,
        environ={"GATEWAY_PROXY_LISTEN": "127.0.0.1:2000", "GATEWAY_LOG_LEVEL": "DEBUG"},
        overrides={"log_level": "ERROR"},
    )
    assert settings.upstream == "http://file:1"
    assert str(settings.proxy_listen) == "127.0.0.1:2000"
    assert settings.log_level == "ERROR"


def test_secrets_in_settings_never_show_in_repr() -> None:
    settings = load_settings(
        environ={"GATEWAY_ADMIN_KEY": "a-very-secret-admin-key", "GATEWAY_REDIS_URL": "redis://:pw-secret@h:1/0"}
    )
    assert "a-very-secret-admin-key" not in repr(settings)
    assert "pw-secret" not in repr(settings)
    assert settings.admin_key is not None and settings.admin_key.reveal() == "a-very-secret-admin-key"


def test_a_config_file_may_replace_the_access_levels(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[access_levels.only]\nallow = [{ methods = ["GET"], paths = ["/**"] }]\n')
    assert list(load_settings(config_path=config, environ={}).access_levels) == ["only"]


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"GATEWAY_ADMIN_TLS_CERT": "/nonexistent.pem"}, "GATEWAY_ADMIN_TLS_CERT"),
        ({"GATEWAY_REDIS_URL": "http://redis"}, "GATEWAY_REDIS_URL"),
        ({"GATEWAY_TOKEN_PREFIX": "Bad_Prefix"}, "GATEWAY_TOKEN_PREFIX"),
        ({"GATEWAY_ACCESS_LOG": "maybe"}, "GATEWAY_ACCESS_LOG"),
        ({"GATEWAY_ACCESS_LOG_FILE": "/nonexistent/dir/access.log"}, "GATEWAY_ACCESS_LOG_FILE"),
        ({"GATEWAY_LOG_FORMAT": "xml"}, "GATEWAY_LOG_FORMAT"),
        ({"GATEWAY_PROXY_LISTEN": "0.0.0.0:²"}, "GATEWAY_PROXY_LISTEN"),
        ({"GATEWAY_CACHE_MAX_ENTRIES": "many"}, "GATEWAY_CACHE_MAX_ENTRIES"),
    ],
)
def test_a_bad_value_is_refused_naming_the_setting(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(environ=environ)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://gateway:hunter2-secret@db.internal/gateway",
        "postgresql://gateway@db.internal/gateway?password=hunter2-secret",
        "postgres://gateway@db.internal/gateway?sslmode=require&PASSWORD=hunter2-secret",
    ],
)
def test_a_database_password_in_the_url_never_reaches_a_repr_or_a_message(url: str) -> None:
    from gateway.store.postgres import PostgresStore

    settings = load_settings(environ={"GATEWAY_DATABASE_URL": url})
    assert settings.postgres_url is not None
    store = PostgresStore(settings.postgres_url)
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in repr(store)
    assert "hunter2" not in store.where
    with pytest.raises(SettingsError) as refused:
        load_settings(environ={"GATEWAY_DATABASE_URL": url.replace("postgres", "mysql", 1)})
    assert "hunter2" not in str(refused.value)
