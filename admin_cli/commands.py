"""`gateway tokens ...` and `gateway admin-keys ...`: every admin API call, from a shell or a script.

Flags are named after the admin API's JSON fields; a token or an admin key is named by its id. `--json`
prints the admin API's answer as it is; without it, people get a table. The admin key comes from
GATEWAY_ADMIN_KEY (or --admin-key) and is never printed.
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from admin_cli.client import AdminClient, Refused, Unreachable
from admin_cli.output import (
    ADMIN_KEY_COLUMNS,
    AUDIT_COLUMNS,
    LAST_USED_NOTE,
    TOKEN_COLUMNS,
    TOKEN_FIELDS,
    USAGE_COLUMNS,
    USAGE_NOTE,
    print_json,
    print_record,
    print_secret,
    print_table,
)

OK = 0
REFUSED = 1  # the admin API refused: invalid input, a conflict, a server error
USAGE = 2  # a flag is missing or malformed; nothing was sent (argparse exits 2 too)
UNREACHABLE = 3  # no answer, or the answer is not the admin API's
NOT_FOUND = 4  # no token or admin key with this id
DENIED = 5  # the admin key is missing or wrong (401), or its role may not do this (403)

ENV_URL = "GATEWAY_ADMIN_URL"
ENV_KEY = "GATEWAY_ADMIN_KEY"
ENV_CA_FILE = "GATEWAY_ADMIN_CA_FILE"
DEFAULT_URL = "http://127.0.0.1:8081"
NOT_FOUND_CODES = frozenset({"token_not_found", "admin_key_not_found"})
STATUSES = ("enabled", "disabled")
ROLES = ("admin", "viewer")
GRANULARITIES = ("hour", "day")

EXIT_CODES = f"""\
exit codes:
  {OK}  done
  {REFUSED}  the admin API refused (its HTTP status and problem code are printed on stderr)
  {USAGE}  usage error: a flag is missing or malformed, no admin key; nothing was sent
  {UNREACHABLE}  the admin API cannot be reached, or what answered is not the admin API
  {NOT_FOUND}  there is no token or admin key with this id
  {DENIED}  the admin key was refused (401), or its role may not do this (403)
With --json, stdout holds the admin API's JSON answer as it is, a problem included."""

Handler = Callable[[AdminClient, argparse.Namespace, TextIO], None]


class UsageError(Exception):
    """A command line the admin API need not see: exit 2."""


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection (each flag falls back to its environment variable)")
    group.add_argument(
        "--admin-url",
        metavar="URL",
        help=f"the admin API's base URL (default: ${ENV_URL}, else {DEFAULT_URL})",
    )
    group.add_argument(
        "--admin-key",
        metavar="KEY",
        help=f"the admin key (default: ${ENV_KEY}). Prefer the variable: a key given as a flag is visible to"
        " every user of this machine (ps, /proc) and stays in the shell's history",
    )
    group.add_argument(
        "--admin-ca-file",
        metavar="PEM",
        help=f"CA certificates to trust for an https:// admin URL (default: ${ENV_CA_FILE}, else the"
        " system's)",
    )
    group.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="how long to wait for each answer (30)"
    )
    common.add_argument(
        "--json", action="store_true", help="print the admin API's JSON answer as it is, for scripts"
    )
    return common


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `tokens` and `admin-keys` to the `gateway` command's subcommands."""
    common = _connection_options()

    def leaf(group: Any, name: str, handler: Handler, text: str, epilog: str = "") -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(
            name,
            help=text,
            description=text[0].upper() + text[1:] + ".",
            parents=[common],
            epilog=(epilog + "\n\n" if epilog else "") + EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.set_defaults(admin_handler=handler, admin_prog=parser.prog)
        return parser

    def token_id(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("id", metavar="TOKEN_ID", help="the token's id (as in `gateway tokens list`)")

    def token_fields(parser: argparse.ArgumentParser, *, editing: bool) -> None:
        parser.add_argument("--name", required=not editing, help="what the token is for, e.g. 'CRM sync'")
        parser.add_argument(
            "--access-level",
            required=not editing,
            metavar="LEVEL",
            help="one of the access levels in the gateway's configuration, e.g. read_only",
        )
        ranges = parser.add_mutually_exclusive_group() if editing else parser
        ranges.add_argument(
            "--allowed-ip-range",
            action="append",
            metavar="RANGE",
            dest="allowed_ip_ranges",
            help="an address or CIDR range the token may call from; repeat for more"
            + (" (replaces the token's ranges)" if editing else " (default: any address)"),
        )
        if editing:
            ranges.add_argument(
                "--clear-allowed-ip-ranges",
                action="store_true",
                help="let the token call from any address (allowed_ip_ranges: [])",
            )
        expiry = parser.add_mutually_exclusive_group() if editing else parser
        expiry.add_argument(
            "--expires-at",
            metavar="RFC3339",
            help="when the token stops working, e.g. 2027-01-31T00:00:00Z"
            + ("" if editing else " (default: never)"),
        )
        if editing:
            expiry.add_argument(
                "--clear-expires-at",
                action="store_true",
                help="make the token never expire (expires_at: null)",
            )

        rate = parser.add_mutually_exclusive_group() if editing else parser
        rate.add_argument(
            "--rate-limit",
            type=_rate_limit,
            metavar="N/S",
            help="at most N requests per S seconds across every replica, e.g. 100/60s, 1000/1h"
            + ("" if editing else " (default: unlimited)"),
        )
        parser.add_argument(
            "--burst",
            type=_positive,
            metavar="B",
            help="with --rate-limit: requests allowed back to back (rate_limit.burst; default N)",
        )
        if editing:
            rate.add_argument(
                "--clear-rate-limit", action="store_true", help="remove the rate limit (rate_limit: null)"
            )
        quota = parser.add_mutually_exclusive_group() if editing else parser
        quota.add_argument(
            "--quota",
            type=_quota,
            metavar="N/PERIOD",
            help="at most N requests per UTC day or month, or in total: 10000/day, 250000/month, 500/total"
            + ("" if editing else " (default: unlimited)"),
        )
        if editing:
            quota.add_argument("--clear-quota", action="store_true", help="remove the quota (quota: null)")

    def paging(parser: argparse.ArgumentParser, what: str) -> None:
        parser.add_argument(
            "--limit", type=int, metavar="N", help=f"at most N {what} per page (API default 100)"
        )
        pages = parser.add_mutually_exclusive_group()
        pages.add_argument("--cursor", help="the page after this cursor (the previous page's next_cursor)")
        pages.add_argument("--all", action="store_true", help="follow next_cursor until the last page")

    tokens_parser = commands.add_parser(
        "tokens",
        help="manage API tokens through the admin API",
        description="Manage API tokens through the admin API.",
    )
    tokens = tokens_parser.add_subparsers(dest="tokens_command", required=True, metavar="COMMAND")

    create = leaf(
        tokens,
        "create",
        _token_create,
        "create a token; the token string is shown only in this answer",
        "example:\n  gateway tokens create --name 'CRM sync' --access-level editorial \\\n"
        "    --allowed-ip-range 10.0.0.0/8 --allowed-ip-range 192.0.2.7 --expires-at 2027-01-31T00:00:00Z",
    )
    token_fields(create, editing=False)

    listing = leaf(tokens, "list", _token_list, "list tokens (never a secret), newest first", LAST_USED_NOTE)
    listing.add_argument("--status", choices=STATUSES, help="only enabled or only disabled tokens")
    listing.add_argument(
        "--unused-since", metavar="RFC3339", help="only tokens never used, or not used since this moment"
    )
    paging(listing, "tokens")

    token_id(leaf(tokens, "show", _token_show, "show one token", LAST_USED_NOTE))

    edit = leaf(tokens, "edit", _token_edit, "change a token's name, access level, IP ranges or expiry")
    token_id(edit)
    token_fields(edit, editing=True)
    edit.add_argument(
        "--version",
        type=int,
        metavar="N",
        help="apply the edit only if the token is still at this version (its \"version\" field);"
        " else 409 conflict",
    )

    rotate = leaf(
        tokens,
        "rotate",
        _token_rotate,
        "give a token a new secret (same id, level and ranges); the new token string is shown only this once",
    )
    token_id(rotate)
    rotate.add_argument(
        "--grace-seconds",
        type=int,
        metavar="N",
        help="keep accepting the old secret for N more seconds (0 to 604800; default 0: it stops at once)",
    )
    token_id(
        leaf(
            tokens,
            "end-grace",
            _token_status("end-grace"),
            "end a rotation's grace period now: the previous token string stops working",
            "`gateway tokens show ID` shows the previous secret's last use (previous_secret) while the grace runs.",
        )
    )
    token_id(leaf(tokens, "disable", _token_status("disable"), "stop a token working (until enabled again)"))
    token_id(leaf(tokens, "enable", _token_status("enable"), "let a disabled token work again"))
    token_id(
        leaf(tokens, "delete", _token_delete, "delete a token for good (the proxy answers 401 invalid_token)")
    )

    usage = leaf(
        tokens,
        "usage",
        _token_usage,
        "show a token's requests by outcome: per hour for the last 7 days, or per day for the last 90",
        USAGE_NOTE,
    )
    token_id(usage)
    usage.add_argument(
        "--granularity", choices=GRANULARITIES, default="hour", help="hour (the default) or day buckets"
    )

    audit = leaf(tokens, "audit", _token_audit, "show the audit log: who did what, when (never a secret)")
    audit.add_argument(
        "id", metavar="TOKEN_ID", nargs="?", help="only this token's events (default: all events)"
    )
    paging(audit, "events")

    keys_parser = commands.add_parser(
        "admin-keys", help="manage the admin API's keys", description="Manage the keys of the admin API."
    )
    keys = keys_parser.add_subparsers(dest="admin_keys_command", required=True, metavar="COMMAND")
    key_create = leaf(keys, "create", _key_create, "create an admin key; it is shown only in this answer")
    key_create.add_argument("--name", required=True, help="who or what uses the key, e.g. 'Security auditor'")
    key_create.add_argument(
        "--role", required=True, choices=ROLES, help="admin: everything; viewer: read only"
    )
    leaf(keys, "list", _key_list, "list the admin keys (never a key)")
    key_delete = leaf(keys, "delete", _key_delete, "delete an admin key; it stops working at once")
    key_delete.add_argument(
        "id", metavar="KEY_ID", help="the admin key's id (as in `gateway admin-keys list`)"
    )
    leaf(keys, "whoami", _key_whoami, "show the admin key this command uses (its id, name and role)")


def run(
    arguments: argparse.Namespace,
    environ: Mapping[str, str],
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run the admin command the parsed `arguments` name; returns the exit code."""
    prog = arguments.admin_prog
    key = arguments.admin_key or environ.get(ENV_KEY)
    if not key:
        err.write(f"{prog}: no admin key: set {ENV_KEY} (or give --admin-key)\n")
        return USAGE
    try:
        client = AdminClient(
            arguments.admin_url or environ.get(ENV_URL) or DEFAULT_URL,
            key,
            timeout=arguments.timeout,
            ca_file=arguments.admin_ca_file or environ.get(ENV_CA_FILE) or None,
        )
    except (ValueError, OSError) as error:  # a malformed URL, an unreadable CA file
        err.write(f"{prog}: {error}\n")
        return USAGE
    try:
        arguments.admin_handler(client, arguments, out)
    except UsageError as error:
        err.write(f"{prog}: {error}\n")
        return USAGE
    except Unreachable as error:
        err.write(f"{prog}: {error}\n")
        return UNREACHABLE
    except Refused as refusal:
        if arguments.json:
            print_json(refusal.problem, out)
        return _refused(prog, client.url, refusal, err)
    return OK


def _refused(prog: str, url: str, refusal: Refused, err: TextIO) -> int:
    field = refusal.problem.get("field")
    err.write(
        f"{prog}: {refusal.status} {refusal.code}: {refusal.detail}{f' (field: {field})' if field else ''}\n"
    )
    if refusal.status == 404:
        if refusal.code in NOT_FOUND_CODES:
            return NOT_FOUND
        err.write(f"{prog}: {url} has no such route: is it the admin API's base URL?\n")
        return UNREACHABLE
    if refusal.status in (401, 403):
        if refusal.code == "invalid_token":
            err.write(f"{prog}: {url} answered like the proxy: is it the admin API's port?\n")
        return DENIED
    return REFUSED


# --- tokens -------------------------------------------------------------------------------------------------


def _path(*parts: str) -> str:
    return "".join("/" + urllib.parse.quote(part, safe="") for part in parts)


def _show_token(answer: dict[str, Any], arguments: argparse.Namespace, out: TextIO) -> None:
    if arguments.json:
        print_json(answer, out)
        return
    print_record(answer, TOKEN_FIELDS, out)
    if "token" in answer:
        print_secret("token", str(answer["token"]), "the integration's configuration", out)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _positive(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _rate_limit(text: str) -> dict[str, int]:
    """`100/60s` (also `100/60`, `100/1m`, `5000/1h`, `100000/1d`) as the admin API's rate_limit."""
    requests, slash, window = text.partition("/")
    unit = window[-1:] if window[-1:] in _DURATION_UNITS else "s"
    number = window[:-1] if window[-1:] in _DURATION_UNITS else window
    if not slash or not (requests.isascii() and requests.isdigit()) or not (number.isascii() and number.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not N/S such as 100/60s or 1000/1h")
    return {"requests": int(requests), "per_seconds": int(number) * _DURATION_UNITS[unit]}


def _quota(text: str) -> dict[str, Any]:
    """`10000/day`, `250000/month` or `500/total` as the admin API's quota."""
    requests, slash, period = text.partition("/")
    if not slash or not (requests.isascii() and requests.isdigit()) or period not in ("day", "month", "total"):
        raise argparse.ArgumentTypeError(f"{text!r} is not N/day, N/month or N/total")
    return {"requests": int(requests), "period": period}


def _limit_fields(arguments: argparse.Namespace, body: dict[str, Any]) -> None:
    if arguments.burst is not None and arguments.rate_limit is None:
        raise UsageError("--burst goes with --rate-limit (the whole rate limit is replaced)")
    if arguments.rate_limit is not None:
        body["rate_limit"] = {**arguments.rate_limit, "burst": arguments.burst}
    elif getattr(arguments, "clear_rate_limit", False):
        body["rate_limit"] = None
    if arguments.quota is not None:
        body["quota"] = arguments.quota
    elif getattr(arguments, "clear_quota", False):
        body["quota"] = None


def _token_create(client: AdminClient, arguments: argparse.Namespace, out: TextIO) -> None:
    body: dict[str, Any] = {"name": arguments.name, "access_level": arguments.access_level}
    if arguments.allowed_ip_ranges is not None:
        body["allowed_ip_ranges"] = arguments.allowed_ip_ranges
    if arguments.expires_at is not None:
        body["expires_at"] = arguments.expires_at
    _limit_fields(arguments, body)
    _, answer = client.call("POST", "/v1/tokens", body=body)
    _show_token(answer, arguments, out)


def _pages(client: AdminClient, path: str, query: dict[str, str | None], every: bool) -> dict[str, Any]:
    _, answer = client.call("GET", path, query=query)
    while every and answer.get("next_cursor"):
        _, page = client.call("GET", path, query={**query, "cursor": answer["next_cursor"]})
        answer = {**page, "items": answer["items"] + page["items"]}
    return dict(answer)


def _page_query(arguments: argparse.Namespace) -> dict[str, str | None]:
    return {
        "limit": None if arguments.limit is None else str(arguments.limit),
        "cursor": arguments.cursor,
    }


def _show_page(
    answer: dict[str, Any], columns: Any, what: str, arguments: argparse.Namespace, out: TextIO
) -> None:
    if arguments.json:
        print_json(answer, out)
        return
    if answer["items"]:
        print_table(answer["items"], columns, out)
    else:
        out.write(f"No {what}.\n")
    if answer.get("next_cursor"):
        sys.stderr.write(f"More {what}: add --cursor {answer['next_cursor']} (or --all).\n")


def _token_list(client: AdminClient, arguments: argparse.Namespace, out: TextIO) -> None:
    query = {"status": arguments.status, "unused_since": arguments.unused_since, **_page_query(arguments)}
    _show_page(_pages(client, "/v1/tokens", query, arguments.all), TOKEN_COLUMNS, "tokens", arguments, out)


def _token_show(client: AdminClient, arguments: argparse.Namespace, out: TextIO) -> None:
    _, answer = client.call("GET", _path("v1", "tokens", arguments.id))
    _show_token(answer, arguments, out)
    if not arguments.json:
        out.write(f"\n{LAST_USED_NOTE}\n")


def _token_edit(client: AdminClient, arguments: argparse.Namespace, out: TextIO) -> None:
    body: dict[str, Any] = {}
    if arguments.name is not None:
        body["name"] = arguments.name
    if arguments.access_level is not None:
        body["access_level"] = arguments.access_level
    if arguments.allowed_ip_ranges is not None or arguments.clear_allowed_ip_ranges:
        body["allowed_ip_ranges"] = arguments.allowed_ip_ranges or []
    if arguments.expires_at is not None or arguments.clear_expires_at:
        body["expires_at"] = arguments.expires_at
    _limit_fields(arguments, body)
    if not body:
        raise UsageError(
            "nothing to change: give --name, --access-level, --allowed-ip-range, --clear-allowed-ip-ranges,"
            " --expires-at, --clear-expires-at, --rate-limit, --clear-rate-limit, --quota or --clear-quota"
        )
    if arguments.version is not None:
        body["version"] = arguments.version
    _, answer = client.call("PATCH", _path("v1", "tokens", arguments.id), body=body)
    _show_token(answer, arguments, out)


def _token_rotate(client: AdminClient, arguments: argparse.Namespace, out: TextIO) -> None:
    body = {} if arguments.grace_seconds is None else {"grace_seconds": arguments.grace_seconds}
    _, answer = client.call("POST", _path("v1", "tokens", arguments.id, "rotate"), body=body)
    _show_token(answer, arguments, out)


def _token_status(action: str) -> Handler:
    def change(client: AdminClient, arguments: argparse.Namespace, out: TextIO) -> None:
        _, answer = client.call("POST", _path("v1", "tokens", arguments.id, action))
        _show_token(answer, arguments, out)

    return change


def _token_delete(client: AdminClient, arguments: argparse.Namespace, out: TextIO) -> None:
    client.call("DELETE", _path("v1", "tokens", arguments.id))
    if not arguments.json:
        out.write(f"Deleted token {arguments.id}.\n")


def _token_usage(client: AdminClient, arguments: argparse.Namespace, out: TextIO) -> None:
    _, answer = client.call(
        "GET", _path("v1", "tokens", arguments.id, "usage"), query={"granularity": arguments.granularity}
    )
    if arguments.json:
        print_json(answer, out)
        return
    used = [bucket for bucket in answer["buckets"] if any(bucket[outcome] for outcome in answer["outcomes"])]
    if used:
        print_table(used, USAGE_COLUMNS, out)
    else:
        out.write(f"No requests from {answer['from']} to {answer['to']}.\n")
    totals = answer["totals"]
    out.write("Total: " + ", ".join(f"{outcome} {totals[outcome]}" for outcome in answer["outcomes"]) + "\n")


def _token_audit(client: AdminClient, arguments: argparse.Namespace, out: TextIO) -> None:
    query = {"token_id": arguments.id, **_page_query(arguments)}
    _show_page(_pages(client, "/v1/audit", query, arguments.all), AUDIT_COLUMNS, "events", arguments, out)


# --- admin keys ---------------------------------------------------------------------------------------------


def _key_create(client: AdminClient, arguments: argparse.Namespace, out: TextIO) -> None:
    _, answer = client.call("POST", "/v1/admin-keys", body={"name": arguments.name, "role": arguments.role})
    if arguments.json:
        print_json(answer, out)
        return
    print_record(answer, ("id", "name", "role", "created_at"), out)
    print_secret("admin key", str(answer["key"]), f"{ENV_KEY} for this command line", out)


def _key_list(client: AdminClient, arguments: argparse.Namespace, out: TextIO) -> None:
    _, answer = client.call("GET", "/v1/admin-keys")
    _show_page(answer, ADMIN_KEY_COLUMNS, "admin keys", arguments, out)


def _key_delete(client: AdminClient, arguments: argparse.Namespace, out: TextIO) -> None:
    client.call("DELETE", _path("v1", "admin-keys", arguments.id))
    if not arguments.json:
        out.write(f"Deleted admin key {arguments.id}.\n")


def _key_whoami(client: AdminClient, arguments: argparse.Namespace, out: TextIO) -> None:
    _, answer = client.call("GET", "/v1/session")
    if arguments.json:
        print_json(answer, out)
    else:
        print_record(answer, ("id", "name", "role", "created_at"), out)
