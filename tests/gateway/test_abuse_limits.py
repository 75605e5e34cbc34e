"""Wrong secrets cost argon2: they are limited, while known-good secrets are never held back."""

from __future__ import annotations

import asyncio
import io

from gateway.token_format import issue_token
from tests.conftest import Gateway, GatewayFactory, send_raw


def wrong_secret_for(token_id: str) -> str:
    return str(issue_token("gw", token_id))  # a valid checksum, so it reaches argon2


async def test_a_flood_of_wrong_secrets_is_throttled_with_429_and_no_more_argon2(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(failure_limit_per_source=5, failure_limit_per_token=1000)
    created = await gateway.create_token()
    verifications = gateway.core.hasher.verify_calls
    statuses = []
    for _ in range(30):
        response = await gateway.call(wrong_secret_for(created["id"]))
        statuses.append(response.status)
        if response.status == 429:
            body = await response.json()
            assert body["code"] == "too_many_failures"
            assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}
    assert gateway.core.hasher.verify_calls - verifications == 5


async def test_a_known_good_secret_is_accepted_from_a_throttled_address(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(failure_limit_per_source=3)
    created = await gateway.create_token()
    assert (await gateway.call(created["token"])).status == 200  # verified once: now in the memo
    for _ in range(10):
        await gateway.call(wrong_secret_for(created["id"]))
    assert (await gateway.call(wrong_secret_for(created["id"]))).status == 429
    verifications = gateway.core.hasher.verify_calls
    responses = await asyncio.gather(*(gateway.call(created["token"]) for _ in range(20)))
    assert [response.status for response in responses] == [200] * 20
    assert gateway.core.hasher.verify_calls == verifications


async def test_a_repeated_wrong_secret_costs_argon2_once(gateway: Gateway) -> None:
    created = await gateway.create_token()
    wrong = wrong_secret_for(created["id"])
    verifications = gateway.core.hasher.verify_calls
    for _ in range(10):
        assert (await gateway.call(wrong)).status == 401
    assert gateway.core.hasher.verify_calls - verifications == 1


async def test_the_right_secret_of_a_disabled_token_is_never_throttled(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(failure_limit_per_source=3)
    created = await gateway.create_token()
    await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    for _ in range(10):
        response = await gateway.call(created["token"])
        assert (await response.json())["code"] == "token_disabled"
    other = await gateway.create_token()
    assert (await gateway.call(other["token"])).status == 200  # the address was never counted as failing


async def test_failures_against_one_token_throttle_that_token_only(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(
        trusted_proxies="127.0.0.1", failure_limit_per_source=1000, failure_limit_per_token=4
    )
    target, bystander = await gateway.create_token(), await gateway.create_token()
    for attacker in range(8):  # many addresses, one token
        headers = {"X-Forwarded-For": f"198.51.100.{attacker}"}
        await gateway.call(wrong_secret_for(target["id"]), headers=headers)
    response = await gateway.call(wrong_secret_for(target["id"]), headers={"X-Forwarded-For": "203.0.113.1"})
    assert response.status == 429
    assert (await gateway.call(bystander["token"])).status == 200
    assert (await gateway.call(wrong_secret_for(bystander["id"]))).status == 401


async def test_a_body_over_the_access_level_limit_is_refused_with_413(gateway: Gateway) -> None:
    reader = (await gateway.create_token(access_level="read_only"))["token"]
    admin = (await gateway.create_token(access_level="administrative"))["token"]
    payload = io.BytesIO(b"x" * (2 * 1024 * 1024))
    response = await gateway.call(reader, "/sha256", method="GET", data=payload,
                                  headers={"Content-Length": str(2 * 1024 * 1024)})
    assert response.status == 413
    assert (await response.json())["code"] == "body_too_large"

    async def chunked():  # type: ignore[no-untyped-def]
        for _ in range(32):
            yield b"y" * 65536

    response = await gateway.call(reader, "/sha256", method="GET", data=chunked())
    assert response.status == 413
    response = await gateway.call(admin, "/sha256", method="POST", data=chunked())
    assert response.status == 200


async def test_a_client_that_stops_sending_its_body_gets_408(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(client_body_timeout=0.3)
    token = (await gateway.create_token())["token"]
    request = (
        f"POST /sha256 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 100\r\n"
        "Connection: close\r\n\r\n0123456789"
    ).encode()
    status, reply = await send_raw(gateway.proxy, request)
    assert status == 408
    assert b"client_timeout" in reply


async def test_oversized_headers_get_a_431_before_any_work(gateway: Gateway) -> None:
    token = (await gateway.create_token())["token"]
    too_many = "".join(f"X-H{i}: v\r\n" for i in range(150))
    status, reply = await send_raw(gateway.proxy, f"GET / HTTP/1.1\r\nHost: x\r\n{too_many}\r\n".encode())
    assert status == 431
    assert b'"code": "headers_too_large"' in reply and b"more than 100 headers" in reply
    status, reply = await send_raw(gateway.proxy, f"GET / HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 9000}\r\n\r\n".encode())
    assert status == 431
    assert b"'X-Big' is longer than 8190 bytes" in reply
    status, reply = await send_raw(gateway.proxy, f"GET /{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 431
    assert b"request line is longer" in reply
    response = await gateway.call(None, headers={"Authorization": "Bearer " + "a" * 5000})
    assert response.status == 431
    assert (await response.json())["code"] == "authorization_too_long"
    assert (await gateway.call(token)).status == 200
