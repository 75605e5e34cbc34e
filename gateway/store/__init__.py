"""The store of record. `base` holds the async interface; one module per backend."""

from gateway.store.base import (
    AdminKeyNotFound,
    InvalidCursor,
    LastAdminKey,
    SchemaError,
    SchemaOutdated,
    SchemaTooNew,
    StoreUnavailable,
    TokenNotFound,
    TokenStore,
)
from gateway.store.sqlite import SQLiteStore

__all__ = [
    "AdminKeyNotFound",
    "InvalidCursor",
    "LastAdminKey",
    "SQLiteStore",
    "SchemaError",
    "SchemaOutdated",
    "SchemaTooNew",
    "StoreUnavailable",
    "TokenNotFound",
    "TokenStore",
]
