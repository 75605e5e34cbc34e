"""Step 1 and 2 of every request: reading the credentials and judging the token (RFC 6750 answers)."""

from __future__ import annotations

import base64

import pytest

from gateway.credentials import invalid_token, presented_token
from gateway.problems import GatewayError
from gateway.token_format import issue_token, parse_token
from tests.conftest import Gateway, Upstream

PROBLEM = "application/problem+json"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer    ", "Token abc", "Digest x=1", "Basic !!!notbase64", basic("", "")[:-2] + "%%",
     "Basic " + base64.b64encode(b"no-colon").decode(), "Bearer a b"],
)
async def test_missing_or_malformed_credentials_get_401_missing_credentials(
    gateway: Gateway, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await gateway.proxy.get("/api/posts", headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    assert response.content_type == PROBLEM
    body = await response.json()
    assert body["code"] == "missing_credentials"
    assert body["status"] == 401
    assert {"type", "title", "detail"} <= body.keys()


async def test_token_in_basic_auth_user_or_password_is_accepted(gateway: Gateway, upstream: Upstream) -> None:
    token = (await gateway.create_token())["token"]
    for authorization in (basic(token, ""), basic("integration", token), basic(token, "x")):
        response = await gateway.proxy.get("/api/posts", headers={"Authorization": authorization})
        assert response.status == 200, authorization
        assert "Authorization" not in upstream.last["headers"]


async def test_bearer_scheme_is_case_insensitive(gateway: Gateway) -> None:
    token = (await gateway.create_token())["token"]
    response = await gateway.proxy.get("/api/posts", headers={"Authorization": f"bearer {token}"})
    assert response.status == 200


async def test_unknown_id_wrong_secret_and_bad_checksum_get_the_same_answer(gateway: Gateway) -> None:
    real = parse_token((await gateway.create_token())["token"], "gw")
    assert real is not None
    unknown_id = str(issue_token("gw", "A" * 16))
    wrong_secret = str(issue_token("gw", real.token_id))
    bad_checksum = str(real)[:-1] + ("A" if str(real)[-1] != "A" else "B")
    answers = []
    for presented in (unknown_id, wrong_secret, bad_checksum, "gw_garbage", "x" * 300):
        response = await gateway.call(presented)
        assert response.status == 401, presented
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="gateway", error="invalid_token"')
        answers.append(await response.json())
    assert all(answer == answers[0] for answer in answers)
    assert answers[0]["code"] == "invalid_token"


async def test_bad_checksum_is_refused_without_a_store_read(gateway: Gateway) -> None:
    token = (await gateway.create_token())["token"]
    gateway.core.tokens.clear()
    reads = gateway.core.store.reads
    response = await gateway.call(token[:-6] + "000000")
    assert response.status == 401
    assert gateway.core.store.reads == reads


async def test_steady_state_requests_do_no_argon2_work_and_no_store_reads(gateway: Gateway) -> None:
    token = (await gateway.create_token())["token"]
    gateway.core.tokens.clear()  # start cold, as after a restart
    assert (await gateway.call(token)).status == 200
    verifications, reads = gateway.core.hasher.verify_calls, gateway.core.store.reads
    for _ in range(20):
        assert (await gateway.call(token)).status == 200
    assert gateway.core.hasher.verify_calls == verifications
    assert gateway.core.store.reads == reads


async def test_concurrent_cold_requests_share_one_store_read_and_one_argon2_verification(gateway: Gateway) -> None:
    import asyncio

    token = (await gateway.create_token())["token"]
    gateway.core.tokens.clear()
    verifications, reads = gateway.core.hasher.verify_calls, gateway.core.store.reads
    responses = await asyncio.gather(*(gateway.call(token) for _ in range(16)))
    assert [response.status for response in responses] == [200] * 16
    assert gateway.core.hasher.verify_calls - verifications == 1
    assert gateway.core.store.reads - reads == 1


async def test_unknown_token_ids_are_remembered_briefly(gateway: Gateway) -> None:
    unknown = str(issue_token("gw", "B" * 16))
    reads = gateway.core.store.reads
    for _ in range(10):
        assert (await gateway.call(unknown)).status == 401
    assert gateway.core.store.reads - reads == 1


async def test_a_rotated_out_secret_is_refused_without_argon2_work(gateway: Gateway) -> None:
    created = await gateway.create_token()
    assert (await gateway.call(created["token"])).status == 200
    status, _ = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/rotate")
    assert status == 200
    verifications = gateway.core.hasher.verify_calls
    for _ in range(3):
        response = await gateway.call(created["token"])
        assert (await response.json())["code"] == "invalid_token"
    assert gateway.core.hasher.verify_calls == verifications


def _refusal(authorization: str | None, prefix: str = "gw") -> tuple[int, str, str, dict[str, str]]:
    with pytest.raises(GatewayError) as refused:
        presented_token(authorization, prefix)
    error = refused.value
    return error.status, error.code, error.detail, dict(error.headers or {})


MISSING = (401, "missing_credentials")
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="gateway"'}
NOT_BASE64 = "The Basic credentials are not valid base64 of 'user:password'."


def _b64(raw: str) -> str:
    return base64.b64encode(raw.encode()).decode()


@pytest.mark.parametrize(
    ("authorization", "detail"),
    [
        (None, "Send the API token as 'Authorization: Bearer <token>'."),
        ("", "Send the API token as 'Authorization: Bearer <token>'."),
        ("Bearer", "The Bearer credentials are empty or malformed."),
        ("Bearer a b", "The Bearer credentials are empty or malformed."),
        ("Token abc", "Only the Bearer and Basic authorization schemes are accepted."),
        ("Basic dXNlcjpwYXNz!!", NOT_BASE64),  # "user:pass" and junk a lenient decoder would drop
        ("Basic " + _b64("no-colon"), NOT_BASE64),
        ("Basic " + base64.b64encode(b"\xff:\xfe").decode(), NOT_BASE64),
        ("Basic " + _b64(":"), "The Basic credentials carry no token."),
    ],
)
def test_each_refusal_of_the_credentials_says_what_was_wrong(authorization: str | None, detail: str) -> None:
    assert _refusal(authorization) == (*MISSING, detail, CHALLENGE)


def test_an_authorization_header_of_4096_characters_is_read_and_of_4097_refused() -> None:
    assert presented_token("Bearer " + "a" * 4089, "gw") == "a" * 4089
    assert _refusal("Bearer " + "a" * 4090) == (
        431, "authorization_too_long", "The Authorization header is longer than 4096 characters.", {}
    )


@pytest.mark.parametrize(
    ("user", "password", "token"),
    [
        ("gw_abc", "", "gw_abc"),
        ("", "gw_abc", "gw_abc"),
        ("someone", "gw_abc", "gw_abc"),
        ("gw_abc", "something:else", "gw_abc"),  # the password may hold a colon; the user may not
        ("", "no-prefix", "no-prefix"),
        ("no-prefix", "", "no-prefix"),
        ("first", "second", "first"),
    ],
)
def test_the_token_is_found_in_either_basic_field(user: str, password: str, token: str) -> None:
    assert presented_token("Basic " + _b64(f"{user}:{password}"), "gw") == token


def test_invalid_token_answers_rfc_6750_with_one_detail() -> None:
    error = invalid_token()
    assert (error.status, error.code, error.detail) == (401, "invalid_token", "The token is not valid.")
    assert error.headers == {
        "WWW-Authenticate": 'Bearer realm="gateway", error="invalid_token", error_description="The token is not valid."'
    }
    assert invalid_token("Other.").headers == {
        "WWW-Authenticate": 'Bearer realm="gateway", error="invalid_token", error_description="Other."'
    }
    assert invalid_token("Other.").detail == "Other."
