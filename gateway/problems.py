"""Client-facing errors as RFC 9457 problem details, answered by exactly one middleware per app."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

from aiohttp import web

from gateway.store.base import StoreUnavailable

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:gateway:problem:"

log = logging.getLogger(__name__)


class GatewayError(Exception):
    """A decision or a refusal the gateway answers itself, with a stable machine `code`.

    The message is the problem's `detail` and is shown to the client: it must never contain a secret.
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field
        self.headers = dict(headers or {})

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.code!r}, {self.detail!r})"


def bad_request(field: str | None, detail: str, code: str = "invalid_field") -> GatewayError:
    return GatewayError(400, code, detail, field=field)


def problem_bytes(status: int, code: str, detail: str, *, field: str | None = None) -> bytes:
    """The RFC 9457 body, shared by the admin API (aiohttp) and the proxy port (http_server.py)."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if field is not None:
        body["field"] = field
    return json.dumps(body).encode()


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=problem_bytes(status, code, detail, field=field),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


def error_response(error: GatewayError) -> web.Response:
    return problem_response(
        error.status, error.code, error.detail, field=error.field, headers=error.headers
    )


# aiohttp's own HTTP errors (404 for an unknown route, 405, 413 ...) get a code named after their status.
_HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error this app answers itself into problem+json; log the unexpected ones."""
    try:
        return await handler(request)
    except GatewayError as error:
        return error_response(error)
    except StoreUnavailable:
        log.warning("the store failed on %s %s", request.method, request.rel_url.path, exc_info=True)
        return problem_response(
            503, "store_unavailable", "The token store is not answering; try again shortly.", headers={"Retry-After": "1"}
        )
    except web.HTTPException as http_error:
        if http_error.status < 400:
            raise
        code = _HTTP_ERROR_CODES.get(http_error.status, HTTPStatus(http_error.status).phrase.lower().replace(" ", "_"))
        detail = http_error.text if http_error.text and http_error.text != http_error.reason else f"{http_error.reason}."
        headers = {k: v for k, v in http_error.headers.items() if k.lower() in {"allow", "retry-after"}}
        return problem_response(http_error.status, code, detail.removeprefix(f"{http_error.status}: "), headers=headers)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.rel_url.path)
        return problem_response(500, "internal_error", "The gateway failed to handle this request.")
