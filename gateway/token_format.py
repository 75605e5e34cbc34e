"""The token string handed to integrations: `<prefix>_<id>_<secret>`, with an offline-checkable checksum.

The secret is 43 base62 characters of randomness (256 bits) followed by a 6-character checksum: the CRC32 of
everything before it (`<prefix>_<id>_<random part>`), in base62, most significant digit first, zero-padded.
Secret scanners can tell a real token from a look-alike without asking us, and the gateway can turn away a
mistyped or forged string without touching the store.
"""

from __future__ import annotations

import re
import secrets
import zlib
from dataclasses import dataclass, field

BASE62_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_LENGTH = 43  # 62**43 > 2**256
CHECKSUM_LENGTH = 6
SECRET_LENGTH = RANDOM_LENGTH + CHECKSUM_LENGTH
ID_LENGTH = 16  # ~95 bits: ids are public, this only makes collisions and guessing pointless

PREFIX_PATTERN = re.compile(r"[a-z][a-z0-9]{0,15}")
ID_PATTERN = re.compile(f"[0-9A-Za-z]{{{ID_LENGTH}}}")
_SECRET_PATTERN = re.compile(f"[0-9A-Za-z]{{{SECRET_LENGTH}}}")


def to_base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, digit = divmod(number, 62)
        digits.append(BASE62_ALPHABET[digit])
    return "".join(reversed(digits)).rjust(width, "0")


def random_base62(length: int) -> str:
    return "".join(secrets.choice(BASE62_ALPHABET) for _ in range(length))


def checksum(text: str) -> str:
    return to_base62(zlib.crc32(text.encode()), CHECKSUM_LENGTH)


def new_token_id() -> str:
    return random_base62(ID_LENGTH)


@dataclass(frozen=True, slots=True)
class TokenString:
    """A parsed token string. `repr` never shows the secret."""

    prefix: str
    token_id: str
    secret: str = field(repr=False)

    def __str__(self) -> str:
        return f"{self.prefix}_{self.token_id}_{self.secret}"


def issue_token(prefix: str, token_id: str) -> TokenString:
    """A fresh secret for `token_id`, checksum included."""
    random_part = random_base62(RANDOM_LENGTH)
    return TokenString(prefix, token_id, random_part + checksum(f"{prefix}_{token_id}_{random_part}"))


def split_token(text: str, prefix: str) -> TokenString | None:
    """The parts of `text` when it has the shape of a token of ours; the checksum is NOT checked.

    For a caller that recognises the exact string by other means (authenticator.py's memo); anything else
    wants `parse_token`.
    """
    if len(text) != len(prefix) + ID_LENGTH + SECRET_LENGTH + 2:
        return None
    head, sep, rest = text.partition("_")
    if head != prefix or not sep:
        return None
    token_id, sep, secret = rest.partition("_")
    if not sep or not ID_PATTERN.fullmatch(token_id) or not _SECRET_PATTERN.fullmatch(secret):
        return None
    return TokenString(prefix, token_id, secret)


def checksum_matches(token: TokenString) -> bool:
    random_part = token.secret[:-CHECKSUM_LENGTH]
    expected = checksum(f"{token.prefix}_{token.token_id}_{random_part}")
    return secrets.compare_digest(expected, token.secret[-CHECKSUM_LENGTH:])


def parse_token(text: str, prefix: str) -> TokenString | None:
    """The token in `text`, or None when it is not a well-formed token of ours with a valid checksum."""
    token = split_token(text, prefix)
    return token if token is not None and checksum_matches(token) else None


def looks_like_token(text: str, prefix: str) -> bool:
    return text.startswith(prefix + "_")
