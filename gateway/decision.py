"""The decision both ways in share: may this token make this request from this address?

credentials (credentials.py) -> token and secret (authenticator.py) -> client address (client_ip.py) ->
allowed ranges (ranges.py) -> the target's one reading (request_target.py) -> access level (access_levels.py)

The proxy (proxy_app.py) forwards what was allowed; forward-auth (forward_auth.py) tells another proxy the
answer. Both read the caller and judge the target with these functions alone, so a request gets the same answer
whichever way it arrives.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from gateway.authenticator import Authenticator, IdentifiedToken
from gateway.client_ip import ClientAddress, ClientIpResolver
from gateway.credentials import presented_token
from gateway.failure_limits import source_key
from gateway.forward import BODY_OVERRIDE_METHODS, refuse_method_override
from gateway.problems import GatewayError
from gateway.request_target import RequestTarget, read_target
from gateway.settings import Settings
from gateway.token_cache import CachedToken

# Bytes no request line can carry in a target (llhttp refuses them on the proxy port); a target read from a
# header (forward-auth) could.
_NOT_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")


NON_CANONICAL_DETAIL = (
    "The path is allowed only as %s: the proxy in front forwards the path as sent, and an upstream could read"
    " this spelling (escapes, '//', dot segments) as another path."
)


class Caller(NamedTuple):
    """Who is asking, read once from the headers: the presented token and the client address."""

    identified: IdentifiedToken
    client_ip: ClientAddress | None
    peer_trusted: bool  # the peer is a trusted proxy: its forwarding headers count


class Verdict(NamedTuple):
    """A request allowed: the target as judged (the proxy forwards exactly its path), the body limit, and
    whether a body is allowed at all."""

    target: RequestTarget
    max_body: int
    body_allowed: bool  # False for a POST whose body could name a method the level withholds


def check_target(target: bytes) -> None:
    """A 400 for a target other than a path. An absolute-form target appended to the upstream URL would put its
    scheme into the upstream host name ("http://api" + "admin://x/y" connects to "apiadmin")."""
    if not target.startswith(b"/"):
        raise GatewayError(400, "invalid_request_target", "The request target must be a path, such as /api/posts.")


def credential_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, list[str]]:
    """The Authorization value and the X-Forwarded-For values, in one pass over the raw headers."""
    authorization = None
    forwarded_for: list[str] = []
    for name, value in headers:
        size = len(name)
        if size == 13 and name.lower() == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif size == 15 and name.lower() == b"x-forwarded-for":
            forwarded_for.append(value.decode("latin-1"))
    return authorization, forwarded_for


class Decider:
    """The gateway's one decision, for the proxy and forward-auth alike."""

    def __init__(self, settings: Settings, authenticator: Authenticator, client_ips: ClientIpResolver) -> None:
        self._settings = settings
        self._prefix = settings.token_prefix
        self._authenticator = authenticator
        self._client_ips = client_ips
        # The steady state, without an await: the token when its fresh cache entry knows this secret, else None.
        self.accept_known = authenticator.accept_known
        self.still_accepts = authenticator.still_accepts

    def caller(self, authorization: str | None, peer: str | None, forwarded_for: list[str]) -> Caller:
        """The presented token (a 401 when there is none, or it is malformed) and the client address."""
        identified = self._authenticator.identify(presented_token(authorization, self._prefix))
        client_ip, peer_trusted = self._client_ips.resolve(peer, forwarded_for)
        return Caller(identified, client_ip, peer_trusted)

    async def authenticate(self, caller: Caller) -> CachedToken:
        """The token, when `accept_known` could not decide: a 401, 429 or 503 otherwise."""
        return await self._authenticator.authenticate(caller.identified, source_key(caller.client_ip))

    async def token(self, caller: Caller) -> CachedToken:
        return self.accept_known(caller.identified) or await self.authenticate(caller)

    def judge(
        self,
        token: CachedToken,
        method: str,
        target: bytes,
        client_ip: ClientAddress | None,
        *,
        body: bool,
        canonical_only: bool = False,
    ) -> Verdict:
        """Whether this token may make this request from this address: a 400 or 403 naming the reason, or the
        limits it is allowed within. `body`: whether the request carries (or may carry) a body.
        `canonical_only`: the caller forwards the target itself, as sent, so an allowed target must already be
        the canonical path that was judged (the proxy port forwards the canonical path instead)."""
        check_target(target)
        if _NOT_IN_TARGET.search(target):
            raise GatewayError(
                400, "invalid_request_target", "The request target contains a space or a control character."
            )
        refuse_method_override(target)
        if token.ip_ranges is not None and (client_ip is None or client_ip not in token.ip_ranges):
            raise GatewayError(
                403, "ip_not_allowed", f"This token may not be used from {client_ip or 'this address'}."
            )
        read = read_target(target)  # a 400 if no reading is shared by every common router
        path = read.judged
        level = token.access_level
        if level is None or not level.permits(method, path):
            raise GatewayError(
                403,
                "insufficient_access_level",
                f"The token's access level '{token.record.access_level}' does not allow {method} on this path.",
            )
        if canonical_only and read.path.encode("ascii") != target.partition(b"?")[0]:
            raise GatewayError(400, "non_canonical_path", NON_CANONICAL_DETAIL % read.path)
        settings = self._settings
        max_body = settings.max_body_bytes if level.max_body_bytes is None else level.max_body_bytes
        body_allowed = (
            method != "POST"
            or not settings.body_method_override
            or all(level.permits(other, path) for other in BODY_OVERRIDE_METHODS)
        )
        if body and not body_allowed:
            raise body_method_refused(token)
        return Verdict(read, max_body, body_allowed)

    def with_query(self, verdict: Verdict, target: bytes) -> Verdict:
        """`judge`'s answer on `target` (with body=False, canonical_only=False), given its `verdict` on a target
        with the same path for the same token, method and client: what `judge` reads from the query is read
        again (control characters, a method override, a fragment), in the same order; the rest holds."""
        if _NOT_IN_TARGET.search(target):
            raise GatewayError(
                400, "invalid_request_target", "The request target contains a space or a control character."
            )
        refuse_method_override(target)
        return verdict._replace(target=read_target(target))


def body_method_refused(token: CachedToken) -> GatewayError:
    return GatewayError(
        403,
        "insufficient_access_level",
        f"The token's access level '{token.record.access_level}' does not allow a POST with a body on"
        " this path: the upstream may run it as the PUT, PATCH or DELETE its body names.",
    )
