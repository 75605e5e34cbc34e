"""Forward-auth: the gateway's decision (decision.py) answered to a proxy the operator already runs.

The proxy (nginx `auth_request`, Traefik `forwardAuth`, Caddy `forward_auth`, Envoy `ext_authz`) asks before
each request; the gateway answers 200 with the caller's identity for the proxy to copy upstream, or its own
401/403/429/400/503 problem+json for the proxy to return. Where the original request's method and target are
read depends on the proxy (setting forward_auth_convention), and exactly one place is read:

    nginx            X-Original-Method and X-Original-URI (set by the operator's proxy_set_header lines)
    traefik, caddy   X-Forwarded-Method and X-Forwarded-Uri
    envoy            the auth request's own method and target, after forward_auth_path_prefix

Reading whichever header is present would let a client choose: Traefik copies every client header to the auth
request, so a client's own X-Original-URI would be judged in place of the path Traefik forwards. The client
address is X-Forwarded-For, believed only from trusted_proxies, as on the proxy port; the target is judged by
the same function the proxy uses.

The proxy in front forwards the client's own headers to the upstream, so the gateway cannot drop a header
an upstream would read as the method or the path (X-HTTP-Method-Override, X-Original-URL, SCRIPT_NAME...):
an auth request that carries one, other than the convention's own, is refused with 400 `override_header`.

A token's rate limit and quota are counted here as on the proxy port (after the decision, so a refused
request uses none of them): 429 `rate_limited` / `quota_exceeded` with Retry-After and the RateLimit fields,
and an allowed answer carries RateLimit-Policy and RateLimit for the proxy to copy to its client if it wants.

The auth request carries no body, so a POST is judged as if it had one (with body_method_override on), and
a level's max_body_bytes is the operator's proxy to enforce.
"""

from __future__ import annotations

import re

from aiohttp import web

from gateway.authenticator import presented_previous
from gateway.core import Core
from gateway.decision import Decider
from gateway.forward import (
    GATEWAY_HEADER_PREFIX,
    HEADER_NAME_FOLD,
    METHOD_OVERRIDE_HEADERS,
    PATH_OVERRIDE_HEADERS,
    gateway_headers,
)
from gateway.http_server import HttpRequest, RequestHandler
from gateway.problems import GatewayError

forward_auth_handler_key: web.AppKey[RequestHandler] = web.AppKey("forward_auth_handler")

# Where each convention names the original request: (method header, target header), or None when the auth
# request's own request line is the original (Envoy).
CONVENTIONS: dict[str, tuple[bytes, bytes] | None] = {
    "nginx": (b"x-original-method", b"x-original-uri"),
    "traefik": (b"x-forwarded-method", b"x-forwarded-uri"),
    "caddy": (b"x-forwarded-method", b"x-forwarded-uri"),
    "envoy": None,
}
_METHOD = re.compile(r"[A-Z]{1,20}(?:-[A-Z]{1,20})?")
# Headers an upstream reads as the request's method or path (forward.py drops them on the proxy port).
_OVERRIDE_HEADERS = METHOD_OVERRIDE_HEADERS | PATH_OVERRIDE_HEADERS
_ALLOWED_HEAD = b"Content-Type: text/plain\r\nCache-Control: no-store\r\n"


class ForwardAuthHandler:
    """Answers one auth request: 200 with identity headers, or the refusal as problem+json."""

    def __init__(self, core: Core, decider: Decider) -> None:
        settings = core.settings
        self._usage = core.usage
        self._limiter = core.limiter
        self._decider = decider
        self._names = CONVENTIONS[settings.forward_auth_convention]
        self._prefix = settings.forward_auth_path_prefix.encode("ascii")

    async def __call__(self, request: HttpRequest) -> None:
        authorization, forwarded_for, method, target = self._read(request)
        decider = self._decider
        caller = decider.caller(authorization, request.peer, forwarded_for)
        request.client = None if caller.client_ip is None else caller.client_ip.text  # for the access log
        token = await decider.token(caller)
        request.token_id = token.record.id
        try:
            decider.judge(token, method, target, caller.client_ip, body=method == "POST", canonical_only=True)
        except GatewayError as refusal:
            self._usage.refused(token.record.id, refusal.code)
            raise
        record = token.record
        if record.rate_limit is not None or record.quota is not None:
            try:
                limit_headers = await self._limiter.admit(record)
            except GatewayError as refusal:
                self._usage.refused(record.id, refusal.code)
                raise
        else:
            limit_headers = b""
        self._usage.record(record.id, caller.client_ip)
        if token.memo_previous is not None and presented_previous(token, caller.identified.digest):
            self._usage.previous_secret_used(record, caller.client_ip)
        request.respond(
            200, b"OK", _ALLOWED_HEAD + gateway_headers(record.id, record.access_level) + limit_headers, b""
        )

    def _read(self, request: HttpRequest) -> tuple[str | None, list[str], str, bytes]:
        """The Authorization value, the X-Forwarded-For values, and the original method and target."""
        names = self._names
        method_name, target_name = names if names is not None else (b"", b"")
        authorization = None
        forwarded_for: list[str] = []
        methods: list[bytes] = []
        targets: list[bytes] = []
        for name, value in request.headers:
            lower = name.lower()
            folded = name.translate(HEADER_NAME_FOLD)
            if folded != lower and folded.startswith(GATEWAY_HEADER_PREFIX):
                # The front proxy replaces X-Gateway-Token-Id with the answer's, but not X_Gateway_Token_Id,
                # which CGI-style upstreams read as the same header.
                raise GatewayError(
                    400,
                    "override_header",
                    f"The request carries {name.decode('latin-1')}, which an upstream may read as the gateway's"
                    " own identity header; the proxy in front would pass it on unreplaced.",
                )
            if lower != target_name and folded in _OVERRIDE_HEADERS:
                raise GatewayError(
                    400,
                    "override_header",
                    f"The request carries {name.decode('latin-1')}, which an upstream may read as the request's"
                    " method or path; the proxy in front would pass it on unjudged.",
                )
            if lower == b"authorization":
                if authorization is None:
                    authorization = value.decode("latin-1")
            elif lower == b"x-forwarded-for":
                forwarded_for.append(value.decode("latin-1"))
            elif lower == method_name:
                methods.append(value.strip())
            elif lower == target_name:
                targets.append(value.strip())
        if names is None:
            return authorization, forwarded_for, request.method, self._envoy_target(request.target)
        if len(methods) != 1 or len(targets) != 1:
            raise GatewayError(
                400,
                "forward_auth_request_incomplete",
                f"A forward-auth request names the original request in exactly one {method_name.decode()} and"
                f" one {target_name.decode()} header.",
            )
        method = methods[0].decode("latin-1")
        if not _METHOD.fullmatch(method):
            raise GatewayError(400, "bad_request", f"The {method_name.decode()} header is not an HTTP method.")
        return authorization, forwarded_for, method, targets[0]

    def _envoy_target(self, target: bytes) -> bytes:
        prefix = self._prefix
        if not target.startswith(prefix) or target[len(prefix) : len(prefix) + 1] != b"/":
            raise GatewayError(
                400,
                "forward_auth_request_incomplete",
                "A forward-auth request's target is forward_auth_path_prefix followed by the original path.",
            )
        return target[len(prefix) :]
