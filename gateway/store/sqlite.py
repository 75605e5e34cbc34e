"""The embedded store: one SQLite file in WAL mode, driven from a single dedicated thread.

SQLite serialises writers anyway; one thread keeps every statement off the event loop, needs no extra
dependency, and makes each read-modify-write naturally atomic.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from gateway.store.base import (
    AdminKeyNotFound,
    LastAdminKey,
    SchemaOutdated,
    SchemaTooNew,
    StoreUnavailable,
    TokenChange,
    TokenNotFound,
)
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
from gateway.store.cursors import decode_cursor, encode_cursor
from gateway.tokens import (
    AdminKeyRecord,
    AuditEvent,
    TokenRecord,
    TokenStatus,
    format_time,
    parse_stored_time,
    record_from_json,
)

T = TypeVar("T")

# Each entry upgrades the schema by one version, statement by statement (all in one transaction); PRAGMA
# user_version records how far a file has come. Append new versions; never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE tokens (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            access_level TEXT NOT NULL,
            allowed_ip_ranges TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('enabled', 'disabled')),
            expires_at TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            rotated_at TEXT,
            last_used_at TEXT,
            last_used_ip TEXT,
            secret_hash TEXT NOT NULL,
            previous_secret_hash TEXT,
            previous_secret_expires_at TEXT,
            version INTEGER NOT NULL
        )""",
        "CREATE INDEX tokens_status ON tokens (status, seq)",
        """CREATE TABLE audit_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            token_id TEXT,
            details TEXT NOT NULL
        )""",
        "CREATE INDEX audit_events_token ON audit_events (token_id, seq)",
        """CREATE TABLE admin_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            created_at TEXT NOT NULL,
            key_hash TEXT NOT NULL
        )""",
    ),
    (
        """CREATE TABLE token_changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            token_id TEXT NOT NULL
        )""",
    ),
    (
        # JSON objects as the admin API shows them ({"requests": 100, "per_seconds": 60, "burst": null},
        # {"requests": 1000, "period": "day"}); NULL is unlimited.
        "ALTER TABLE tokens ADD COLUMN rate_limit TEXT",
        "ALTER TABLE tokens ADD COLUMN quota TEXT",
    ),
    (
        """CREATE TABLE request_counts (
            token_id TEXT NOT NULL,
            bucket_start INTEGER NOT NULL,
            granularity TEXT NOT NULL CHECK (granularity IN ('hour', 'day')),
            outcome TEXT NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (token_id, granularity, bucket_start, outcome)
        )""",
        "CREATE INDEX request_counts_age ON request_counts (granularity, bucket_start)",
        """CREATE TABLE previous_secret_uses (
            token_id TEXT NOT NULL,
            rotated_at TEXT NOT NULL,
            uses INTEGER NOT NULL,
            last_used_at TEXT NOT NULL,
            last_used_ip TEXT NOT NULL,
            PRIMARY KEY (token_id, rotated_at)
        )""",
        """CREATE TABLE token_addresses (
            token_id TEXT NOT NULL,
            address TEXT NOT NULL,
            uses INTEGER NOT NULL,
            last_used_at TEXT NOT NULL,
            PRIMARY KEY (token_id, address)
        )""",
    ),
)

_COLUMN_NAMES = (
    "id", "name", "access_level", "allowed_ip_ranges", "status", "expires_at", "created_at", "updated_at",
    "rotated_at", "last_used_at", "last_used_ip", "secret_hash", "previous_secret_hash",
    "previous_secret_expires_at", "version", "rate_limit", "quota",
)
_TOKEN_COLUMNS = ", ".join(_COLUMN_NAMES)
# What an admin change may write. Usage columns are written behind by the proxy, never from a stale read.
_CHANGEABLE_COLUMNS = tuple(c for c in _COLUMN_NAMES if c not in {"id", "created_at", "last_used_at", "last_used_ip"})
_CHANGE_ASSIGNMENTS = ", ".join(f"{column} = ?" for column in _CHANGEABLE_COLUMNS)


def _token_values(record: TokenRecord) -> dict[str, Any]:
    return dict(zip(_COLUMN_NAMES, _token_row(record), strict=True))


def _token_row(record: TokenRecord) -> tuple[Any, ...]:
    return (
        record.id,
        record.name,
        record.access_level,
        json.dumps(list(record.allowed_ip_ranges)),
        record.status.value,
        format_time(record.expires_at),
        format_time(record.created_at),
        format_time(record.updated_at),
        format_time(record.rotated_at),
        format_time(record.last_used_at),
        record.last_used_ip,
        record.secret_hash,
        record.previous_secret_hash,
        format_time(record.previous_secret_expires_at),
        record.version,
        None if record.rate_limit is None else json.dumps(record.rate_limit.view()),
        None if record.quota is None else json.dumps(record.quota.view()),
    )


def _json_column(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _token_from_row(row: sqlite3.Row) -> TokenRecord:
    """A row holds the record's JSON form, with its ranges and limits as JSON text columns."""
    return record_from_json(
        {
            **dict(row),
            "allowed_ip_ranges": json.loads(row["allowed_ip_ranges"]),
            "rate_limit": _json_column(row["rate_limit"]),
            "quota": _json_column(row["quota"]),
        }
    )


def _event_from_row(row: sqlite3.Row) -> AuditEvent:
    return AuditEvent(
        id=row["seq"],
        at=parse_stored_time(row["at"]),  # type: ignore[arg-type]
        actor=row["actor"],
        action=row["action"],
        token_id=row["token_id"],
        details=json.loads(row["details"]),
    )


class SQLiteStore:
    """`record_changes` keeps an outbox of changed token ids, written in each change's transaction, that the
    admin process delivers to Redis: a change committed while Redis was down is still delivered later.

    The embedded store upgrades its own schema on open (`migrate=True`): the file belongs to this host, and the
    quick start stays one command. Processes opening one file together serialise on BEGIN IMMEDIATE."""

    def __init__(self, path: str | Path, *, record_changes: bool = False, migrate: bool = True) -> None:
        self.path = Path(path)
        self.record_changes = record_changes
        self.migrate_on_open = migrate
        self.reads = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._connection: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    async def _run(self, function: Callable[[sqlite3.Connection], T]) -> T:
        connection = self._connection
        if connection is None:
            raise RuntimeError("the store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, function, connection)
        except sqlite3.OperationalError as error:  # locked, I/O error, unable to open
            raise StoreUnavailable(str(error)) from error
        except sqlite3.DatabaseError as error:
            if type(error) is not sqlite3.DatabaseError:  # integrity, programming errors: bugs, not outages
                raise
            raise StoreUnavailable(str(error)) from error  # "file is not a database", "malformed"

    # --- lifecycle -------------------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._connection = await loop.run_in_executor(self._executor, self._open_blocking)

    def _open_blocking(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA busy_timeout=10000")
        try:
            if self.migrate_on_open:
                self._migrate_blocking(connection)
            else:
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                self._check_version(version)
                if version < len(MIGRATIONS):
                    raise SchemaOutdated(
                        f"database {str(self.path)!r} has schema version {version}, older than this gateway's"
                        f" ({len(MIGRATIONS)}): run 'gateway migrate'",
                        found=version,
                        newest=len(MIGRATIONS),
                    )
        except BaseException:
            connection.close()
            raise
        return connection

    def _check_version(self, version: int) -> None:
        if version > len(MIGRATIONS):
            raise SchemaTooNew(
                f"database {str(self.path)!r} has schema version {version}, newer than this gateway knows"
                f" ({len(MIGRATIONS)}): upgrade the gateway"
            )

    def _migrate_blocking(self, connection: sqlite3.Connection) -> tuple[int, int]:
        """Read the version and upgrade inside one write transaction: a second process waits, then finds
        the work done."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            before = connection.execute("PRAGMA user_version").fetchone()[0]
            self._check_version(before)
            for statements in MIGRATIONS[before:]:
                for statement in statements:
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return before, len(MIGRATIONS)

    async def migrate(self) -> tuple[int, int]:
        return await self._run(self._migrate_blocking)

    async def close(self) -> None:
        if self._connection is not None:
            await self._run(lambda connection: connection.close())
            self._connection = None
        self._executor.shutdown(wait=True)

    async def ping(self) -> None:
        # The schema version is read from the file itself: "SELECT 1" answers even when the file is gone bad.
        await self._run(lambda connection: connection.execute("PRAGMA schema_version").fetchone())

    # --- tokens ----------------------------------------------------------------------------------------

    async def insert_token(self, record: TokenRecord, event: AuditEvent) -> None:
        def insert(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                connection.execute(
                    f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES ({', '.join('?' * len(_COLUMN_NAMES))})",
                    _token_row(record),
                )
                _insert_event(connection, event)
                self._note_change(connection, record.id)

        await self._run(insert)

    async def get_token(self, token_id: str) -> TokenRecord | None:
        self.reads += 1

        def get(connection: sqlite3.Connection) -> TokenRecord | None:
            row = connection.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = ?", (token_id,)
            ).fetchone()
            return None if row is None else _token_from_row(row)

        return await self._run(get)

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
            clauses.append("seq < ?")
            parameters.append(decode_cursor(cursor))
        if status is not None:
            clauses.append("status = ?")
            parameters.append(status.value)
        if unused_since is not None:
            clauses.append("(last_used_at IS NULL OR last_used_at < ?)")
            parameters.append(format_time(unused_since))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        parameters.append(limit + 1)

        def query(connection: sqlite3.Connection) -> list[sqlite3.Row]:
            return connection.execute(
                f"SELECT seq, {_TOKEN_COLUMNS} FROM tokens {where} ORDER BY seq DESC LIMIT ?", parameters
            ).fetchall()

        rows = await self._run(query)
        next_cursor = encode_cursor(rows[limit - 1]["seq"]) if len(rows) > limit else None
        return [_token_from_row(row) for row in rows[:limit]], next_cursor

    async def change_token(self, token_id: str, change: TokenChange) -> TokenRecord:
        def apply(connection: sqlite3.Connection) -> TokenRecord:
            with _transaction(connection):
                row = connection.execute(
                    f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = ?", (token_id,)
                ).fetchone()
                if row is None:
                    raise TokenNotFound(token_id)
                current = _token_from_row(row)
                changed, event = change(current)
                values = _token_values(changed)
                connection.execute(
                    f"UPDATE tokens SET {_CHANGE_ASSIGNMENTS} WHERE id = ?",
                    (*(values[column] for column in _CHANGEABLE_COLUMNS), token_id),
                )
                _insert_event(connection, event)
                self._note_change(connection, token_id)
                return changed

        return await self._run(apply)

    async def delete_token(self, token_id: str, event: AuditEvent) -> None:
        def delete(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                if connection.execute("DELETE FROM tokens WHERE id = ?", (token_id,)).rowcount == 0:
                    raise TokenNotFound(token_id)
                _insert_event(connection, event)
                self._note_change(connection, token_id)

        await self._run(delete)

    async def record_usage(self, usage: Mapping[str, tuple[datetime, str]]) -> None:
        rows = [(format_time(at), ip, token_id, format_time(at)) for token_id, (at, ip) in usage.items()]

        def write(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                connection.executemany(
                    "UPDATE tokens SET last_used_at = ?, last_used_ip = ?"
                    " WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)",
                    rows,
                )

        if rows:
            await self._run(write)

    async def record_counts(self, counts: Counts, *, now: float) -> None:
        rows = [
            (token_id, bucket, granularity.value, outcome.value, count)
            for (token_id, granularity, bucket, outcome), count in counts.items()
        ]

        def write(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                connection.executemany(
                    "INSERT INTO request_counts (token_id, bucket_start, granularity, outcome, count)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (token_id, granularity, bucket_start, outcome)"
                    " DO UPDATE SET count = count + excluded.count",
                    rows,
                )
                for granularity in Granularity:
                    connection.execute(
                        "DELETE FROM request_counts WHERE granularity = ? AND bucket_start < ?",
                        (granularity.value, int(now) - granularity.kept),
                    )

        if rows:
            await self._run(write)

    async def read_counts(self, token_id: str, granularity: Granularity, since: int) -> dict[tuple[int, Outcome], int]:
        def query(connection: sqlite3.Connection) -> list[sqlite3.Row]:
            return connection.execute(
                "SELECT bucket_start, outcome, count FROM request_counts"
                " WHERE token_id = ? AND granularity = ? AND bucket_start >= ?",
                (token_id, granularity.value, since),
            ).fetchall()

        counts: dict[tuple[int, Outcome], int] = {}
        for row in await self._run(query):
            outcome = parse_outcome(row["outcome"])
            if outcome is not None:
                counts[row["bucket_start"], outcome] = row["count"]
        return counts

    async def requests_since(self, token_ids: Sequence[str], since: int) -> dict[str, int]:
        if not token_ids:
            return {}
        marks = ", ".join("?" * len(token_ids))

        def query(connection: sqlite3.Connection) -> list[tuple[str, int]]:
            return [
                (row[0], row[1])
                for row in connection.execute(
                    "SELECT token_id, SUM(count) FROM request_counts WHERE granularity = 'hour'"
                    f" AND bucket_start >= ? AND token_id IN ({marks}) GROUP BY token_id",
                    (since, *token_ids),
                )
            ]

        return {**dict.fromkeys(token_ids, 0), **sum_by_token(await self._run(query))}

    async def record_previous_uses(self, uses: PreviousUses) -> None:
        rows = [
            (token_id, format_time(rotated_at), count, format_time(at), ip)
            for (token_id, rotated_at), (count, at, ip) in uses.items()
        ]

        def write(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                for token_id, rotated_at, count, at, ip in rows:
                    # One row per token: the uses of an earlier rotation's secret are of no more interest.
                    connection.execute(
                        "DELETE FROM previous_secret_uses WHERE token_id = ? AND rotated_at <> ?", (token_id, rotated_at)
                    )
                    connection.execute(
                        "INSERT INTO previous_secret_uses (token_id, rotated_at, uses, last_used_at, last_used_ip)"
                        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (token_id, rotated_at) DO UPDATE SET"
                        " uses = uses + excluded.uses,"
                        " last_used_ip = CASE WHEN excluded.last_used_at > last_used_at THEN excluded.last_used_ip"
                        " ELSE last_used_ip END,"
                        " last_used_at = MAX(last_used_at, excluded.last_used_at)",
                        (token_id, rotated_at, count, at, ip),
                    )

        if rows:
            await self._run(write)

    async def previous_secret_use(self, token_id: str, rotated_at: datetime) -> tuple[int, datetime, str] | None:
        def query(connection: sqlite3.Connection) -> sqlite3.Row | None:
            row: sqlite3.Row | None = connection.execute(
                "SELECT uses, last_used_at, last_used_ip FROM previous_secret_uses WHERE token_id = ? AND rotated_at = ?",
                (token_id, format_time(rotated_at)),
            ).fetchone()
            return row

        row = await self._run(query)
        if row is None:
            return None
        at = parse_stored_time(row["last_used_at"])
        assert at is not None
        return row["uses"], at, row["last_used_ip"]

    async def record_addresses(self, uses: AddressUses) -> None:
        rows = [(token_id, address, count, format_time(at)) for (token_id, address), (count, at) in uses.items()]

        def write(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                connection.executemany(
                    "INSERT INTO token_addresses (token_id, address, uses, last_used_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (token_id, address) DO UPDATE SET uses = uses + excluded.uses,"
                    " last_used_at = MAX(last_used_at, excluded.last_used_at)",
                    rows,
                )
                connection.executemany(
                    "DELETE FROM token_addresses WHERE token_id = ? AND address NOT IN (SELECT address FROM"
                    " token_addresses WHERE token_id = ? ORDER BY last_used_at DESC, address LIMIT ?)",
                    [(token_id, token_id, RECENT_ADDRESSES) for token_id in {row[0] for row in rows}],
                )

        if rows:
            await self._run(write)

    async def recent_addresses(self, token_id: str) -> list[tuple[str, int, datetime]]:
        def query(connection: sqlite3.Connection) -> list[sqlite3.Row]:
            return connection.execute(
                "SELECT address, uses, last_used_at FROM token_addresses WHERE token_id = ?"
                " ORDER BY last_used_at DESC, address LIMIT ?",
                (token_id, RECENT_ADDRESSES),
            ).fetchall()

        found = []
        for row in await self._run(query):
            at = parse_stored_time(row["last_used_at"])
            assert at is not None
            found.append((row["address"], row["uses"], at))
        return found

    def _note_change(self, connection: sqlite3.Connection, token_id: str) -> None:
        if self.record_changes:
            connection.execute("INSERT INTO token_changes (token_id) VALUES (?)", (token_id,))

    async def pending_changes(self, limit: int = 1000) -> list[tuple[int, str]]:
        def query(connection: sqlite3.Connection) -> list[tuple[int, str]]:
            rows = connection.execute(
                "SELECT seq, token_id FROM token_changes ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
            return [(row["seq"], row["token_id"]) for row in rows]

        return await self._run(query)

    async def acknowledge_changes(self, up_to_seq: int) -> None:
        await self._run(lambda connection: connection.execute("DELETE FROM token_changes WHERE seq <= ?", (up_to_seq,)))

    # --- audit -----------------------------------------------------------------------------------------

    async def append_audit(self, event: AuditEvent) -> None:
        def append(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                _insert_event(connection, event)

        await self._run(append)

    async def list_audit(
        self, *, token_id: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[AuditEvent], str | None]:
        clauses: list[str] = []
        parameters: list[Any] = []
        if cursor is not None:
            clauses.append("seq < ?")
            parameters.append(decode_cursor(cursor))
        if token_id is not None:
            clauses.append("token_id = ?")
            parameters.append(token_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        parameters.append(limit + 1)

        def query(connection: sqlite3.Connection) -> list[sqlite3.Row]:
            return connection.execute(
                f"SELECT * FROM audit_events {where} ORDER BY seq DESC LIMIT ?", parameters
            ).fetchall()

        rows = await self._run(query)
        next_cursor = encode_cursor(rows[limit - 1]["seq"]) if len(rows) > limit else None
        return [_event_from_row(row) for row in rows[:limit]], next_cursor

    # --- admin keys ------------------------------------------------------------------------------------

    async def list_admin_keys(self) -> list[AdminKeyRecord]:
        def query(connection: sqlite3.Connection) -> list[AdminKeyRecord]:
            rows = connection.execute("SELECT * FROM admin_keys ORDER BY created_at").fetchall()
            return [
                AdminKeyRecord(
                    id=row["id"],
                    name=row["name"],
                    role=row["role"],
                    created_at=parse_stored_time(row["created_at"]),  # type: ignore[arg-type]
                    key_hash=row["key_hash"],
                )
                for row in rows
            ]

        return await self._run(query)

    async def put_admin_key(self, record: AdminKeyRecord, event: AuditEvent | None = None) -> None:
        def put(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                connection.execute(
                    "INSERT INTO admin_keys (id, name, role, created_at, key_hash) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET name = excluded.name, role = excluded.role,"
                    " key_hash = excluded.key_hash",
                    (record.id, record.name, record.role, format_time(record.created_at), record.key_hash),
                )
                if event is not None:
                    _insert_event(connection, event)

        await self._run(put)

    async def delete_admin_key(self, key_id: str, event: AuditEvent) -> None:
        def delete(connection: sqlite3.Connection) -> None:
            with _transaction(connection):
                row = connection.execute("SELECT role FROM admin_keys WHERE id = ?", (key_id,)).fetchone()
                if row is None:
                    raise AdminKeyNotFound(key_id)
                if row["role"] == "admin":
                    others = connection.execute(
                        "SELECT COUNT(*) FROM admin_keys WHERE role = 'admin' AND id != ?", (key_id,)
                    ).fetchone()[0]
                    if others == 0:
                        raise LastAdminKey(key_id)
                connection.execute("DELETE FROM admin_keys WHERE id = ?", (key_id,))
                _insert_event(connection, event)

        await self._run(delete)


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception: nothing is ever half-written."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __enter__(self) -> None:
        self._connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        self._connection.execute("COMMIT" if kind is None else "ROLLBACK")


def _insert_event(connection: sqlite3.Connection, event: AuditEvent) -> None:
    connection.execute(
        "INSERT INTO audit_events (at, actor, action, token_id, details) VALUES (?, ?, ?, ?, ?)",
        (format_time(event.at), event.actor, event.action, event.token_id, json.dumps(event.details)),
    )
