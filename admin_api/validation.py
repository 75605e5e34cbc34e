"""Reading admin input: every problem is a 400 naming the field, found before anything is written."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

from aiohttp import web

from gateway.problems import bad_request
from gateway.ranges import MAX_RANGES, RangeError, normalize_ranges
from gateway.ratelimits.policy import (
    MAX_PER_SECONDS,
    MAX_RATE_PER_SECOND,
    MAX_REQUESTS,
    Quota,
    QuotaPeriod,
    RateLimit,
)
from gateway.tokens import TokenStatus, parse_rfc3339

NAME_MAX_LENGTH = 100
# Controls (C0, DEL and C1, whose CSI can drive a terminal), the Unicode line and paragraph separators, and
# lone surrogates (JSON can spell "\ud800"; no UTF-8 column can store it).
NAME_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})
MAX_GRACE_SECONDS = 7 * 24 * 3600
MAX_PAGE_SIZE = 500


async def read_json_object(request: web.Request, allowed: Collection[str]) -> dict[str, Any]:
    """The request body as a JSON object with only `allowed` keys; an empty body is `{}`."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(None, f"The body is not valid JSON: {error}.", "invalid_json") from None
    except RecursionError:  # json's decoder gives up on deep nesting this way, not with a ValueError
        raise bad_request(None, "The body is nested too deeply.", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(None, "The body must be a JSON object.", "invalid_json")
    for key in body:
        if key not in allowed:
            allowed_text = f" Allowed: {', '.join(sorted(allowed))}." if allowed else " This request takes no fields."
            raise bad_request(key[:64], f"Unknown field '{key[:64]}'.{allowed_text}", "unknown_field")
    return body


def parse_version(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        raise bad_request("version", "version must be a token's version, a positive integer.", "invalid_version")
    return value


def parse_name(value: Any) -> str:
    if not isinstance(value, str):
        raise bad_request("name", "name must be a string.", "invalid_name")
    name = value.strip()
    if not 1 <= len(name) <= NAME_MAX_LENGTH:
        raise bad_request("name", f"name must be 1 to {NAME_MAX_LENGTH} characters.", "invalid_name")
    if any(unicodedata.category(char) in NAME_FORBIDDEN_CATEGORIES for char in name):
        raise bad_request(
            "name", "name must not contain control characters, line breaks or lone surrogates.", "invalid_name"
        )
    return name


def parse_access_level(value: Any, levels: Collection[str]) -> str:
    if not isinstance(value, str) or value not in levels:
        raise bad_request(
            "access_level",
            f"Unknown access level {str(value)[:64]!r}. Configured levels: {', '.join(levels)}.",
            "unknown_access_level",
        )
    return value


def parse_ip_ranges(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise bad_request("allowed_ip_ranges", "allowed_ip_ranges must be a list of strings.", "invalid_ip_range")
    if len(value) > MAX_RANGES:
        raise bad_request(
            "allowed_ip_ranges", f"At most {MAX_RANGES} IP ranges are allowed per token.", "too_many_ip_ranges"
        )
    try:
        return normalize_ranges(value)
    except RangeError as error:
        raise bad_request("allowed_ip_ranges", f"{error}.", "invalid_ip_range") from None


def parse_expires_at(value: Any, *, now: datetime) -> datetime | None:
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError("must be an RFC 3339 timestamp string")
        moment = parse_rfc3339(value)
    except ValueError as error:
        raise bad_request("expires_at", f"expires_at {error}.", "invalid_expires_at") from None
    if moment <= now:
        raise bad_request("expires_at", "expires_at must be in the future.", "invalid_expires_at")
    return moment


def parse_grace_seconds(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_GRACE_SECONDS:
        raise bad_request(
            "grace_seconds", f"grace_seconds must be an integer from 0 to {MAX_GRACE_SECONDS}.", "invalid_grace_seconds"
        )
    return value


def query_parameters(request: web.Request, allowed: Collection[str]) -> Mapping[str, str]:
    for key in request.query:
        if key not in allowed:
            raise bad_request(key, f"Unknown query parameter '{key}'.", "unknown_parameter")
        if len(request.query.getall(key)) > 1:
            raise bad_request(key, f"Query parameter '{key}' is given more than once.", "invalid_parameter")
    return request.query


def parse_limit(text: str | None) -> int:
    if text is None:
        return 100
    # str.isdigit() also accepts '²' (which int() refuses) and '٣' (which it reads as 3): ASCII only.
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_PAGE_SIZE:
        raise bad_request("limit", f"limit must be an integer from 1 to {MAX_PAGE_SIZE}.", "invalid_parameter")
    return int(text)


def parse_status(text: str | None) -> TokenStatus | None:
    if text is None:
        return None
    try:
        return TokenStatus(text)
    except ValueError:
        raise bad_request("status", "status must be 'enabled' or 'disabled'.", "invalid_parameter") from None


def parse_time_parameter(name: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    # An unescaped '+' in a query string arrives as a space: "...T00:00:00 02:00" meant "+02:00".
    text = text[:19] + text[19:].replace(" ", "+")
    try:
        return parse_rfc3339(text)
    except ValueError as error:
        raise bad_request(name, f"{name} {error}.", "invalid_parameter") from None


def _limit_object(value: Any, field: str, keys: Collection[str], code: str, example: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad_request(field, f"{field} must be null (unlimited) or an object such as {example}.", code)
    for key in value:
        if key not in keys:
            raise bad_request(
                f"{field}.{key[:64]}", f"Unknown field '{key[:64]}' in {field}. Allowed: {', '.join(keys)}.", code
            )
    return value


def _count(value: Any, field: str, code: str, *, maximum: int, required: bool = True) -> Any:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise bad_request(field, f"{field} must be an integer from 1 to {maximum}.", code)
    return value


def parse_rate_limit(value: Any) -> RateLimit | None:
    """null, or {"requests": N, "per_seconds": S, "burst": B} with burst optional (null: N)."""
    if value is None:
        return None
    code = "invalid_rate_limit"
    body = _limit_object(
        value, "rate_limit", ("requests", "per_seconds", "burst"), code, '{"requests": 100, "per_seconds": 60}'
    )
    for required in ("requests", "per_seconds"):
        if required not in body:
            raise bad_request(f"rate_limit.{required}", f"rate_limit.{required} is required.", code)
    rate = RateLimit(
        requests=_count(body["requests"], "rate_limit.requests", code, maximum=MAX_REQUESTS),
        per_seconds=_count(body["per_seconds"], "rate_limit.per_seconds", code, maximum=MAX_PER_SECONDS),
        burst=_count(body.get("burst"), "rate_limit.burst", code, maximum=MAX_REQUESTS, required=False),
    )
    if rate.requests > rate.per_seconds * MAX_RATE_PER_SECOND:
        raise bad_request(
            "rate_limit.requests", f"rate_limit allows at most {MAX_RATE_PER_SECOND} requests per second.", code
        )
    return rate


def parse_quota(value: Any) -> Quota | None:
    """null, or {"requests": N, "period": "day" | "month" | "total"}."""
    if value is None:
        return None
    code = "invalid_quota"
    body = _limit_object(value, "quota", ("requests", "period"), code, '{"requests": 10000, "period": "day"}')
    for required in ("requests", "period"):
        if required not in body:
            raise bad_request(f"quota.{required}", f"quota.{required} is required.", code)
    periods = [period.value for period in QuotaPeriod]
    if not isinstance(body["period"], str) or body["period"] not in periods:
        raise bad_request("quota.period", f"quota.period must be one of {', '.join(periods)}.", code)
    return Quota(
        requests=_count(body["requests"], "quota.requests", code, maximum=MAX_REQUESTS),
        period=QuotaPeriod(body["period"]),
    )
