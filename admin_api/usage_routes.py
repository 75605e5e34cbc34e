"""What a token was used for: its request counts by hour or by day, by outcome (gateway/request_counts.py).

Counts are read from where the proxies write them: Redis when they share one, else the store.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web
from redis.exceptions import RedisError

from admin_api.validation import query_parameters
from gateway.core import Core, core_key
from gateway.problems import GatewayError, bad_request
from gateway.request_counts import Granularity, first_shown, last_24h_start, usage_answer
from gateway.token_format import ID_PATTERN

routes = web.RouteTableDef()


def usage_unavailable() -> GatewayError:
    return GatewayError(
        503, "usage_unavailable", "The request counts cannot be read now; try again shortly.", headers={"Retry-After": "1"}
    )


def _granularity(text: str | None) -> Granularity:
    if text is None:
        return Granularity.HOUR
    try:
        return Granularity(text)
    except ValueError:
        raise bad_request("granularity", "granularity must be 'hour' or 'day'.", "invalid_parameter") from None


async def requests_last_24h(core: Core, token_ids: Sequence[str]) -> dict[str, int] | None:
    """Requests of every outcome in the current hour and the 23 before it, per token; None when the counts
    cannot be read (the list is still answered)."""
    try:
        return await core.counts.requests_since(token_ids, last_24h_start(core.clock().timestamp()))
    except (RedisError, OSError):
        return None


@routes.get("/v1/tokens/{token_id}/usage")
async def token_usage(request: web.Request) -> web.Response:
    core = request.app[core_key]
    token_id = request.match_info["token_id"]
    query = query_parameters(request, {"granularity"})
    granularity = _granularity(query.get("granularity"))
    if not ID_PATTERN.fullmatch(token_id) or await core.store.get_token(token_id) is None:
        raise GatewayError(404, "token_not_found", "There is no token with this id.")
    now = core.clock().timestamp()
    try:
        counts = await core.counts.read_counts(token_id, granularity, first_shown(granularity, now))
    except (RedisError, OSError):
        raise usage_unavailable() from None
    return web.json_response(usage_answer(token_id, granularity, now, counts))
