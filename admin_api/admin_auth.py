"""Who may use the admin API: bearer admin keys, stored as argon2 hashes and recognised by memo afterwards."""

from __future__ import annotations

import logging

from aiohttp import hdrs, web

from gateway.problems import GatewayError
from gateway.secrets import SecretHasher
from gateway.settings import Secret
from gateway.store import TokenStore
from gateway.token_format import random_base62
from gateway.tokens import AdminKeyRecord, utc_now

BOOTSTRAP_KEY_ID = "bootstrap"
ADMIN_REALM = 'Bearer realm="gateway-admin"'
MAX_MEMO_ENTRIES = 1024

log = logging.getLogger(__name__)


def _unauthorized(code: str, detail: str) -> GatewayError:
    return GatewayError(401, code, detail, headers={"WWW-Authenticate": ADMIN_REALM})


class AdminAuthenticator:
    def __init__(self, store: TokenStore, hasher: SecretHasher, *, prefix: str) -> None:
        self._store = store
        self._hasher = hasher
        self._prefix = prefix
        self._keys: dict[str, AdminKeyRecord] = {}
        self._memo: dict[bytes, str] = {}  # memo digest of a verified key -> admin key id

    async def bootstrap(self, configured: Secret | None) -> str | None:
        """Make sure an admin key exists. Returns a newly generated key, to be shown once, or None."""
        self._keys = {key.id: key for key in await self._store.list_admin_keys()}
        existing = self._keys.get(BOOTSTRAP_KEY_ID)
        generated = None
        if configured is not None:
            secret = configured.reveal()
            if existing is not None and await self._hasher.verify(existing.key_hash, secret):
                return None
        elif self._keys:
            return None
        else:
            secret = generated = f"{self._prefix}adm_{random_base62(43)}"
        record = AdminKeyRecord(
            id=BOOTSTRAP_KEY_ID,
            name="bootstrap admin key",
            role="admin",
            created_at=utc_now() if existing is None else existing.created_at,
            key_hash=await self._hasher.hash(secret),
        )
        await self._store.put_admin_key(record)
        self._keys[record.id] = record
        self._memo.clear()
        return generated

    async def authenticate(self, authorization: str | None) -> AdminKeyRecord:
        scheme, _, presented = (authorization or "").partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise _unauthorized("missing_credentials", "Send an admin key as 'Authorization: Bearer <key>'.")
        if len(presented) > 1024:
            raise _unauthorized("invalid_admin_key", "The admin key is not valid.")
        digest = self._hasher.memo_digest("admin", presented)
        key_id = self._memo.get(digest)
        if key_id is not None and key_id in self._keys:
            return self._keys[key_id]
        for key in list(self._keys.values()):
            if await self._hasher.verify(key.key_hash, presented):
                if len(self._memo) >= MAX_MEMO_ENTRIES:
                    self._memo.clear()
                self._memo[digest] = key.id
                return key
        log.warning("admin API: rejected an invalid admin key")
        raise _unauthorized("invalid_admin_key", "The admin key is not valid.")


admin_authenticator_key = web.AppKey("admin_authenticator", AdminAuthenticator)
admin_key_key = web.RequestKey("admin_key", AdminKeyRecord)

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


@web.middleware
async def admin_auth_middleware(request: web.Request, handler: object) -> web.StreamResponse:
    if request.path not in PUBLIC_PATHS:
        authenticator = request.app[admin_authenticator_key]
        request[admin_key_key] = await authenticator.authenticate(request.headers.get(hdrs.AUTHORIZATION))
    return await handler(request)  # type: ignore[operator,no-any-return]
