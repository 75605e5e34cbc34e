"""`gateway tokens ...` and `gateway admin-keys ...` run as real processes against a real `gateway serve`.

One gateway (its proxy, its admin API and a demo upstream, a real SQLite file) serves the whole module; each
command is a new `python -m gateway` process, as an operator or a script would run it. No command's output
may hold the admin key.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from admin_cli.commands import DENIED, NOT_FOUND, OK, REFUSED, UNREACHABLE, USAGE

ADMIN_KEY = "cli-test-admin-key-0123456789abcdef"
FUTURE = "2099-01-31T00:00:00Z"
NO_PROXIES = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment(**extra: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    environment.update(extra)
    return environment


@dataclass
class Gateway:
    admin_url: str
    proxy_url: str

    def proxy(self, token: str) -> tuple[int, str | None]:
        """The proxy's status for a call with `token`, and the problem code when it refused."""
        request = urllib.request.Request(
            f"{self.proxy_url}/api/posts", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with NO_PROXIES.open(request, timeout=30) as response:
                return response.status, None
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read())["code"]


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("admin-cli")
    proxy, admin, demo = _free_port(), _free_port(), _free_port()
    log = (folder / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--demo-upstream", f"127.0.0.1:{demo}"],
        env=_environment(
            GATEWAY_DATABASE_URL=f"sqlite:///{folder / 'gateway.db'}",
            GATEWAY_ADMIN_KEY=ADMIN_KEY,
            GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy}",
            GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin}",
            GATEWAY_ARGON2_TIME_COST="1",
            GATEWAY_ARGON2_MEMORY_COST_KIB="1024",
            GATEWAY_USAGE_FLUSH_INTERVAL="0.1",
        ),
        stdout=log,
        stderr=log,
    )
    served = Gateway(f"http://127.0.0.1:{admin}", f"http://127.0.0.1:{proxy}")
    try:
        for _ in range(1200):  # bounded: up to a minute on a loaded machine
            assert process.poll() is None, (folder / "serve.log").read_text()
            try:
                with NO_PROXIES.open(f"{served.admin_url}/healthz", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError("gateway serve did not become healthy")
        yield served
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def cli(gateway: Gateway, *arguments: str, key: str | None = ADMIN_KEY, url: str | None = None) -> Run:
    """Run `gateway ARGUMENTS` with the admin URL and key in the environment, as --help advises."""
    environment = _environment(GATEWAY_ADMIN_URL=url or gateway.admin_url)
    if key is not None:
        environment["GATEWAY_ADMIN_KEY"] = key
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ADMIN_KEY not in done.stdout + done.stderr
    return Run(done.returncode, done.stdout, done.stderr)


def _secret_lines(text: str, prefix: str) -> list[str]:
    return [word for word in text.split() if word.startswith(prefix)]


def _create(gateway: Gateway, name: str, *extra: str) -> dict[str, Any]:
    run = cli(gateway, "tokens", "create", "--json", "--name", name, "--access-level", "read_only", *extra)
    assert run.code == OK, run.err
    created: dict[str, Any] = run.json()
    return created


def test_create_shows_the_token_once_and_it_opens_the_proxy(gateway: Gateway) -> None:
    run = cli(
        gateway,
        "tokens",
        "create",
        "--name",
        "CRM sync",
        "--access-level",
        "read_only",
        "--allowed-ip-range",
        "127.0.0.1",
        "--allowed-ip-range",
        "10.0.0.0/8",
        "--expires-at",
        FUTURE,
    )
    assert run.code == OK and run.err == ""
    tokens = _secret_lines(run.out, "gw_")
    assert len(tokens) == 1 and run.out.count(tokens[0]) == 1
    assert "shown only this once" in run.out
    assert "127.0.0.1/32, 10.0.0.0/8" in run.out and "2099-01-31T00:00:00" in run.out
    assert gateway.proxy(tokens[0]) == (200, None)

    token_id = tokens[0].split("_")[1]
    for command in (("tokens", "show", token_id), ("tokens", "list"), ("tokens", "audit", token_id)):
        shown = cli(gateway, *command)
        assert shown.code == OK and token_id in shown.out
        assert tokens[0].rsplit("_", 1)[1] not in shown.out  # the secret is never shown again


def test_create_json_is_the_admin_apis_answer_with_the_token(gateway: Gateway) -> None:
    created = _create(gateway, "HR system", "--allowed-ip-range", "127.0.0.1")
    assert set(created) == {
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
        "version",
        "rate_limit",
        "quota",
        "recent_addresses",
        "token",
    }
    assert created["allowed_ip_ranges"] == ["127.0.0.1/32"] and created["expires_at"] is None
    assert gateway.proxy(created["token"]) == (200, None)
    shown = cli(gateway, "tokens", "show", created["id"], "--json").json()
    usage = {"token", "last_used_at", "last_used_ip", "recent_addresses"}  # written every usage_flush_interval
    assert {k: v for k, v in shown.items() if k not in usage} == {
        k: v for k, v in created.items() if k not in usage
    }


def test_usage_shows_the_requests_by_outcome(gateway: Gateway) -> None:
    created = _create(gateway, "usage report")
    for _ in range(3):
        assert gateway.proxy(created["token"]) == (200, None)
    answer: dict[str, Any] = {}
    for _ in range(600):  # bounded: the proxy writes counts every usage_flush_interval (0.1 s here)
        answer = cli(gateway, "tokens", "usage", created["id"], "--granularity", "day", "--json").json()
        if answer["totals"]["allowed"] == 3:
            break
        time.sleep(0.05)
    assert answer["granularity"] == "day" and len(answer["buckets"]) == 90
    assert answer["totals"] == {
        "allowed": 3, "refused_level": 0, "refused_ip": 0, "rate_limited": 0, "quota_exceeded": 0
    }

    table = cli(gateway, "tokens", "usage", created["id"])
    assert table.code == OK, table.err
    lines = table.out.splitlines()
    assert lines[0].split()[:2] == ["FROM", "ALLOWED"] and len(lines) == 3  # header, one hour, total
    assert lines[1].split()[1:] == ["3", "0", "0", "0", "0"]
    assert lines[2] == "Total: allowed 3, refused_level 0, refused_ip 0, rate_limited 0, quota_exceeded 0"
    listed = cli(gateway, "tokens", "list", "--json").json()["items"]
    assert [item["requests_24h"] for item in listed if item["id"] == created["id"]] == [3]

    assert cli(gateway, "tokens", "usage", created["id"], "--granularity", "minute").code == USAGE
    assert cli(gateway, "tokens", "usage", "AAAAAAAAAAAAAAAAAAAAAA").code == NOT_FOUND


def test_list_filters_by_status_and_unused_since_and_pages(gateway: Gateway) -> None:
    made = [_create(gateway, f"paging {n}")["id"] for n in range(3)]
    assert cli(gateway, "tokens", "disable", made[0]).code == OK

    disabled = cli(gateway, "tokens", "list", "--status", "disabled", "--json").json()["items"]
    assert made[0] in {item["id"] for item in disabled} and not {made[1], made[2]} & {
        i["id"] for i in disabled
    }
    unused = cli(gateway, "tokens", "list", "--unused-since", "2000-01-01T00:00:00+00:00", "--json").json()
    assert set(made) <= {item["id"] for item in unused["items"]}

    first = cli(gateway, "tokens", "list", "--limit", "2", "--json").json()
    assert len(first["items"]) == 2 and first["next_cursor"]
    second = cli(gateway, "tokens", "list", "--limit", "2", "--cursor", first["next_cursor"], "--json").json()
    assert not {item["id"] for item in first["items"]} & {item["id"] for item in second["items"]}
    everything = cli(gateway, "tokens", "list", "--limit", "1", "--all", "--json").json()
    assert everything["next_cursor"] is None
    assert [item["id"] for item in everything["items"]] == [
        item["id"] for item in cli(gateway, "tokens", "list", "--limit", "500", "--json").json()["items"]
    ]

    table = cli(gateway, "tokens", "list", "--limit", "2")
    assert table.code == OK and table.out.split()[:2] == ["ID", "NAME"]
    assert f"--cursor {first['next_cursor']}" in table.err


def test_edit_sets_and_clears_fields_named_after_the_json(gateway: Gateway) -> None:
    token_id = _create(gateway, "to edit")["id"]
    edited = cli(
        gateway,
        "tokens",
        "edit",
        token_id,
        "--json",
        "--name",
        "edited",
        "--access-level",
        "editorial",
        "--allowed-ip-range",
        "192.0.2.0/24",
        "--expires-at",
        FUTURE,
    ).json()
    assert (edited["name"], edited["access_level"], edited["allowed_ip_ranges"], edited["expires_at"]) == (
        "edited",
        "editorial",
        ["192.0.2.0/24"],
        "2099-01-31T00:00:00.000000Z",
    )
    cleared = cli(
        gateway, "tokens", "edit", token_id, "--clear-expires-at", "--clear-allowed-ip-ranges", "--json"
    )
    assert (cleared.json()["allowed_ip_ranges"], cleared.json()["expires_at"]) == ([], None)

    stale = cli(gateway, "tokens", "edit", token_id, "--name", "x", "--version", "1")
    assert stale.code == REFUSED and "409 conflict" in stale.err
    nothing = cli(gateway, "tokens", "edit", token_id)
    assert nothing.code == USAGE and "nothing to change" in nothing.err
    both = cli(gateway, "tokens", "edit", token_id, "--expires-at", FUTURE, "--clear-expires-at")
    assert both.code == USAGE and "not allowed with" in both.err


def test_rate_limit_and_quota_flags_set_change_and_clear_the_json_fields(gateway: Gateway) -> None:
    created = _create(gateway, "limited", "--rate-limit", "100/1m", "--burst", "10", "--quota", "5000/day")
    assert created["rate_limit"] == {"requests": 100, "per_seconds": 60, "burst": 10}
    assert created["quota"] == {"requests": 5000, "period": "day"}
    shown = cli(gateway, "tokens", "show", created["id"])
    assert "100/60s burst 10" in shown.out and "5000/day" in shown.out

    edited = cli(gateway, "tokens", "edit", created["id"], "--rate-limit", "7/2s", "--quota", "9/total", "--json")
    assert edited.json()["rate_limit"] == {"requests": 7, "per_seconds": 2, "burst": None}
    assert edited.json()["quota"] == {"requests": 9, "period": "total"}
    cleared = cli(gateway, "tokens", "edit", created["id"], "--clear-rate-limit", "--clear-quota", "--json").json()
    assert (cleared["rate_limit"], cleared["quota"]) == (None, None)

    assert cli(gateway, "tokens", "edit", created["id"], "--rate-limit", "100").code == USAGE
    assert cli(gateway, "tokens", "edit", created["id"], "--quota", "5/week").code == USAGE
    assert cli(gateway, "tokens", "edit", created["id"], "--burst", "5").code == USAGE
    zero = cli(gateway, "tokens", "edit", created["id"], "--rate-limit", "0/60s")
    assert zero.code == REFUSED and "400 invalid_rate_limit" in zero.err and "rate_limit.requests" in zero.err


def test_rotate_shows_the_new_token_once_and_the_old_one_stops(gateway: Gateway) -> None:
    created = _create(gateway, "to rotate")
    run = cli(gateway, "tokens", "rotate", created["id"])
    assert run.code == OK
    tokens = _secret_lines(run.out, "gw_")
    assert len(tokens) == 1 and tokens[0] != created["token"] and "shown only this once" in run.out
    assert gateway.proxy(created["token"]) == (401, "invalid_token")
    assert gateway.proxy(tokens[0]) == (200, None)

    graced = cli(gateway, "tokens", "rotate", created["id"], "--grace-seconds", "600", "--json").json()
    assert graced["previous_secret_expires_at"] is not None and graced["id"] == created["id"]
    assert gateway.proxy(tokens[0]) == (200, None)  # the previous secret, during its grace period
    assert gateway.proxy(graced["token"]) == (200, None)

    for _ in range(600):  # bounded: the proxy writes uses every usage_flush_interval (0.1 s here)
        shown = cli(gateway, "tokens", "show", created["id"], "--json").json()
        if shown["previous_secret"]["uses"] == 1:
            break
        time.sleep(0.05)
    assert shown["previous_secret"]["last_used_ip"] == "127.0.0.1"
    assert "previous_secret" in cli(gateway, "tokens", "show", created["id"]).out
    ended = cli(gateway, "tokens", "end-grace", created["id"])
    assert ended.code == OK and "previous_secret_expires_at" in ended.out
    assert gateway.proxy(tokens[0]) == (401, "invalid_token")
    assert gateway.proxy(graced["token"]) == (200, None)
    again = cli(gateway, "tokens", "end-grace", created["id"])
    assert again.code == REFUSED and "409 no_grace" in again.err


def test_disable_enable_delete_as_the_proxy_sees_them(gateway: Gateway) -> None:
    created = _create(gateway, "lifecycle")
    token_id, token = created["id"], created["token"]
    disabled = cli(gateway, "tokens", "disable", token_id)
    assert disabled.code == OK and "disabled" in disabled.out
    assert gateway.proxy(token) == (401, "token_disabled")
    assert cli(gateway, "tokens", "enable", token_id, "--json").json()["status"] == "enabled"
    assert gateway.proxy(token) == (200, None)

    deleted = cli(gateway, "tokens", "delete", token_id)
    assert (deleted.code, deleted.out) == (OK, f"Deleted token {token_id}.\n")
    assert gateway.proxy(token) == (401, "invalid_token")
    for command in ("show", "delete", "enable"):
        gone = cli(gateway, "tokens", command, token_id)
        assert gone.code == NOT_FOUND and "404 token_not_found" in gone.err


def test_audit_shows_each_change_to_a_token(gateway: Gateway) -> None:
    token_id = _create(gateway, "audited")["id"]
    cli(gateway, "tokens", "rotate", token_id, "--grace-seconds", "5")
    events = cli(gateway, "tokens", "audit", token_id, "--json").json()
    assert [event["action"] for event in events["items"]] == ["token.rotate", "token.create"]
    assert events["items"][0]["details"] == {"grace_seconds": 5}
    table = cli(gateway, "tokens", "audit", "--limit", "3")
    assert table.code == OK and table.out.split()[:2] == ["AT", "ACTION"] and "token.rotate" in table.out


def test_admin_keys_create_once_whoami_list_and_delete(gateway: Gateway) -> None:
    made = cli(gateway, "admin-keys", "create", "--name", "Security auditor", "--role", "viewer")
    assert made.code == OK
    keys = _secret_lines(made.out, "gwadm_")
    assert len(keys) == 1 and made.out.count(keys[0]) == 1 and "shown only this once" in made.out
    key_id = keys[0].split("_")[1]

    whoami = cli(gateway, "admin-keys", "whoami", "--json", key=keys[0]).json()
    assert (whoami["id"], whoami["role"]) == (key_id, "viewer")
    assert cli(gateway, "tokens", "list", key=keys[0]).code == OK
    refused = cli(gateway, "tokens", "create", "--name", "x", "--access-level", "read_only", key=keys[0])
    assert refused.code == DENIED and "403 insufficient_role" in refused.err

    listed = cli(gateway, "admin-keys", "list", "--json").json()["items"]
    assert {"bootstrap", key_id} <= {item["id"] for item in listed} and "key" not in listed[0]
    assert keys[0] not in cli(gateway, "admin-keys", "list").out

    assert cli(gateway, "admin-keys", "delete", key_id).code == OK
    stale = cli(gateway, "admin-keys", "whoami", key=keys[0])
    assert stale.code == DENIED and "401 invalid_admin_key" in stale.err
    assert cli(gateway, "admin-keys", "delete", key_id).code == NOT_FOUND
    last = cli(gateway, "admin-keys", "delete", "bootstrap", "--json")
    assert (
        last.code == REFUSED and "409 last_admin_key" in last.err and last.json()["code"] == "last_admin_key"
    )


def test_exit_codes_for_refusals_usage_and_an_unreachable_api(gateway: Gateway) -> None:
    bad = cli(
        gateway,
        "tokens",
        "create",
        "--name",
        "x",
        "--access-level",
        "read_only",
        "--allowed-ip-range",
        "10.0.0.0/33",
    )
    assert bad.code == REFUSED and "400 invalid_ip_range" in bad.err and "allowed_ip_ranges" in bad.err

    assert cli(gateway, "tokens", "list", key=None).code == USAGE
    assert cli(gateway, "tokens", "create", "--name", "x").code == USAGE  # --access-level is required
    assert cli(gateway, "tokens", "list", "--status", "sleeping").code == USAGE
    assert cli(gateway, "tokens", "list", url="ftp://127.0.0.1").code == USAGE

    refused = cli(gateway, "tokens", "list", url=f"http://127.0.0.1:{_free_port()}")
    assert refused.code == UNREACHABLE and "cannot reach the admin API" in refused.err
    proxy = cli(gateway, "tokens", "list", url=gateway.proxy_url)
    assert proxy.code == DENIED and "is it the admin API's port?" in proxy.err
    wrong = cli(gateway, "tokens", "list", key="not-the-admin-key-0123456789")
    assert wrong.code == DENIED and "401 invalid_admin_key" in wrong.err


def test_admin_key_flag_works_and_help_prefers_the_variable(gateway: Gateway) -> None:
    flagged = cli(gateway, "admin-keys", "whoami", "--admin-key", ADMIN_KEY, "--json", key=None)
    assert flagged.code == OK and flagged.json()["id"] == "bootstrap"
    help_text = cli(gateway, "tokens", "list", "--help", key=None)
    assert help_text.code == OK
    assert (
        "GATEWAY_ADMIN_KEY" in help_text.out
        and "visible to" in help_text.out
        and "exit codes" in help_text.out
    )


def test_help_of_every_admin_command_describes_each_flag_and_its_variable() -> None:
    from gateway.cli import build_parser

    def leaves(parser: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
        actions = [action for action in parser._actions if action.__class__.__name__ == "_SubParsersAction"]
        if not actions:
            yield path, parser
        for action in actions:
            for name, sub in action.choices.items():
                if path or name in ("tokens", "admin-keys"):
                    yield from leaves(sub, (*path, name))

    found = dict(leaves(build_parser(), ()))
    assert set(found) == {
        ("tokens", name)
        for name in (
            "create", "list", "show", "edit", "rotate", "end-grace", "disable", "enable", "delete", "usage", "audit"
        )
    } | {("admin-keys", name) for name in ("create", "list", "delete", "whoami")}
    for path, parser in found.items():
        text = parser.format_help()
        for variable in ("GATEWAY_ADMIN_URL", "GATEWAY_ADMIN_KEY", "GATEWAY_ADMIN_CA_FILE"):
            assert variable in text, (path, variable)
        for action in parser._actions:
            assert action.help, (path, action.option_strings or action.dest)


def test_an_admin_command_loads_neither_plane() -> None:
    """`gateway tokens ...` is an HTTP client: uvloop, Redis, the store's core and both apps stay unloaded.

    (aiohttp itself is loaded, through gateway.settings -> request_target -> problems.)"""
    program = (
        "import sys\n"
        "from gateway.cli import main\n"
        "try:\n"
        "    main(['tokens', 'list', '--admin-url', 'http://127.0.0.1:9'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 3, exit.code\n"
        "planes = {'uvloop', 'redis', 'admin_api'}\n"
        "core = {'gateway.core', 'gateway.proxy_app', 'gateway.http_server'}\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in planes or name in core))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=_environment(GATEWAY_ADMIN_KEY=ADMIN_KEY),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout) == (0, "[]\n"), done.stderr
