"""A restart loses nothing, and no secret ever reaches a log line, a repr or the database file."""

from __future__ import annotations

import logging

import pytest

from gateway.token_format import parse_token
from tests.conftest import ADMIN_KEY, Gateway, GatewayFactory


async def test_restart_keeps_tokens_their_state_and_the_audit_log(start_gateway: GatewayFactory) -> None:
    first = await start_gateway()
    kept = await first.create_token(name="kept", allowed_ip_ranges=["127.0.0.1"])
    disabled = await first.create_token(name="disabled")
    await first.admin_call("POST", f"/v1/tokens/{disabled['id']}/disable")
    assert (await first.call(kept["token"])).status == 200
    await first.close()

    second = await start_gateway()
    assert (await second.call(kept["token"])).status == 200
    response = await second.call(disabled["token"])
    assert (await response.json())["code"] == "token_disabled"
    status, view = await second.admin_call("GET", f"/v1/tokens/{kept['id']}")
    assert status == 200 and view["allowed_ip_ranges"] == ["127.0.0.1/32"] and view["last_used_at"] is not None
    status, audit = await second.admin_call("GET", "/v1/audit")
    assert [event["action"] for event in audit["items"]] == ["token.disable", "token.create", "token.create"]


async def test_no_secret_in_logs_responses_reprs_or_the_database(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = await gateway.create_token(allowed_ip_ranges=["127.0.0.0/8"])
    first_token = created["token"]
    token_id = created["id"]
    assert (await gateway.call(first_token)).status == 200
    status, rotated = await gateway.admin_call("POST", f"/v1/tokens/{token_id}/rotate", json={"grace_seconds": 60})
    second_token = rotated["token"]
    assert (await gateway.call(second_token)).status == 200
    assert (await gateway.call(first_token)).status == 200  # in grace
    await gateway.call(first_token[:-8] + "AAAAAAAA")
    await gateway.admin_call("PATCH", f"/v1/tokens/{token_id}", json={"name": "renamed"})
    await gateway.admin_call("POST", f"/v1/tokens/{token_id}/disable")
    await gateway.call(second_token)
    await gateway.admin.get("/v1/tokens", headers={"Authorization": "Bearer wrong-admin-key-000000"})
    await gateway.core.usage.flush()

    secrets = [ADMIN_KEY]
    for token in (first_token, second_token):
        parsed = parse_token(token, "gw")
        assert parsed is not None
        secrets += [token, parsed.secret, parsed.secret[:20]]

    _, listing = await gateway.admin_call("GET", "/v1/tokens")
    _, single = await gateway.admin_call("GET", f"/v1/tokens/{token_id}")
    _, audit = await gateway.admin_call("GET", "/v1/audit")
    record = await gateway.core.store.get_token(token_id)
    texts = {
        "logs": caplog.text,
        "access log": "\n".join(gateway.access_lines()),
        "list": str(listing),
        "get": str(single),
        "audit": str(audit),
        "repr": repr(record) + repr(gateway.core.settings) + repr(parse_token(second_token, "gw")),
    }
    await gateway.close()  # checkpoint the WAL into the file
    database = b"".join(
        path.read_bytes() for path in gateway.database.parent.iterdir() if path.name.startswith("gateway.db")
    )
    for secret in secrets:
        for where, text in texts.items():
            assert secret not in text, f"a secret appeared in {where}"
        assert secret.encode() not in database, "a secret appeared in the database file"
    assert "$argon2" not in texts["list"] + texts["get"] + texts["audit"]
    assert b"$argon2id$" in database  # only hashes are stored
