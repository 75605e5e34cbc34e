"""The token model shared by both planes: the stored record, its public view, and the audit event."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.ratelimits.policy import Quota, RateLimit, quota_from_json, rate_limit_from_json

_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})"
)


class TokenStatus(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"


def utc_now() -> datetime:
    return datetime.now(UTC)


def parse_rfc3339(text: str) -> datetime:
    """A timezone-aware datetime from an RFC 3339 timestamp; ValueError otherwise."""
    if not _RFC3339.fullmatch(text):
        raise ValueError("is not an RFC 3339 timestamp such as 2027-01-31T12:00:00Z")
    normalized = text.upper().replace(" ", "T").replace("Z", "+00:00")
    head, dot, rest = normalized.partition(".")
    if dot:  # Python parses at most six fractional digits
        digits = rest[: len(rest) - 6]
        normalized = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits):]}"
    try:
        return datetime.fromisoformat(normalized).astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-01:00 is in year 10000 once in UTC
        raise ValueError("is outside the years 1 to 9999 in UTC") from None


def format_time(moment: datetime | None) -> str | None:
    """UTC, microseconds, `Z`: one fixed width, so stored timestamps sort as text."""
    if moment is None:
        return None
    # isoformat pads the year to four digits; strftime's %Y does not on glibc (year 999 -> "999").
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_stored_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A token as the store holds it. Hashes are not secrets, but they stay out of `repr` all the same."""

    id: str
    name: str
    access_level: str
    allowed_ip_ranges: tuple[str, ...]
    status: TokenStatus
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    rotated_at: datetime | None
    last_used_at: datetime | None
    last_used_ip: str | None
    secret_hash: str = field(repr=False)
    previous_secret_hash: str | None = field(default=None, repr=False)
    previous_secret_expires_at: datetime | None = None
    version: int = 1
    rate_limit: RateLimit | None = None  # None: unlimited
    quota: Quota | None = None  # None: unlimited

    def view(self) -> dict[str, Any]:
        """What the admin API shows: everything but the hashes."""
        return {
            "id": self.id,
            "name": self.name,
            "access_level": self.access_level,
            "allowed_ip_ranges": list(self.allowed_ip_ranges),
            "status": self.status.value,
            "expires_at": format_time(self.expires_at),
            "created_at": format_time(self.created_at),
            "updated_at": format_time(self.updated_at),
            "rotated_at": format_time(self.rotated_at),
            "last_used_at": format_time(self.last_used_at),
            "last_used_ip": self.last_used_ip,
            "previous_secret_expires_at": format_time(self.previous_secret_expires_at),
            "version": self.version,
            "rate_limit": None if self.rate_limit is None else self.rate_limit.view(),
            "quota": None if self.quota is None else self.quota.view(),
        }


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One admin action. `details` holds what changed, never a secret or a hash."""

    action: str
    actor: str
    token_id: str | None
    details: dict[str, Any]
    at: datetime = field(default_factory=utc_now)
    id: int | None = None

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": format_time(self.at),
            "action": self.action,
            "actor": self.actor,
            "token_id": self.token_id,
            "details": self.details,
        }


@dataclass(frozen=True, slots=True)
class AdminKeyRecord:
    id: str
    name: str
    role: str
    created_at: datetime
    key_hash: str = field(repr=False)


def record_to_json(record: TokenRecord) -> dict[str, Any]:
    """The whole record, hashes included, for the shared cache (Redis). Never a secret."""
    return {**record.view(), "secret_hash": record.secret_hash, "previous_secret_hash": record.previous_secret_hash}


def record_from_json(data: dict[str, Any]) -> TokenRecord:
    return TokenRecord(
        id=data["id"],
        name=data["name"],
        access_level=data["access_level"],
        allowed_ip_ranges=tuple(data["allowed_ip_ranges"]),
        status=TokenStatus(data["status"]),
        expires_at=parse_stored_time(data["expires_at"]),
        created_at=parse_stored_time(data["created_at"]),  # type: ignore[arg-type]
        updated_at=parse_stored_time(data["updated_at"]),  # type: ignore[arg-type]
        rotated_at=parse_stored_time(data["rotated_at"]),
        last_used_at=parse_stored_time(data["last_used_at"]),
        last_used_ip=data["last_used_ip"],
        secret_hash=data["secret_hash"],
        previous_secret_hash=data["previous_secret_hash"],
        previous_secret_expires_at=parse_stored_time(data["previous_secret_expires_at"]),
        version=data["version"],
        # Entries cached by an older gateway have neither: unlimited until the entry is refreshed.
        rate_limit=rate_limit_from_json(data.get("rate_limit")),
        quota=quota_from_json(data.get("quota")),
    )
