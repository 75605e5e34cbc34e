"""Two admin processes on one store editing one token: no update is ever lost, a stale edit is refused."""

from __future__ import annotations

import asyncio

from tests.admin_api.conftest import expect_problem, token_view
from tests.conftest import Gateway, GatewayFactory, both_store_backends

pytestmark = both_store_backends


async def two_admins(start_gateway: GatewayFactory) -> tuple[Gateway, Gateway]:
    return await start_gateway(("admin",)), await start_gateway(("admin",))


async def test_edits_of_different_fields_racing_from_two_admins_all_hold(start_gateway: GatewayFactory) -> None:
    first, second = await two_admins(start_gateway)
    token = await first.create_token(name="racing", access_level="read_only")
    path = f"/v1/tokens/{token['id']}"
    names = [f"name {n}" for n in range(10)]
    ranges = [[f"10.0.{n}.0/24"] for n in range(10)]

    answers = await asyncio.gather(
        *(first.admin_call("PATCH", path, json={"name": name}) for name in names),
        *(second.admin_call("PATCH", path, json={"allowed_ip_ranges": value}) for value in ranges),
    )

    assert [status for status, _ in answers] == [200] * 20
    final = await token_view(second, token["id"])
    assert final["version"] == token["version"] + 20
    assert final["name"] == max(answers[:10], key=lambda answer: answer[1]["version"])[1]["name"]
    assert final["allowed_ip_ranges"] == max(answers[10:], key=lambda answer: answer[1]["version"])[1]["allowed_ip_ranges"]
    status, audit = await first.admin_call("GET", f"/v1/audit?token_id={token['id']}&limit=100")
    assert [event["action"] for event in audit["items"]].count("token.edit") == 20


async def test_of_two_edits_from_the_same_version_one_wins_and_the_other_gets_409(
    start_gateway: GatewayFactory,
) -> None:
    first, second = await two_admins(start_gateway)
    token = await first.create_token(name="original")
    path = f"/v1/tokens/{token['id']}"
    read = await token_view(second, token["id"])

    answers = await asyncio.gather(
        first.admin.patch(path, json={"name": "from first", "version": read["version"]}, headers=first.admin_headers),
        second.admin.patch(path, json={"name": "from second", "version": read["version"]}, headers=second.admin_headers),
    )

    statuses = sorted(answer.status for answer in answers)
    assert statuses == [200, 409]
    winner = next(answer for answer in answers if answer.status == 200)
    loser = next(answer for answer in answers if answer.status == 409)
    body = await expect_problem(loser, 409, "conflict")
    assert f"version {read['version'] + 1}" in body["detail"]
    final = await token_view(first, token["id"])
    assert final["name"] == (await winner.json())["name"] and final["version"] == read["version"] + 1


async def test_an_edit_with_the_current_version_is_applied(start_gateway: GatewayFactory) -> None:
    first, _ = await two_admins(start_gateway)
    token = await first.create_token(name="before")
    status, edited = await first.admin_call(
        "PATCH", f"/v1/tokens/{token['id']}", json={"name": "after", "version": token["version"]}
    )
    assert status == 200 and edited["name"] == "after" and edited["version"] == token["version"] + 1


async def test_a_version_that_is_not_a_positive_integer_is_400(start_gateway: GatewayFactory) -> None:
    first, _ = await two_admins(start_gateway)
    token = await first.create_token()
    for bad in ("1", 0, True, 1.5, None):
        response = await first.admin.patch(
            f"/v1/tokens/{token['id']}", json={"name": "x", "version": bad}, headers=first.admin_headers
        )
        await expect_problem(response, 400, "invalid_version", "version")
