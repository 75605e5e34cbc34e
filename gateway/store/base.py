"""The async interface every store backend (SQLite, PostgreSQL) and cache layer implements.

Each change to a token is one transaction that also appends its audit event (and, with Redis, its outbox
row), so a change is never recorded without its audit line, nor the other way round.

Each backend keeps a numbered list of schema migrations. `open()` checks the schema's version against it:
a newer one stops the process (SchemaTooNew); an older one is upgraded when the store was built to migrate,
and refused otherwise (SchemaOutdated). `migrate()` upgrades under a lock, so processes starting together
never race on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Protocol

from gateway.request_counts import AddressUses, Counts, Granularity, Outcome, PreviousUses
from gateway.tokens import AdminKeyRecord, AuditEvent, TokenRecord, TokenStatus

TokenChange = Callable[[TokenRecord], tuple[TokenRecord, AuditEvent]]


class StoreUnavailable(Exception):
    """The store could not be read or written (its file unreadable, its server down, unreachable or too slow):
    a 503, never a decision; nothing was written."""


class TokenNotFound(LookupError):
    pass


class InvalidCursor(ValueError):
    pass


class AdminKeyNotFound(LookupError):
    pass


class LastAdminKey(Exception):
    """Deleting this key would leave no key with the admin role."""


class SchemaError(RuntimeError):
    """The schema does not match this gateway; the message is one line for an operator."""


class SchemaOutdated(SchemaError):
    def __init__(self, message: str, *, found: int, newest: int) -> None:
        super().__init__(message)
        self.found = found
        self.newest = newest


class SchemaTooNew(SchemaError):
    pass


class ChangeFeed(Protocol):
    """A store that announces each committed change itself (PostgreSQL's LISTEN/NOTIFY)."""

    async def listen(self, changed: Callable[[str], None], connected: Callable[[], None]) -> None:
        """Until cancelled: call `connected()` after each (re)connection, then `changed(token_id)` for every
        change committed after it. Reconnects with backoff; never returns."""
        ...


class TokenStore(Protocol):
    reads: int
    """Token reads served so far; tests count them to prove the hot path stays off the store."""

    async def open(self) -> None:
        """Connect and check the schema version (upgrading it if this store was built to migrate)."""
        ...

    async def migrate(self) -> tuple[int, int]:
        """Bring the schema to the newest version this gateway knows: (version before, version after)."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def insert_token(self, record: TokenRecord, event: AuditEvent) -> None: ...

    async def get_token(self, token_id: str) -> TokenRecord | None: ...

    async def list_tokens(
        self,
        *,
        status: TokenStatus | None = None,
        unused_since: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[TokenRecord], str | None]: ...

    async def change_token(self, token_id: str, change: TokenChange) -> TokenRecord:
        """Apply `change` to the current record in one transaction; TokenNotFound if there is none."""
        ...

    async def delete_token(self, token_id: str, event: AuditEvent) -> None: ...

    async def record_usage(self, usage: Mapping[str, tuple[datetime, str]]) -> None:
        """Write last-used times and addresses in one batch, never moving a time backwards."""
        ...

    async def record_counts(self, counts: Counts, *, now: float) -> None:
        """Add request counts (request_counts.py) in one batch, and delete buckets older than they are kept."""
        ...

    async def read_counts(
        self, token_id: str, granularity: Granularity, since: int
    ) -> dict[tuple[int, Outcome], int]: ...

    async def requests_since(self, token_ids: Sequence[str], since: int) -> dict[str, int]: ...

    async def record_previous_uses(self, uses: PreviousUses) -> None:
        """Add a rotation's previous-secret uses; a token keeps the row of its latest rotation only."""
        ...

    async def previous_secret_use(self, token_id: str, rotated_at: datetime) -> tuple[int, datetime, str] | None: ...

    async def record_addresses(self, uses: AddressUses) -> None:
        """Add requests per client address; a token keeps its RECENT_ADDRESSES most recent addresses."""
        ...

    async def recent_addresses(self, token_id: str) -> list[tuple[str, int, datetime]]: ...

    async def list_audit(
        self, *, token_id: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[AuditEvent], str | None]: ...

    async def append_audit(self, event: AuditEvent) -> None: ...

    async def pending_changes(self, limit: int = 1000) -> list[tuple[int, str]]:
        """The outbox: (sequence, token id) of changes not yet delivered to the shared cache."""
        ...

    async def acknowledge_changes(self, up_to_seq: int) -> None: ...

    async def list_admin_keys(self) -> list[AdminKeyRecord]: ...

    async def put_admin_key(self, record: AdminKeyRecord, event: AuditEvent | None = None) -> None: ...

    async def delete_admin_key(self, key_id: str, event: AuditEvent) -> None:
        """AdminKeyNotFound, or LastAdminKey if no other key with the admin role would remain."""
        ...
