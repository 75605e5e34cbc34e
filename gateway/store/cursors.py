"""Page cursors: opaque to clients, a row's sequence number inside, checked on the way back in."""

from __future__ import annotations

import base64

from gateway.store.base import InvalidCursor


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        digits = text[1:]
        if not text.startswith("s") or not (digits.isascii() and digits.isdigit()) or int(digits) >= 2**63:
            raise ValueError
        return int(digits)
    except ValueError:
        raise InvalidCursor("is not a cursor this API returned") from None
