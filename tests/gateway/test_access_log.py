"""The proxy's access log: one line per request, naming the token by id, never printing what was presented."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import Gateway, send_raw


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "gateway.access"]


async def test_access_log_names_the_token_id_and_never_the_authorization_value(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    created = await gateway.create_token(access_level="read_only")
    token, token_id = created["token"], created["id"]
    wrong = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")

    answers = [
        (await gateway.call(token, "/api/posts")).status,
        (await gateway.call(token, "/api/posts", method="POST")).status,
        (await gateway.call(wrong, "/api/posts")).status,
        (await gateway.call(None, "/api/posts", headers={"Authorization": f"Basic {token}"})).status,
    ]

    assert answers == [200, 403, 401, 401]
    lines = access_lines(caplog)
    assert len(lines) == 4, lines
    assert [line.split('"')[1] for line in lines] == [
        "GET /api/posts", "POST /api/posts", "GET /api/posts", "GET /api/posts"
    ]
    assert [line.split('" ')[1].split()[0] for line in lines] == ["200", "403", "401", "401"]
    assert [line.split("token=")[1].split()[0] for line in lines] == [token_id, token_id, "-", "-"]
    for secret in (token, wrong, token.rsplit("_", 1)[-1], "Bearer", "Basic"):
        assert not any(secret in line for line in lines), secret


async def test_access_log_leaves_out_the_query_where_a_client_may_put_its_token(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    token = (await gateway.create_token())["token"]

    response = await gateway.call(token, f"/api/posts?access_token={token}&page=2")

    assert response.status == 200
    lines = access_lines(caplog)
    assert len(lines) == 1 and '"GET /api/posts" 200 ' in lines[0], lines
    assert token not in lines[0] and "access_token" not in lines[0]


async def test_access_log_of_a_raw_request_with_a_malformed_authorization_prints_none_of_it(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    token = (await gateway.create_token())["token"]
    presented = f"Bearer {token} {token}"

    status, reply = await send_raw(
        gateway.proxy,
        f"GET /api/posts HTTP/1.1\r\nHost: api\r\nAuthorization: {presented}\r\nConnection: close\r\n\r\n".encode(),
    )

    assert status == 401 and token.encode() not in reply
    lines = access_lines(caplog)
    assert len(lines) == 1 and " 401 " in lines[0] and "token=-" in lines[0], lines
    assert token not in caplog.text
