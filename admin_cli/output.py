"""What the command line prints: tables for people, the admin API's JSON for scripts, a new secret once."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, TextIO

# Controls (C0, DEL, C1) could drive the terminal: whatever the API holds is printed without them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

TOKEN_COLUMNS = (
    ("ID", "id"),
    ("NAME", "name"),
    ("ACCESS LEVEL", "access_level"),
    ("STATUS", "status"),
    ("IP RANGES", "allowed_ip_ranges"),
    ("EXPIRES", "expires_at"),
    ("RATE LIMIT", "rate_limit"),
    ("QUOTA", "quota"),
    ("LAST USED", "last_used_at"),
    ("REQUESTS 24H", "requests_24h"),
)
TOKEN_FIELDS = (
    "id",
    "name",
    "access_level",
    "allowed_ip_ranges",
    "status",
    "expires_at",
    "created_at",
    "updated_at",
    "rotated_at",
    "last_used_at",
    "last_used_ip",
    "previous_secret_expires_at",
    "rate_limit",
    "quota",
    "previous_secret",
    "version",
)
AUDIT_COLUMNS = (
    ("AT", "at"),
    ("ACTION", "action"),
    ("ACTOR", "actor"),
    ("TOKEN", "token_id"),
    ("DETAILS", "details"),
)
ADMIN_KEY_COLUMNS = (("ID", "id"), ("NAME", "name"), ("ROLE", "role"), ("CREATED", "created_at"))
USAGE_COLUMNS = (
    ("FROM", "start"),
    ("ALLOWED", "allowed"),
    ("REFUSED LEVEL", "refused_level"),
    ("REFUSED IP", "refused_ip"),
    ("RATE LIMITED", "rate_limited"),
    ("QUOTA EXCEEDED", "quota_exceeded"),
)
USAGE_NOTE = (
    "Buckets with no request are left out (--json shows them all). Counts are written in batches, every"
    " usage_flush_interval (5 s by default): a call made just now may not show yet."
)
LAST_USED_NOTE = (
    "last_used_at and last_used_ip are written in batches, every usage_flush_interval (5 s by default):"
    " a call made just now may not show yet."
)


def cell(value: Any) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, list):
        text = ", ".join(str(item) for item in value) if value else "any address"  # no ranges: anywhere
    elif isinstance(value, dict) and set(value) == {"requests", "per_seconds", "burst"}:
        text = f"{value['requests']}/{value['per_seconds']}s"  # as `--rate-limit` takes it
        if value["burst"] is not None:
            text += f" burst {value['burst']}"
    elif isinstance(value, dict) and set(value) == {"requests", "period"}:
        text = f"{value['requests']}/{value['period']}"  # as `--quota` takes it
    elif isinstance(value, dict):
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    else:
        text = str(value)
    return _CONTROL.sub("?", text)


def print_json(answer: Any, out: TextIO) -> None:
    if answer is not None:
        out.write(json.dumps(answer, indent=2, ensure_ascii=False) + "\n")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], out: TextIO) -> None:
    cells = [[cell(row.get(field)) for _, field in columns] for row in rows]
    widths = [
        max([len(title), *(len(line[index]) for line in cells)]) for index, (title, _) in enumerate(columns)
    ]
    lines = [[title for title, _ in columns], *cells]
    out.writelines("  ".join(t.ljust(w) for t, w in zip(line, widths)).rstrip() + "\n" for line in lines)


def print_record(record: dict[str, Any], fields: Sequence[str], out: TextIO) -> None:
    width = max(len(field) for field in fields)
    for field in fields:
        if field in record:
            out.write(f"{field.ljust(width)}  {cell(record[field])}\n")


def print_secret(what: str, secret: str, env_hint: str, out: TextIO) -> None:
    """A new token or admin key: printed this once, on stdout, set apart so that it is copied whole."""
    out.write(
        f"\nThe {what}, shown only this once (the gateway keeps only a hash of it):\n\n    {secret}\n\n"
        f"Store it now, in a secret manager or {env_hint}; it cannot be shown again.\n"
    )
