"""What a token was used for: its request counts by hour or by day, by outcome (gateway/request_counts.py).

Counts are read from where the proxies write them: Redis when they share one, else the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from admin_api.validation import query_parameters
from gateway.core import Core, core_key
from gateway.problems import GatewayError, bad_request
from gateway.request_counts import Granularity, first_shown, last_24h_start, usage_answer
from gateway.token_format import ID_PATTERN
from gateway.tokens import TokenRecord, format_time

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


def in_grace(record: TokenRecord, now: datetime) -> bool:
    expires = record.previous_secret_expires_at
    return record.previous_secret_hash is not None and expires is not None and now < expires


async def previous_secret_view(core: Core, record: TokenRecord) -> dict[str, Any] | None:
    """While a rotation's grace runs: how the previous secret was used since (never the secret). None when
    there is no grace, or the uses cannot be read."""
    if record.rotated_at is None or not in_grace(record, core.clock()):
        return None
    try:
        use = await core.counts.previous_secret_use(record.id, record.rotated_at)
    except (RedisError, OSError):
        return None
    if use is None:
        return {"last_used_at": None, "last_used_ip": None, "uses": 0}
    uses, at, ip = use
    return {"last_used_at": format_time(at), "last_used_ip": ip or None, "uses": uses}


async def recent_addresses_view(core: Core, token_id: str) -> list[dict[str, Any]] | None:
    """The last few distinct addresses the token was allowed from, with counts; None if they cannot be read."""
    try:
        found = await core.counts.recent_addresses(token_id)
    except (RedisError, OSError):
        return None
    return [{"address": address, "uses": uses, "last_used_at": format_time(at)} for address, uses, at in found]


async def token_answer(core: Core, record: TokenRecord) -> dict[str, Any]:
    """A token as every single-token answer shows it (read, create, edit, rotate, ...): its view, the addresses
    it was recently used from, and its previous secret's use while a grace runs."""
    view: dict[str, Any] = {**record.view(), "recent_addresses": await recent_addresses_view(core, record.id)}
    previous = await previous_secret_view(core, record)
    if previous is not None:
        view["previous_secret"] = previous
    return view


async def usage_views(core: Core, records: Sequence[TokenRecord]) -> list[dict[str, Any]]:
    """The listed tokens' views with their requests in the last 24 hours, and their previous secret's use
    while a grace runs."""
    recent = await requests_last_24h(core, [record.id for record in records])
    views = []
    for record in records:
        view = {**record.view(), "requests_24h": None if recent is None else recent[record.id]}
        previous = await previous_secret_view(core, record)
        if previous is not None:
            view["previous_secret"] = previous
        views.append(view)
    return views


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
