"""The store of record for many hosts: PostgreSQL through asyncpg, with a bounded pool.

Every change is one transaction holding its row, its audit event and (with Redis) its outbox row. A change
reads the current row FOR UPDATE, so two admin processes changing one token queue on the row lock and the
second applies its change to what the first wrote: no update is ever lost.

Each change also NOTIFYs its token id from its transaction, so every proxy hears of it from the store
itself, on a dedicated connection (`listen`), even while Redis is down.

Statements are cancelled by the server after `statement_timeout`, and abandoned by the client shortly after;
a store that does not answer raises StoreUnavailable, which callers turn into their own 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from gateway.background import raise_if_cancelling
from gateway.ratelimits.policy import quota_from_json, rate_limit_from_json
from gateway.request_counts import (
    RECENT_ADDRESSES,
    AddressUses,
    Counts,
    Granularity,
    Outcome,
    PreviousUses,
    parse_outcome,
    sum_by_token,
)
from gateway.settings import Secret, redact_url
from gateway.store.base import (
    AdminKeyNotFound,
    LastAdminKey,
    SchemaOutdated,
    SchemaTooNew,
    StoreUnavailable,
    TokenChange,
    TokenNotFound,
)
from gateway.store.cursors import decode_cursor, encode_cursor
from gateway.tokens import AdminKeyRecord, AuditEvent, TokenRecord, TokenStatus

# Each entry upgrades the schema by one version, in one transaction; the schema_version table records how far
# a database has come. Append new versions; never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE tokens (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            access_level TEXT NOT NULL,
            allowed_ip_ranges TEXT[] NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('enabled', 'disabled')),
            expires_at TIMESTAMPTZ,
            created_at TIMESTAMPTZ NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL,
            rotated_at TIMESTAMPTZ,
            last_used_at TIMESTAMPTZ,
            last_used_ip TEXT,
            secret_hash TEXT NOT NULL,
            previous_secret_hash TEXT,
            previous_secret_expires_at TIMESTAMPTZ,
            version BIGINT NOT NULL
        )""",
        "CREATE INDEX tokens_status ON tokens (status, seq)",
        """CREATE TABLE audit_events (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at TIMESTAMPTZ NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            token_id TEXT,
            details JSONB NOT NULL
        )""",
        "CREATE INDEX audit_events_token ON audit_events (token_id, seq)",
        """CREATE TABLE admin_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            key_hash TEXT NOT NULL
        )""",
        """CREATE TABLE token_changes (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            token_id TEXT NOT NULL
        )""",
    ),
    (
        # JSON objects as the admin API shows them; NULL is unlimited.
        "ALTER TABLE tokens ADD COLUMN rate_limit JSONB",
        "ALTER TABLE tokens ADD COLUMN quota JSONB",
    ),
    (
        """CREATE TABLE request_counts (
            token_id TEXT NOT NULL,
            bucket_start BIGINT NOT NULL,
            granularity TEXT NOT NULL CHECK (granularity IN ('hour', 'day')),
            outcome TEXT NOT NULL,
            count BIGINT NOT NULL,
            PRIMARY KEY (token_id, granularity, bucket_start, outcome)
        )""",
        "CREATE INDEX request_counts_age ON request_counts (granularity, bucket_start)",
        """CREATE TABLE previous_secret_uses (
            token_id TEXT NOT NULL,
            rotated_at TIMESTAMPTZ NOT NULL,
            uses BIGINT NOT NULL,
            last_used_at TIMESTAMPTZ NOT NULL,
            last_used_ip TEXT NOT NULL,
            PRIMARY KEY (token_id, rotated_at)
        )""",
        """CREATE TABLE token_addresses (
            token_id TEXT NOT NULL,
            address TEXT NOT NULL,
            uses BIGINT NOT NULL,
            last_used_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (token_id, address)
        )""",
    ),
    # Listing tokens unused since a date ("last_used_at IS NULL OR last_used_at < $1"): with few such tokens
    # among a million, a bitmap of this index's two ranges, instead of a walk through every row by seq.
    ("CREATE INDEX tokens_last_used ON tokens (last_used_at)",),
)

log = logging.getLogger(__name__)

# Each change's transaction notifies this channel with the token id; NOTIFY is delivered at commit, only.
CHANGES_CHANNEL = "gateway_token_changes"

# Advisory lock keys: any constants, the same in every gateway process. Migrations run under the first (for
# their transaction), outbox delivery to Redis under the second (for one delivery, by one process at a time).
MIGRATION_LOCK = 0x6761_7465_7761_7901
DELIVERY_LOCK = 0x6761_7465_7761_7902
MIGRATION_TIMEOUT = 3600.0  # seconds the client waits for one migration statement

_COLUMN_NAMES = (
    "id", "name", "access_level", "allowed_ip_ranges", "status", "expires_at", "created_at", "updated_at",
    "rotated_at", "last_used_at", "last_used_ip", "secret_hash", "previous_secret_hash",
    "previous_secret_expires_at", "version", "rate_limit", "quota",
)
_TOKEN_COLUMNS = ", ".join(_COLUMN_NAMES)
# What an admin change may write. Usage columns are written behind by the proxy, never from a stale read.
_CHANGEABLE_COLUMNS = tuple(c for c in _COLUMN_NAMES if c not in {"id", "created_at", "last_used_at", "last_used_ip"})
_CHANGE_ASSIGNMENTS = ", ".join(f"{column} = ${number}" for number, column in enumerate(_CHANGEABLE_COLUMNS, 2))

# What "the database did not answer" looks like from asyncpg: refused or reset sockets, timeouts, a server
# shutting down or starting up, a connection that broke mid-statement, a statement cancelled by its timeout.
# Each is turned into StoreUnavailable; the pool replaces a broken connection on a later acquire.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.QueryCanceledError,
    asyncpg.InternalClientError,  # a pooled connection whose socket died mid-operation can report this
)


def _token_row(record: TokenRecord) -> tuple[Any, ...]:
    return (
        record.id,
        record.name,
        record.access_level,
        list(record.allowed_ip_ranges),
        record.status.value,
        record.expires_at,
        record.created_at,
        record.updated_at,
        record.rotated_at,
        record.last_used_at,
        record.last_used_ip,
        record.secret_hash,
        record.previous_secret_hash,
        record.previous_secret_expires_at,
        record.version,
        None if record.rate_limit is None else json.dumps(record.rate_limit.view()),
        None if record.quota is None else json.dumps(record.quota.view()),
    )


def _json_column(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _token_from_row(row: asyncpg.Record) -> TokenRecord:
    return TokenRecord(
        id=row["id"],
        name=row["name"],
        access_level=row["access_level"],
        allowed_ip_ranges=tuple(row["allowed_ip_ranges"]),
        status=TokenStatus(row["status"]),
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        rotated_at=row["rotated_at"],
        last_used_at=row["last_used_at"],
        last_used_ip=row["last_used_ip"],
        secret_hash=row["secret_hash"],
        previous_secret_hash=row["previous_secret_hash"],
        previous_secret_expires_at=row["previous_secret_expires_at"],
        version=row["version"],
        rate_limit=rate_limit_from_json(_json_column(row["rate_limit"])),
        quota=quota_from_json(_json_column(row["quota"])),
    )


def _event_from_row(row: asyncpg.Record) -> AuditEvent:
    return AuditEvent(
        id=row["seq"],
        at=row["at"],
        actor=row["actor"],
        action=row["action"],
        token_id=row["token_id"],
        details=json.loads(row["details"]),
    )


class PostgresStore:
    """`url` is a libpq-style URL (postgresql:// or postgres://; sslmode as libpq reads it); `password`, when
    given, wins over one in the URL. Neither ever appears in a repr, a log line or an exception."""

    def __init__(
        self,
        url: Secret,
        *,
        password: Secret | None = None,
        record_changes: bool = False,
        migrate: bool = False,
        pool_size: int = 10,
        statement_timeout: float = 5.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self._url = url
        self._password = password
        self.record_changes = record_changes
        self.migrate_on_open = migrate
        self.pool_size = pool_size
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout
        self.reads = 0
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:
        return f"PostgresStore({redact_url(self._url.reveal())!r})"

    @property
    def where(self) -> str:
        """Host, port and database, for messages."""
        parts = urlsplit(self._url.reveal())
        return f"{parts.hostname}:{parts.port or 5432}{parts.path}"

    # --- lifecycle -------------------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                dsn=self._url.reveal(),
                password=self._password.reveal() if self._password is not None else None,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.connect_timeout,
                command_timeout=self.statement_timeout + 1.0,
                server_settings={
                    "statement_timeout": str(int(self.statement_timeout * 1000)),
                    "application_name": "api-token-gateway",
                },
            )
        except _UNAVAILABLE as error:
            raise StoreUnavailable(f"cannot reach PostgreSQL at {self.where}: {type(error).__name__}") from None
        except asyncpg.PostgresError as error:  # wrong password, no such database, ...
            raise StoreUnavailable(f"PostgreSQL at {self.where} refused the connection: {error}") from None
        try:
            if self.migrate_on_open:
                await self.migrate()
            else:
                await self._check_version()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await pool.close()
            except _UNAVAILABLE:
                pool.terminate()

    async def ping(self) -> None:
        async with self._connection() as connection:
            await connection.fetchval("SELECT 1")

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise RuntimeError("the store is not open")
        try:
            async with self._pool.acquire(timeout=self.connect_timeout) as connection:
                yield connection
        except _UNAVAILABLE as error:
            raise StoreUnavailable(f"PostgreSQL did not answer: {type(error).__name__}") from None

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """One transaction: committed if the block finishes, rolled back on any exception."""
        async with self._connection() as connection, connection.transaction():
            yield connection

    # --- schema ----------------------------------------------------------------------------------------

    async def _version(self, connection: asyncpg.Connection) -> int:
        exists = await connection.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
        if not exists:
            return 0
        return int(await connection.fetchval("SELECT version FROM schema_version"))

    def _too_new(self, version: int) -> SchemaTooNew:
        return SchemaTooNew(
            f"database {self.where} has schema version {version}, newer than this gateway knows"
            f" ({len(MIGRATIONS)}): upgrade the gateway"
        )

    async def _check_version(self) -> None:
        async with self._connection() as connection:
            version = await self._version(connection)
        if version > len(MIGRATIONS):
            raise self._too_new(version)
        if version < len(MIGRATIONS):
            raise SchemaOutdated(
                f"database {self.where} has schema version {version}, older than this gateway's"
                f" ({len(MIGRATIONS)}): run 'gateway migrate' (or start with --migrate)",
                found=version,
                newest=len(MIGRATIONS),
            )

    async def migrate(self) -> tuple[int, int]:
        """Under a transaction-scoped advisory lock: a second process waits, then finds the work done."""
        async with self._transaction() as connection:
            # A migration may rewrite a large table, and may wait for another process's: no statement timeout.
            await connection.execute("SET LOCAL statement_timeout = 0")
            await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK, timeout=MIGRATION_TIMEOUT)
            before = await self._version(connection)
            if before > len(MIGRATIONS):
                raise self._too_new(before)
            if before == 0:
                await connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                await connection.execute("INSERT INTO schema_version (version) VALUES (0)")
            for statements in MIGRATIONS[before:]:
                for statement in statements:
                    await connection.execute(statement, timeout=MIGRATION_TIMEOUT)
            await connection.execute("UPDATE schema_version SET version = $1", len(MIGRATIONS))
        return before, len(MIGRATIONS)

    # --- tokens ----------------------------------------------------------------------------------------

    async def insert_token(self, record: TokenRecord, event: AuditEvent) -> None:
        placeholders = ", ".join(f"${number}" for number in range(1, len(_COLUMN_NAMES) + 1))
        async with self._transaction() as connection:
            await connection.execute(
                f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES ({placeholders})", *_token_row(record)
            )
            await _insert_event(connection, event)
            await self._note_change(connection, record.id)

    async def get_token(self, token_id: str) -> TokenRecord | None:
        self.reads += 1
        async with self._connection() as connection:
            row = await connection.fetchrow(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = $1", token_id)
        return None if row is None else _token_from_row(row)

    async def list_tokens(
        self,
        *,
        status: TokenStatus | None = None,
        unused_since: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[TokenRecord], str | None]:
        clauses: list[str] = []
        parameters: list[Any] = []
        if cursor is not None:
            parameters.append(decode_cursor(cursor))
            clauses.append(f"seq < ${len(parameters)}")
        if status is not None:
            parameters.append(status.value)
            clauses.append(f"status = ${len(parameters)}")
        if unused_since is not None:
            parameters.append(unused_since)
            clauses.append(f"(last_used_at IS NULL OR last_used_at < ${len(parameters)})")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        parameters.append(limit + 1)
        async with self._connection() as connection:
            rows = await connection.fetch(
                f"SELECT seq, {_TOKEN_COLUMNS} FROM tokens {where} ORDER BY seq DESC LIMIT ${len(parameters)}",
                *parameters,
            )
        next_cursor = encode_cursor(rows[limit - 1]["seq"]) if len(rows) > limit else None
        return [_token_from_row(row) for row in rows[:limit]], next_cursor

    async def change_token(self, token_id: str, change: TokenChange) -> TokenRecord:
        async with self._transaction() as connection:
            row = await connection.fetchrow(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = $1 FOR UPDATE", token_id
            )
            if row is None:
                raise TokenNotFound(token_id)
            changed, event = change(_token_from_row(row))
            values = dict(zip(_COLUMN_NAMES, _token_row(changed), strict=True))
            await connection.execute(
                f"UPDATE tokens SET {_CHANGE_ASSIGNMENTS} WHERE id = $1",
                token_id,
                *(values[column] for column in _CHANGEABLE_COLUMNS),
            )
            await _insert_event(connection, event)
            await self._note_change(connection, token_id)
        return changed

    async def delete_token(self, token_id: str, event: AuditEvent) -> None:
        async with self._transaction() as connection:
            if await connection.fetchval("DELETE FROM tokens WHERE id = $1 RETURNING 1", token_id) is None:
                raise TokenNotFound(token_id)
            await _insert_event(connection, event)
            await self._note_change(connection, token_id)

    async def record_usage(self, usage: Mapping[str, tuple[datetime, str]]) -> None:
        if not usage:
            return
        rows = [(at, ip, token_id) for token_id, (at, ip) in sorted(usage.items())]  # one lock order
        async with self._transaction() as connection:
            await connection.executemany(
                "UPDATE tokens SET last_used_at = $1, last_used_ip = $2"
                " WHERE id = $3 AND (last_used_at IS NULL OR last_used_at < $1)",
                rows,
            )

    async def record_counts(self, counts: Counts, *, now: float) -> None:
        if not counts:
            return
        rows = sorted(  # one lock order for every writer
            (token_id, bucket, granularity.value, outcome.value, count)
            for (token_id, granularity, bucket, outcome), count in counts.items()
        )
        async with self._transaction() as connection:
            await connection.executemany(
                "INSERT INTO request_counts (token_id, bucket_start, granularity, outcome, count)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (token_id, granularity, bucket_start, outcome)"
                " DO UPDATE SET count = request_counts.count + excluded.count",
                rows,
            )
            for granularity in Granularity:
                await connection.execute(
                    "DELETE FROM request_counts WHERE granularity = $1 AND bucket_start < $2",
                    granularity.value,
                    int(now) - granularity.kept,
                )

    async def read_counts(self, token_id: str, granularity: Granularity, since: int) -> dict[tuple[int, Outcome], int]:
        async with self._connection() as connection:
            rows = await connection.fetch(
                "SELECT bucket_start, outcome, count FROM request_counts"
                " WHERE token_id = $1 AND granularity = $2 AND bucket_start >= $3",
                token_id,
                granularity.value,
                since,
            )
        counts: dict[tuple[int, Outcome], int] = {}
        for row in rows:
            outcome = parse_outcome(row["outcome"])
            if outcome is not None:
                counts[row["bucket_start"], outcome] = row["count"]
        return counts

    async def requests_since(self, token_ids: Sequence[str], since: int) -> dict[str, int]:
        if not token_ids:
            return {}
        async with self._connection() as connection:
            rows = await connection.fetch(
                "SELECT token_id, SUM(count) AS total FROM request_counts WHERE granularity = 'hour'"
                " AND bucket_start >= $1 AND token_id = ANY($2::text[]) GROUP BY token_id",
                since,
                list(token_ids),
            )
        return {**dict.fromkeys(token_ids, 0), **sum_by_token((row["token_id"], int(row["total"])) for row in rows)}

    async def record_previous_uses(self, uses: PreviousUses) -> None:
        if not uses:
            return
        async with self._transaction() as connection:
            for (token_id, rotated_at), (count, at, ip) in sorted(uses.items()):
                await connection.execute(
                    "DELETE FROM previous_secret_uses WHERE token_id = $1 AND rotated_at <> $2", token_id, rotated_at
                )
                await connection.execute(
                    "INSERT INTO previous_secret_uses (token_id, rotated_at, uses, last_used_at, last_used_ip)"
                    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (token_id, rotated_at) DO UPDATE SET"
                    " uses = previous_secret_uses.uses + excluded.uses,"
                    " last_used_ip = CASE WHEN excluded.last_used_at > previous_secret_uses.last_used_at"
                    " THEN excluded.last_used_ip ELSE previous_secret_uses.last_used_ip END,"
                    " last_used_at = GREATEST(previous_secret_uses.last_used_at, excluded.last_used_at)",
                    token_id,
                    rotated_at,
                    count,
                    at,
                    ip,
                )

    async def previous_secret_use(self, token_id: str, rotated_at: datetime) -> tuple[int, datetime, str] | None:
        async with self._connection() as connection:
            row = await connection.fetchrow(
                "SELECT uses, last_used_at, last_used_ip FROM previous_secret_uses WHERE token_id = $1 AND rotated_at = $2",
                token_id,
                rotated_at,
            )
        return None if row is None else (int(row["uses"]), row["last_used_at"], row["last_used_ip"])

    async def record_addresses(self, uses: AddressUses) -> None:
        if not uses:
            return
        rows = sorted((token_id, address, count, at) for (token_id, address), (count, at) in uses.items())
        async with self._transaction() as connection:
            await connection.executemany(
                "INSERT INTO token_addresses (token_id, address, uses, last_used_at) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (token_id, address) DO UPDATE SET uses = token_addresses.uses + excluded.uses,"
                " last_used_at = GREATEST(token_addresses.last_used_at, excluded.last_used_at)",
                rows,
            )
            await connection.executemany(
                "DELETE FROM token_addresses WHERE token_id = $1 AND address NOT IN (SELECT address FROM"
                " token_addresses WHERE token_id = $1 ORDER BY last_used_at DESC, address LIMIT $2)",
                [(token_id, RECENT_ADDRESSES) for token_id in sorted({row[0] for row in rows})],
            )

    async def recent_addresses(self, token_id: str) -> list[tuple[str, int, datetime]]:
        async with self._connection() as connection:
            rows = await connection.fetch(
                "SELECT address, uses, last_used_at FROM token_addresses WHERE token_id = $1"
                " ORDER BY last_used_at DESC, address LIMIT $2",
                token_id,
                RECENT_ADDRESSES,
            )
        return [(row["address"], int(row["uses"]), row["last_used_at"]) for row in rows]

    async def _note_change(self, connection: asyncpg.Connection, token_id: str) -> None:
        await connection.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, token_id)
        if self.record_changes:
            await connection.execute("INSERT INTO token_changes (token_id) VALUES ($1)", token_id)

    @asynccontextmanager
    async def delivery_turn(self, *, wait: bool) -> AsyncIterator[bool]:
        """Whether this process may deliver the outbox now: one process at a time, under an advisory lock on
        one pooled connection (the pool's reset on release unlocks it even if the unlock never ran)."""
        async with self._connection() as connection:
            if wait:
                await connection.execute("SELECT pg_advisory_lock($1)", DELIVERY_LOCK)
                mine = True
            else:
                mine = bool(await connection.fetchval("SELECT pg_try_advisory_lock($1)", DELIVERY_LOCK))
            try:
                yield mine
            finally:
                if mine:
                    await connection.execute("SELECT pg_advisory_unlock($1)", DELIVERY_LOCK)

    async def listen(self, changed: Callable[[str], None], connected: Callable[[], None]) -> None:
        backoff = 0.05
        announced_loss = False
        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection = await asyncpg.connect(
                    dsn=self._url.reveal(),
                    password=self._password.reveal() if self._password is not None else None,
                    timeout=self.connect_timeout,
                    server_settings={"application_name": "api-token-gateway-listener"},
                )
                lost = asyncio.Event()
                connection.add_termination_listener(lambda _connection: lost.set())
                await connection.add_listener(
                    CHANGES_CHANNEL, lambda _connection, _pid, _channel, payload: changed(payload)
                )
                connected()
                backoff, announced_loss = 0.05, False
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), timeout=1.0)
                    if not lost.is_set():  # a peer gone without a FIN shows itself here, within a second
                        await connection.fetchval("SELECT 1", timeout=self.connect_timeout)
                raise ConnectionResetError("the listening connection closed")
            except Exception as error:  # whatever broke the connection, the listener must live on
                raise_if_cancelling()
                if not announced_loss:
                    log.warning("store change notifications lost (%s); reconnecting", type(error).__name__)
                    announced_loss = True
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
            finally:
                if connection is not None and not connection.is_closed():
                    connection.terminate()

    async def pending_changes(self, limit: int = 1000) -> list[tuple[int, str]]:
        async with self._connection() as connection:
            rows = await connection.fetch("SELECT seq, token_id FROM token_changes ORDER BY seq LIMIT $1", limit)
        return [(row["seq"], row["token_id"]) for row in rows]

    async def acknowledge_changes(self, up_to_seq: int) -> None:
        async with self._connection() as connection:
            await connection.execute("DELETE FROM token_changes WHERE seq <= $1", up_to_seq)

    # --- audit -----------------------------------------------------------------------------------------

    async def append_audit(self, event: AuditEvent) -> None:
        async with self._connection() as connection:
            await _insert_event(connection, event)

    async def list_audit(
        self, *, token_id: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[AuditEvent], str | None]:
        clauses: list[str] = []
        parameters: list[Any] = []
        if cursor is not None:
            parameters.append(decode_cursor(cursor))
            clauses.append(f"seq < ${len(parameters)}")
        if token_id is not None:
            parameters.append(token_id)
            clauses.append(f"token_id = ${len(parameters)}")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        parameters.append(limit + 1)
        async with self._connection() as connection:
            rows = await connection.fetch(
                f"SELECT * FROM audit_events {where} ORDER BY seq DESC LIMIT ${len(parameters)}", *parameters
            )
        next_cursor = encode_cursor(rows[limit - 1]["seq"]) if len(rows) > limit else None
        return [_event_from_row(row) for row in rows[:limit]], next_cursor

    # --- admin keys ------------------------------------------------------------------------------------

    async def list_admin_keys(self) -> list[AdminKeyRecord]:
        async with self._connection() as connection:
            rows = await connection.fetch("SELECT * FROM admin_keys ORDER BY created_at, id")
        return [
            AdminKeyRecord(
                id=row["id"], name=row["name"], role=row["role"], created_at=row["created_at"], key_hash=row["key_hash"]
            )
            for row in rows
        ]

    async def put_admin_key(self, record: AdminKeyRecord, event: AuditEvent | None = None) -> None:
        async with self._transaction() as connection:
            await connection.execute(
                "INSERT INTO admin_keys (id, name, role, created_at, key_hash) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (id) DO UPDATE SET name = excluded.name, role = excluded.role,"
                " key_hash = excluded.key_hash",
                record.id, record.name, record.role, record.created_at, record.key_hash,
            )
            if event is not None:
                await _insert_event(connection, event)

    async def delete_admin_key(self, key_id: str, event: AuditEvent) -> None:
        async with self._transaction() as connection:
            # Lock every admin key row: two deletions of the last two admin keys must not both succeed.
            rows = await connection.fetch("SELECT id, role FROM admin_keys WHERE role = 'admin' OR id = $1 FOR UPDATE", key_id)
            roles = {row["id"]: row["role"] for row in rows}
            if key_id not in roles:
                raise AdminKeyNotFound(key_id)
            if roles[key_id] == "admin" and sum(role == "admin" for role in roles.values()) == 1:
                raise LastAdminKey(key_id)
            await connection.execute("DELETE FROM admin_keys WHERE id = $1", key_id)
            await _insert_event(connection, event)


async def _insert_event(connection: asyncpg.Connection, event: AuditEvent) -> None:
    await connection.execute(
        "INSERT INTO audit_events (at, actor, action, token_id, details) VALUES ($1, $2, $3, $4, $5::jsonb)",
        event.at, event.actor, event.action, event.token_id, json.dumps(event.details),
    )
