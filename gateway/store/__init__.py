"""The store of record. `base` holds the async interface; one module per backend."""

from gateway.store.base import InvalidCursor, TokenNotFound, TokenStore
from gateway.store.sqlite import SQLiteStore

__all__ = ["InvalidCursor", "SQLiteStore", "TokenNotFound", "TokenStore"]
