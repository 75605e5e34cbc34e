"""Security properties as a user or an auditor would check them: nothing leaks, nothing is spoofable."""

from __future__ import annotations

import ast
import logging
import subprocess
from pathlib import Path

import pytest
import redis.asyncio as redis

from gateway.token_format import parse_token
from tests.conftest import ADMIN_KEY, GatewayFactory, Upstream, both_store_backends, send_raw
from tests.postgres_server import PASSWORD, PostgresServer

SOURCE = Path(__file__).resolve().parents[2]


def _database_bytes(database: Path | None, database_url: str, request: pytest.FixtureRequest) -> bytes:
    """Everything the store holds: the SQLite file with its WAL, or a pg_dump of the PostgreSQL database."""
    if database is not None:
        return b"".join(p.read_bytes() for p in database.parent.iterdir() if p.name.startswith(database.name))
    server: PostgresServer = request.getfixturevalue("postgres_server")
    dump = subprocess.run(
        [str(server.bin / "pg_dump"), f"--dbname={database_url}"], capture_output=True, check=True, timeout=60
    )
    assert b"CREATE TABLE public.tokens" in dump.stdout
    return dump.stdout


@both_store_backends
async def test_whole_lifecycle_with_redis_and_debug_logs_leaks_no_secret(
    start_gateway: GatewayFactory,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
    database_url: str,
    request: pytest.FixtureRequest,
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = await start_gateway(planes=("admin",), redis_url=redis_url)
    replica = await start_gateway(planes=("proxy",), redis_url=redis_url)
    responses: list[str] = []

    async def admin_call(method: str, path: str, **kwargs: object) -> dict[str, object]:
        """Records every admin answer; the one field meant to carry a new secret is left out of the record."""
        status, body = await admin.admin_call(method, path, **kwargs)
        shown = {k: v for k, v in (body or {}).items() if k not in ("token", "key")}
        responses.append(f"{method} {path} {status} {shown}")
        return body or {}

    created = await admin_call("POST", "/v1/tokens", json={"name": "leak check", "access_level": "read_only"})
    first = str(created.pop("token"))
    assert (await replica.call(first)).status == 200
    rotated = await admin_call("POST", f"/v1/tokens/{created['id']}/rotate", json={"grace_seconds": 60})
    second = str(rotated.pop("token"))
    assert (await replica.call(second)).status == 200
    assert (await replica.call(first)).status == 200
    await replica.call(first[:-10] + "0000000000")
    await admin_call("PATCH", f"/v1/tokens/{created['id']}", json={"allowed_ip_ranges": ["127.0.0.1"]})
    viewer = await admin_call("POST", "/v1/admin-keys", json={"name": "auditor", "role": "viewer"})
    viewer_key = str(viewer.pop("key"))
    await admin.admin.get("/v1/tokens", headers={"Authorization": f"Bearer {viewer_key}"})
    await admin.admin.get("/v1/tokens", headers={"Authorization": f"Bearer {viewer_key}x"})
    await admin_call("GET", "/v1/tokens")
    await admin_call("GET", f"/v1/tokens/{created['id']}")
    await admin_call("GET", "/v1/audit")
    await admin_call("GET", "/v1/admin-keys")
    await admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    await replica.call(second)
    await admin_call("DELETE", f"/v1/tokens/{created['id']}")
    await replica.core.usage.flush()

    secrets = [ADMIN_KEY, viewer_key]
    for token in (first, second):
        parsed = parse_token(token, "gw")
        assert parsed is not None
        secrets += [token, parsed.secret]
    secrets += [secret[8:40] for secret in list(secrets)]  # no fragment either

    client = redis.Redis.from_url(redis_url)
    try:
        redis_bytes = b""
        async for key in client.scan_iter():
            kind = await client.type(key)
            value = await client.get(key) if kind == b"string" else str(await client.hgetall(key)).encode()
            redis_bytes += key + (value or b"")
    finally:
        await client.aclose()
    for gateway in (replica, admin):
        await gateway.close()
    database = _database_bytes(admin.database, database_url, request)
    secrets += [PASSWORD] if database_url.startswith("postgresql") else []  # the database password too

    access_lines = "\n".join(replica.access_lines())
    assert access_lines.count("\n") > 0  # the replica's proxy did log its requests
    for secret in secrets:
        assert secret not in caplog.text
        assert secret not in access_lines
        assert secret not in "\n".join(responses)
        assert secret.encode() not in redis_bytes
        assert secret.encode() not in database


SECRET_WORDS = ("secret", "digest", "checksum", "presented", "memo")


def _names_secret(side: ast.expr) -> bool:
    """A plain name or attribute holding secret material (not a length, a lookup result or an argon2 hash)."""
    if isinstance(side, ast.Name):
        identifier = side.id
    elif isinstance(side, ast.Attribute):
        identifier = side.attr
    else:
        return False
    return any(word in identifier.lower() for word in SECRET_WORDS)


def _comparisons_of_secrets(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            if any(_names_secret(side) for side in (node.left, *node.comparators)):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_secrets_are_only_compared_in_constant_time() -> None:
    """Every comparison of a secret, digest or checksum goes through hmac.compare_digest."""
    modules = [
        SOURCE / "gateway" / "authenticator.py",
        SOURCE / "gateway" / "secrets.py",
        SOURCE / "gateway" / "token_format.py",
        SOURCE / "gateway" / "failure_limits.py",
        SOURCE / "admin_api" / "admin_auth.py",
    ]
    offending = [line for module in modules for line in _comparisons_of_secrets(module)]
    assert offending == []


async def test_the_admin_api_cannot_be_reached_through_the_proxy_port(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await start_gateway()
    token = (await gateway.create_token())["token"]
    for raw, forwarded in [
        ("/v1/tokens", "/v1/tokens"),
        ("/x/%2e%2e/v1/tokens", "/v1/tokens"),
        ("/x/../v1/admin-keys", "/v1/admin-keys"),
        ("/healthz", "/healthz"),
    ]:
        request = f"GET {raw} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        status, reply = await send_raw(gateway.proxy, request.encode())
        assert status == 200, raw
        assert upstream.last["raw_path"] == forwarded  # to the upstream, not answered by us
        assert b'"items"' not in reply
