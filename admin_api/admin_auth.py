"""Who may use the admin API: bearer admin keys with a role, stored as argon2 hashes.

Keys created through the API read `<prefix>adm_<id>_<secret>` (the token format, so secret scanners know them
too) and are looked up by id; the bootstrap key (GATEWAY_ADMIN_KEY, or the one generated at first start) may
be any string. A verified key is recognised afterwards by its memo digest, and a key that failed is remembered
too, so neither costs argon2 work twice. The key list is read from the store on each request: a deleted key
stops working at once, in every admin process.

Wrong keys are limited per address as the proxy limits wrong secrets (failure_limits.py, the same windows and
settings): past `failure_limit` in a window, the address gets 429 with Retry-After, except for a key already
verified in this process, which is accepted first. What reaches the audit log is bounded (auth_audit.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from admin_api.auth_audit import FailedAuthAudit
from gateway.client_ip import parse_address
from gateway.core import core_key
from gateway.failure_limits import Clock, FailureWindows, source_key, too_many_failures
from gateway.problems import GatewayError
from gateway.secrets import SecretHasher
from gateway.settings import Secret
from gateway.store import TokenStore
from gateway.token_format import parse_token, random_base62
from gateway.tokens import AdminKeyRecord, utc_now

BOOTSTRAP_KEY_ID = "bootstrap"
ROLES = ("admin", "viewer")
ADMIN_REALM = 'Bearer realm="gateway-admin"'
MAX_KEY_LENGTH = 1024
MEMO_ENTRIES = 4096
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/openapi.json"})
PUBLIC_PREFIXES = ("/page/",)


def admin_key_prefix(token_prefix: str) -> str:
    return f"{token_prefix}adm"


def _unauthorized(code: str, detail: str) -> GatewayError:
    return GatewayError(401, code, detail, headers={"WWW-Authenticate": ADMIN_REALM})


def _encodable(text: str) -> bool:
    """False for undecodable header bytes, which aiohttp hands over as lone surrogates: no key holds those."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class _Memo:
    """A bounded map from memo digest to the (key id, key hash) it was checked against."""

    def __init__(self) -> None:
        self._entries: OrderedDict[bytes, tuple[str, str]] = OrderedDict()

    def get(self, digest: bytes) -> tuple[str, str] | None:
        return self._entries.get(digest)

    def put(self, digest: bytes, key_id: str, key_hash: str) -> None:
        self._entries[digest] = (key_id, key_hash)
        self._entries.move_to_end(digest)
        while len(self._entries) > MEMO_ENTRIES:
            self._entries.popitem(last=False)


class AdminAuthenticator:
    def __init__(
        self,
        store: TokenStore,
        hasher: SecretHasher,
        *,
        prefix: str,
        failure_limit: int = 20,
        failure_window: float = 60.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._key_prefix = admin_key_prefix(prefix)
        self._verified = _Memo()
        self._failed = _Memo()
        self._failures = FailureWindows(failure_limit, failure_window, clock=clock)
        self.failure_audit = FailedAuthAudit(window=failure_window, clock=clock)

    async def bootstrap(self, configured: Secret | None) -> str | None:
        """Make sure an admin key exists. Returns a newly generated key, to be shown once, or None.

        The configured key is remembered as verified, so its holder is let in even from an address that
        wrong keys have throttled."""
        keys = {key.id: key for key in await self._store.list_admin_keys()}
        existing = keys.get(BOOTSTRAP_KEY_ID)
        generated = None
        if configured is not None:
            secret = configured.reveal()
            if existing is not None and await self._hasher.verify(existing.key_hash, secret):
                self._remember_verified(existing, secret)
                return None
        elif keys:
            return None
        else:
            secret = generated = f"{self._key_prefix}_{random_base62(43)}"
        record = AdminKeyRecord(
            id=BOOTSTRAP_KEY_ID,
            name="bootstrap admin key",
            role="admin",
            created_at=utc_now() if existing is None else existing.created_at,
            key_hash=await self._hasher.hash(secret),
        )
        await self._store.put_admin_key(record)
        self._remember_verified(record, secret)
        return generated

    def _remember_verified(self, key: AdminKeyRecord, secret: str) -> None:
        self._verified.put(self._hasher.memo_digest("admin:" + key.id, secret), key.id, key.key_hash)

    async def authenticate(self, authorization: str | None, source: str = "unknown") -> AdminKeyRecord:
        """The key presented in `authorization`; `source` is the caller's address key (source_key), for
        limiting wrong keys. Every `invalid_admin_key` answer counts against the address, a repeated one too:
        the bootstrap key may be a chosen string, so guesses must stay few."""
        scheme, _, presented = (authorization or "").partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise _unauthorized("missing_credentials", "Send an admin key as 'Authorization: Bearer <key>'.")
        candidate = None
        if len(presented) <= MAX_KEY_LENGTH and _encodable(presented):
            keys = {key.id: key for key in await self._store.list_admin_keys()}
            parsed = parse_token(presented, self._key_prefix)
            candidate = keys.get(parsed.token_id if parsed is not None else BOOTSTRAP_KEY_ID)
        if candidate is not None:
            digest = self._hasher.memo_digest("admin:" + candidate.id, presented)
            if self._verified.get(digest) == (candidate.id, candidate.key_hash):
                return candidate
        wait = self._failures.retry_after(source)
        if wait is not None:
            raise too_many_failures(wait, "Too many wrong admin keys from this address")
        if candidate is not None and self._failed.get(digest) != (candidate.id, candidate.key_hash):
            if await self._hasher.verify(candidate.key_hash, presented):
                self._verified.put(digest, candidate.id, candidate.key_hash)
                return candidate
            self._failed.put(digest, candidate.id, candidate.key_hash)
        self._failures.add(source)
        raise _unauthorized("invalid_admin_key", "The admin key is not valid.")


admin_authenticator_key = web.AppKey("admin_authenticator", AdminAuthenticator)
admin_key_key = web.RequestKey("admin_key", AdminKeyRecord)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


@web.middleware
async def admin_auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate every non-public request; a `viewer` may read, and gets 403 on every change."""
    if is_public(request.path) or (request.path == "/metrics" and request.app[core_key].settings.metrics_public):
        return await handler(request)
    authenticator = request.app[admin_authenticator_key]
    source = source_key(parse_address(request.remote)) if request.remote is not None else "unknown"
    try:
        key = await authenticator.authenticate(request.headers.get(hdrs.AUTHORIZATION), source)
    except GatewayError as error:
        if error.code in ("invalid_admin_key", "too_many_failures"):
            details = {"source_ip": request.remote, "method": request.method, "path": request.path}
            for event in authenticator.failure_audit.events(error.code, source, details):
                await request.app[core_key].store.append_audit(event)
        raise
    request[admin_key_key] = key
    if key.role != "admin" and request.method not in SAFE_METHODS:
        raise GatewayError(
            403, "insufficient_role", f"The admin key '{key.name}' has the role '{key.role}', which may only read."
        )
    return await handler(request)
