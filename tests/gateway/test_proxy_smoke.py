from tests.conftest import Gateway, Upstream


async def test_created_token_is_proxied(gateway: Gateway, upstream: Upstream) -> None:
    created = await gateway.create_token()
    response = await gateway.call(created["token"])
    assert response.status == 200
    assert upstream.last["headers"]["X-Gateway-Token-Id"] == created["id"]
