"""The API Access page, in the machine's Chromium driven by Playwright, against both real planes.

What the page does is checked where it shows: in the page (by accessible names, as a person or a screen reader
finds things) and at the proxy (a token copied out of the page works, or stops working, as the page said).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    Response,
    async_playwright,
    expect,
)

from admin_api.page_routes import CONTENT_SECURITY_POLICY
from tests.admin_api.conftest import rfc3339, token_view
from tests.conftest import ADMIN_KEY, Gateway, GatewayFactory, SettableClock, eventually

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_FOLDER = Path(__file__).resolve().parents[2] / "admin_api" / "page"
# Screenshots go to a temporary folder; UPDATE_DOCS_IMAGES=1 writes the README's images in docs/images.
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
TIMEOUT_MS = 5000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        # scripts/test installs it, so in CI a missing browser is a broken set-up, never a quiet skip.
        message = f"no Chromium at {CHROMIUM}: install it with 'apt-get install -y chromium'"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        await browser.close()


@dataclass
class Tab:
    """One browser tab on the admin port, and everything it said or fetched along the way."""

    page: Page
    context: BrowserContext
    origin: str
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "400 POST /v1/tokens": answers of 400 and above

    def token_row(self, name: str) -> Locator:
        return self.page.get_by_role("row").filter(has=self.page.get_by_role("link", name=name, exact=True))

    async def open_menu_item(self, token_name: str, item: str) -> None:
        await self.token_row(token_name).get_by_role("button", name="Actions").click()
        await self.page.get_by_role("menuitem", name=item, exact=True).click()

    async def confirm(self, dialog_name: str, button: str) -> None:
        await (
            self.page.get_by_role("dialog", name=dialog_name)
            .get_by_role("button", name=button, exact=True)
            .click()
        )

    def assert_quiet_and_local(self, *secrets: str, refused: tuple[str, ...] = ()) -> None:
        """No script error or CSP refusal, no request refused but those expected, nothing fetched from
        elsewhere, no secret in the console."""
        assert self.errors == [], self.errors
        assert self.refused == list(refused), self.refused
        assert all(url.startswith(self.origin + "/") for url in self.requested), self.requested
        assert not [line for line in self.console if any(secret in line for secret in secrets)]


def is_error(message: ConsoleMessage) -> bool:
    # Chromium reports every 4xx answer as a console error too; those are counted apart, in `refused`.
    return message.type == "error" and not message.text.startswith("Failed to load resource")


def refusal(response: Response) -> str:
    return f"{response.status} {response.request.method} {urlsplit(response.url).path}"


async def open_tab(browser: Browser, gateway: Gateway, *, width: int = 1280, height: int = 800) -> Tab:
    origin = f"http://127.0.0.1:{gateway.admin.server.port}"
    context = await browser.new_context(viewport={"width": width, "height": height}, base_url=origin)
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    tab = Tab(page, context, origin)
    page.on("console", lambda message: tab.console.append(f"{message.type}: {message.text}"))
    page.on("console", lambda message: tab.errors.append(message.text) if is_error(message) else None)
    page.on("pageerror", lambda error: tab.errors.append(str(error)))
    page.on("request", lambda request: tab.requested.append(request.url))
    page.on(
        "response", lambda response: tab.refused.append(refusal(response)) if response.status >= 400 else None
    )
    await page.goto("/")
    return tab


async def sign_in(tab: Tab, key: str) -> None:
    await tab.page.get_by_label("Admin key").fill(key)
    await tab.page.get_by_role("button", name="Sign in").click()
    await expect(tab.page.get_by_role("heading", name="API Access")).to_be_visible()


async def shown_token(tab: Tab) -> str:
    """The token the page shows once, read from its read-only field; the dialog is then closed."""
    field = tab.page.get_by_role("textbox", name="Token", exact=True)
    await expect(field).to_be_visible()
    await expect(field).not_to_be_editable()
    await expect(tab.page.get_by_role("dialog")).to_contain_text("It will not be shown again")
    token = await field.input_value()
    await tab.page.get_by_role("button", name="Done").click()
    await expect(field).to_be_hidden()
    return token


async def token_named(gateway: Gateway, name: str) -> dict[str, Any]:
    status, body = await gateway.admin_call("GET", "/v1/tokens")
    assert status == 200
    [token] = [item for item in body["items"] if item["name"] == name]
    return dict(token)


async def proxy_status(gateway: Gateway, token: str) -> int:
    response = await gateway.call(token, "/api/posts")
    await response.read()
    status: int = response.status
    return status


async def test_page_is_public_and_served_under_a_strict_policy(gateway: Gateway) -> None:
    page = await gateway.admin.get("/")
    html = await page.text()
    asset = await gateway.admin.get("/page/app.js")
    await asset.read()

    assert page.status == 200 and page.content_type == "text/html"
    assert asset.status == 200 and asset.content_type == "text/javascript"
    for response in (page, asset):
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
    assert not re.search(r"<script(?![^>]*\bsrc=)|<style|\sstyle=|\son[a-z]+=", html), "inline code or style"
    for missing in ("/page/missing.js", "/page/..%2fpage_routes.py", "/page/"):
        assert (await gateway.admin.get(missing)).status in (401, 404), missing


async def test_page_code_never_writes_markup_nor_fetches_from_elsewhere() -> None:
    for path in PAGE_FOLDER.iterdir():
        source = path.read_text()
        if path.suffix == ".js":
            assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", source), (
                path
            )
            # The admin key lives in sessionStorage only, and nothing is logged.
            assert not re.search(r"\blocalStorage\s*[.\[]|\bconsole\s*\.", source), path
        # Only the SVG namespace may look like a URL: no CDN, no web font, no remote image.
        assert set(re.findall(r"https?://[^\s'\")%]+", source)) <= {"http://www.w3.org/2000/svg"}, path


async def test_access_levels_route_lists_the_configured_levels_and_needs_a_key(gateway: Gateway) -> None:
    anonymous = await gateway.admin.get("/v1/access-levels")
    await anonymous.read()
    status, body = await gateway.admin_call("GET", "/v1/access-levels")

    assert anonymous.status == 401
    assert status == 200
    assert [item["name"] for item in body["items"]] == list(gateway.core.settings.access_levels)
    assert all(set(item) == {"name", "description"} and item["description"] for item in body["items"])


async def test_admin_manages_a_token_in_the_page_and_the_proxy_agrees(
    gateway: Gateway, browser: Browser, tmp_path: Path
) -> None:
    # Arrange a realistic overview: one token in use from one address, one disabled with an expiry.
    used = await gateway.create_token(
        name="Intranet news feed", access_level="read_only", allowed_ip_ranges=["127.0.0.1", "10.20.0.0/16"]
    )
    assert await proxy_status(gateway, used["token"]) == 200
    later = datetime.now(UTC) + timedelta(days=45)
    legacy = await gateway.create_token(
        name="Legacy CMS import", access_level="editorial", expires_at=rfc3339(later)
    )
    await gateway.admin_call("POST", f"/v1/tokens/{legacy['id']}/disable")

    async def usage_recorded() -> bool:
        return (await token_view(gateway, used["id"]))["last_used_at"] is not None

    await eventually(usage_recorded)

    tab = await open_tab(browser, gateway)
    page = tab.page
    await sign_in(tab, ADMIN_KEY)
    assert ADMIN_KEY not in page.url
    assert await page.evaluate("localStorage.length") == 0
    assert await page.evaluate("Object.values(sessionStorage)") == [ADMIN_KEY]

    # Filters: by status, and "unused for N days" (the feed was used just now).
    rows = page.get_by_role("table", name="API tokens").locator("tbody tr")
    await page.get_by_label("Status").select_option("disabled")
    await expect(rows).to_have_count(1)
    await expect(rows).to_contain_text("Legacy CMS import")
    await page.get_by_label("Status").select_option("")
    await page.get_by_label("Unused for (days)").fill("1")
    await expect(rows).to_have_count(1)
    await expect(rows).to_contain_text("Legacy CMS import")
    await page.get_by_label("Unused for (days)").fill("")
    await expect(rows).to_have_count(2)

    # Create, reading the token from the page.
    await page.get_by_role("button", name="Create API token").click()
    form = page.get_by_role("dialog", name="Create API token")
    await form.get_by_label("Access level").select_option("managing_editorial")
    await form.get_by_label("Allowed IP ranges").fill("127.0.0.0/8\n::1")
    await form.get_by_label("Expires").fill((datetime.now() + timedelta(days=365)).strftime("%Y-%m-%dT%H:%M"))
    await form.get_by_label("Name").fill("CRM sync")
    images = DOCS_IMAGES if os.environ.get("UPDATE_DOCS_IMAGES") == "1" else tmp_path
    images.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=images / "create-api-token.png")
    await form.get_by_role("button", name="Create", exact=True).click()
    token = await shown_token(tab)
    assert await proxy_status(gateway, token) == 200

    row = tab.token_row("CRM sync")
    await expect(row).to_contain_text("Managing editorial")
    await expect(row).to_contain_text("127.0.0.0/8")
    await expect(row).to_contain_text("Enabled")
    await expect(tab.token_row("Legacy CMS import")).to_contain_text("Disabled")
    await expect(tab.token_row("Intranet news feed")).to_contain_text("from 127.0.0.1")
    await expect(row.get_by_role("cell").nth(5)).to_have_text("never")
    table = await page.get_by_role("table", name="API tokens").bounding_box()
    assert table is not None
    await page.screenshot(
        path=images / "api-access-overview.png",
        clip={"x": 0, "y": 0, "width": 1280, "height": table["y"] + table["height"] + 40},
    )

    # Edit: the same form, filled in, sends only what changed.
    await tab.open_menu_item("CRM sync", "Edit")
    edit = page.get_by_role("dialog", name="Edit API token")
    await expect(edit.get_by_label("Name")).to_have_value("CRM sync")
    await expect(edit.get_by_label("Access level")).to_have_value("managing_editorial")
    await edit.get_by_label("Allowed IP ranges").fill("127.0.0.1")
    await edit.get_by_role("button", name="Save").click()
    await expect(row).to_contain_text("127.0.0.1/32")
    await expect(row).not_to_contain_text("::1/128")
    assert (await token_named(gateway, "CRM sync"))["allowed_ip_ranges"] == ["127.0.0.1/32"]
    assert await proxy_status(gateway, token) == 200

    # Rotate: the old token stops at once (no grace period chosen), the new one works.
    await tab.open_menu_item("CRM sync", "Rotate")
    await tab.confirm("Rotate “CRM sync”?", "Rotate")
    rotated = await shown_token(tab)
    assert rotated != token
    assert await proxy_status(gateway, token) == 401
    assert await proxy_status(gateway, rotated) == 200

    # Disable, then enable.
    await tab.open_menu_item("CRM sync", "Disable")
    await tab.confirm("Disable “CRM sync”?", "Disable")
    await expect(row).to_contain_text("Disabled")
    assert await proxy_status(gateway, rotated) == 401
    await tab.open_menu_item("CRM sync", "Enable")
    await tab.confirm("Enable “CRM sync”?", "Enable")
    await expect(row).to_contain_text("Enabled")
    assert await proxy_status(gateway, rotated) == 200

    # The token's own audit log, reached from its name.
    await row.get_by_role("link", name="CRM sync").click()
    await expect(page.get_by_role("heading", name="Audit log: CRM sync")).to_be_visible()
    events = page.get_by_role("table", name="Audit events of CRM sync").locator("tbody tr")
    await expect(events).to_have_count(5)
    await expect(events.first).to_contain_text("Token enabled")
    await expect(events.last).to_contain_text("Token created")
    await page.get_by_role("link", name="API tokens").click()

    # Delete, after a dialog that names the token.
    await tab.open_menu_item("CRM sync", "Delete")
    await tab.confirm("Delete “CRM sync”?", "Delete")
    await expect(tab.token_row("CRM sync")).to_have_count(0)
    assert await proxy_status(gateway, rotated) == 401
    await page.get_by_role("link", name="Audit log").click()
    await expect(page.get_by_role("table", name="Audit events").locator("tbody tr").first).to_contain_text(
        "Token deleted"
    )

    tab.assert_quiet_and_local(ADMIN_KEY, token, rotated)


async def test_rotation_with_a_grace_period_keeps_the_old_token_working_meanwhile(
    gateway: Gateway, browser: Browser
) -> None:
    old = (await gateway.create_token(name="CRM sync"))["token"]
    tab = await open_tab(browser, gateway)
    await sign_in(tab, ADMIN_KEY)

    await tab.open_menu_item("CRM sync", "Rotate")
    dialog = tab.page.get_by_role("dialog", name="Rotate “CRM sync”?")
    await dialog.get_by_label("Grace period").select_option(label="1 hour")
    await dialog.get_by_role("button", name="Rotate").click()
    new = await shown_token(tab)

    assert await proxy_status(gateway, old) == 200
    assert await proxy_status(gateway, new) == 200
    await expect(tab.token_row("CRM sync")).to_contain_text("previous token works until")
    tab.assert_quiet_and_local(ADMIN_KEY, old, new)


async def test_create_form_checks_ranges_as_typed_and_shows_the_server_answer_by_field(
    gateway: Gateway, browser: Browser
) -> None:
    tab = await open_tab(browser, gateway)
    page = tab.page
    await sign_in(tab, ADMIN_KEY)
    await page.get_by_role("button", name="Create API token").click()
    form = page.get_by_role("dialog", name="Create API token")
    ranges = form.get_by_label("Allowed IP ranges")

    await ranges.fill("10.0.0.0/8\n10.0.0.300")
    await expect(ranges).to_have_attribute("aria-invalid", "true")
    await expect(ranges).to_have_accessible_description(
        re.compile("Line 2: “10.0.0.300” is not an IPv4/IPv6")
    )
    await ranges.fill("\n".join(f"10.0.{i}.0/24" for i in range(101)))  # valid lines, but too many
    await expect(ranges).not_to_have_attribute("aria-invalid", "true")
    await form.get_by_label("Name").fill("Too many ranges")
    await form.get_by_label("Access level").select_option("read_only")
    await form.get_by_role("button", name="Create", exact=True).click()

    await expect(ranges).to_have_accessible_description(
        re.compile("At most 100 IP ranges are allowed per token")
    )
    await expect(ranges).to_be_focused()
    status, body = await gateway.admin_call("GET", "/v1/tokens")
    assert status == 200 and body["items"] == []
    tab.assert_quiet_and_local(ADMIN_KEY, refused=("400 POST /v1/tokens",))


async def test_menu_and_dialogs_work_with_the_keyboard_alone(gateway: Gateway, browser: Browser) -> None:
    await gateway.create_token(name="CRM sync")
    tab = await open_tab(browser, gateway)
    page = tab.page
    keyboard = page.keyboard
    await expect(page.get_by_label("Admin key")).to_be_focused()
    await keyboard.type(ADMIN_KEY)
    await keyboard.press("Enter")
    actions = tab.token_row("CRM sync").get_by_role("button", name="Actions")
    await actions.focus()

    await keyboard.press("Enter")
    menu = page.get_by_role("menu")
    await expect(menu.get_by_role("menuitem", name="Edit")).to_be_focused()
    await keyboard.press("ArrowDown")
    await expect(menu.get_by_role("menuitem", name="Rotate")).to_be_focused()
    await keyboard.press("End")
    await expect(menu.get_by_role("menuitem", name="Delete")).to_be_focused()
    await keyboard.press("ArrowDown")
    await expect(menu.get_by_role("menuitem", name="Edit")).to_be_focused()
    await keyboard.press("Escape")
    await expect(menu).to_be_hidden()
    await expect(actions).to_be_focused()

    await keyboard.press("Space")
    await keyboard.press("ArrowUp")
    await expect(menu.get_by_role("menuitem", name="Delete")).to_be_focused()
    await keyboard.press("Enter")
    dialog = page.get_by_role("dialog", name="Delete “CRM sync”?")
    await expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()
    for _ in range(3):  # Cancel -> Delete -> back to Cancel: focus never leaves the dialog
        await keyboard.press("Tab")
    await expect(dialog.get_by_role("button", name="Delete")).to_be_focused()
    await keyboard.press("Shift+Tab")
    await expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()
    await keyboard.press("Escape")
    await expect(dialog).to_be_hidden()
    await expect(actions).to_be_focused()
    await keyboard.press("ArrowUp")
    await keyboard.press("Enter")
    await expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()
    await keyboard.press("Enter")
    await expect(dialog).to_be_hidden()
    await expect(actions).to_be_focused()
    status, body = await gateway.admin_call("GET", "/v1/tokens")
    assert status == 200 and [item["name"] for item in body["items"]] == ["CRM sync"]
    tab.assert_quiet_and_local(ADMIN_KEY)


async def test_page_fits_a_360_pixel_wide_screen(gateway: Gateway, browser: Browser) -> None:
    await gateway.create_token(
        name="A token with a rather long name for a phone",
        allowed_ip_ranges=["2001:db8:1234:5678::/64", "10.0.0.0/8"],
    )
    tab = await open_tab(browser, gateway, width=360, height=740)
    page = tab.page
    await sign_in(tab, ADMIN_KEY)
    await expect(tab.token_row("A token with a rather long name for a phone")).to_contain_text(
        "2001:db8:1234:5678::/64"
    )

    assert await page.evaluate("document.documentElement.scrollWidth") <= 360
    await tab.open_menu_item("A token with a rather long name for a phone", "Edit")
    dialog = page.get_by_role("dialog", name="Edit API token")
    box = await dialog.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360
    tab.assert_quiet_and_local(ADMIN_KEY)


async def test_viewer_sees_tokens_but_no_action_menus(gateway: Gateway, browser: Browser) -> None:
    await gateway.create_token(name="CRM sync")
    status, created = await gateway.admin_call(
        "POST", "/v1/admin-keys", json={"name": "Auditor", "role": "viewer"}
    )
    assert status == 201, created
    tab = await open_tab(browser, gateway)
    page = tab.page

    await sign_in(tab, created["key"])

    await expect(tab.token_row("CRM sync")).to_contain_text("Enabled")
    await expect(page.get_by_text("You are signed in with a viewer key")).to_be_visible()
    await expect(page.get_by_role("button", name="Actions")).to_have_count(0)
    await expect(page.get_by_role("button", name="Create API token")).to_have_count(0)
    await page.get_by_role("link", name="Audit log").click()
    await expect(page.get_by_role("table", name="Audit events").locator("tbody tr").first).to_contain_text(
        "Admin key created"
    )
    tab.assert_quiet_and_local(ADMIN_KEY, created["key"])


async def test_usage_chart_and_the_24_hour_column_show_the_counted_requests(
    start_gateway: GatewayFactory, browser: Browser, tmp_path: Path
) -> None:
    """Requests spread over the week by the gateway's clock: the list shows the last 24 hours' count, and the
    chart one bar per hour (168) or per day (90), each bar as tall as its count."""
    clock = SettableClock()
    now = clock.now
    gateway = await start_gateway(clock=clock)
    token = await gateway.create_token(name="CRM sync", access_level="read_only")
    idle = await gateway.create_token(name="Nightly export")
    sent = 0
    for hours_ago in range(0, 7 * 24, 5):
        clock.now = now - timedelta(hours=hours_ago)
        for _ in range(1 + hours_ago % 4):
            assert (await gateway.call(token["token"])).status == 200
            sent += 1
        if hours_ago % 15 == 0:
            assert (await gateway.call(token["token"], method="DELETE")).status == 403
            sent += 1
    clock.now = now
    await gateway.core.usage.flush()
    last_day = (await gateway.admin_call("GET", "/v1/tokens"))[1]["items"]
    in_24h = {item["name"]: item["requests_24h"] for item in last_day}
    assert in_24h == {"CRM sync": 1 + 1 + 2 + 3 + 4 + 1 + 1, "Nightly export": 0}  # 0, 5, 10, 15, 20 h ago

    tab = await open_tab(browser, gateway)
    page = tab.page
    await sign_in(tab, ADMIN_KEY)
    await expect(page.get_by_role("columnheader", name="Requests (24 h)")).to_be_visible()
    await expect(tab.token_row("Nightly export")).to_contain_text("0")
    usage_button = tab.token_row("CRM sync").get_by_role(
        "button", name="Usage of CRM sync: 13 requests in the last 24 hours"
    )
    await usage_button.click()

    dialog = page.get_by_role("dialog", name="Usage of “CRM sync”")
    await expect(dialog).to_be_visible()
    chart = dialog.get_by_role("img")
    await expect(chart).to_have_accessible_name(re.compile(rf"^{sent} requests in the last 7 days, per hour"))
    bars = dialog.locator(".usage-bar")
    await expect(bars).to_have_count(168)
    totals = [int(value) for value in await bars.evaluate_all("bars => bars.map(b => b.dataset.total)")]
    assert totals[-1] == 2 and totals[-2:-5:-1] == [0, 0, 0] and totals[-6] == 2 and totals[-16] == 5
    assert sum(totals) == sent
    # Bar heights follow the counts: the busiest hour's bar is the tallest, an empty hour has none.
    heights = await bars.evaluate_all(
        "bars => bars.map(b => [...b.querySelectorAll('rect')].reduce((s, r) => s + r.height.baseVal.value, 0))"
    )
    assert heights[totals.index(max(totals))] == max(heights) and heights[-2] == 0
    assert await bars.last.locator("rect.usage-refused_level").count() == 1
    await expect(dialog).to_contain_text("Allowed: ")
    await expect(dialog).to_contain_text(f"Refused: access level: {sum(1 for h in range(0, 168, 5) if h % 15 == 0)}")
    images = DOCS_IMAGES if os.environ.get("UPDATE_DOCS_IMAGES") == "1" else tmp_path
    await dialog.screenshot(path=images / "usage-chart.png")

    await dialog.get_by_role("button", name="Last 90 days, per day").click()
    await expect(chart).to_have_accessible_name(re.compile(rf"^{sent} requests in the last 90 days, per day"))
    await expect(bars).to_have_count(90)
    daily = [int(value) for value in await bars.evaluate_all("bars => bars.map(b => b.dataset.total)")]
    assert sum(daily) == sent and daily[:82] == [0] * 82
    await dialog.get_by_role("button", name="Close").click()
    await expect(usage_button).to_be_focused()
    tab.assert_quiet_and_local(ADMIN_KEY, token["token"])


async def test_page_shows_the_previous_secrets_last_use_and_ends_the_grace(
    start_gateway: GatewayFactory, browser: Browser
) -> None:
    clock = SettableClock()
    gateway = await start_gateway(clock=clock)
    created = await gateway.create_token(name="CRM sync")
    status, rotated = await gateway.admin_call(
        "POST", f"/v1/tokens/{created['id']}/rotate", json={"grace_seconds": 86400}
    )
    assert status == 200
    clock.advance(-180)  # the gateway's clock stamps the use: three minutes before the page looks
    assert (await gateway.call(created["token"])).status == 200
    clock.advance(180)
    await gateway.core.usage.flush()

    tab = await open_tab(browser, gateway)
    page = tab.page
    await sign_in(tab, ADMIN_KEY)
    row = tab.token_row("CRM sync")
    await expect(row).to_contain_text("previous secret last used 3 minutes ago from 127.0.0.1")

    await tab.open_menu_item("CRM sync", "End grace period")
    await tab.confirm("End the grace period of “CRM sync”?", "End grace period")
    await expect(page.get_by_role("status").filter(has_text="no longer works")).to_be_visible()
    await expect(row).not_to_contain_text("previous secret")
    assert (await gateway.call(created["token"])).status == 401
    assert (await gateway.call(rotated["token"])).status == 200
    await tab.token_row("CRM sync").get_by_role("button", name="Actions").click()
    await expect(page.get_by_role("menuitem", name="End grace period")).to_have_count(0)
    tab.assert_quiet_and_local(ADMIN_KEY, created["token"], rotated["token"])


async def test_edit_form_offers_the_recent_addresses_as_allowed_ranges(
    start_gateway: GatewayFactory, browser: Browser
) -> None:
    gateway = await start_gateway(trusted_proxies="127.0.0.1")
    created = await gateway.create_token(name="CRM sync")
    for address, times in (("10.1.2.3", 3), ("10.1.2.4", 1)):
        for _ in range(times):
            assert (await gateway.call(created["token"], headers={"X-Forwarded-For": address})).status == 200
    await gateway.core.usage.flush()

    tab = await open_tab(browser, gateway)
    page = tab.page
    await sign_in(tab, ADMIN_KEY)
    await tab.open_menu_item("CRM sync", "Edit")
    dialog = page.get_by_role("dialog", name="Edit API token")
    await expect(dialog.get_by_role("button", name="Allow 10.1.2.4, used 1 time")).to_be_visible()
    await dialog.get_by_role("button", name="Allow 10.1.2.3, used 3 times").click()
    await expect(dialog.get_by_label("Allowed IP ranges")).to_have_value("10.1.2.3")
    await dialog.get_by_role("button", name="Save").click()
    await expect(dialog).to_be_hidden()

    assert (await token_view(gateway, created["id"]))["allowed_ip_ranges"] == ["10.1.2.3/32"]
    assert (await gateway.call(created["token"], headers={"X-Forwarded-For": "10.1.2.3"})).status == 200
    refused = await gateway.call(created["token"], headers={"X-Forwarded-For": "10.1.2.4"})
    assert (refused.status, (await refused.json())["code"]) == (403, "ip_not_allowed")
    tab.assert_quiet_and_local(ADMIN_KEY, created["token"])


async def test_form_sets_edits_and_clears_a_rate_limit_and_quota(gateway: Gateway, browser: Browser) -> None:
    tab = await open_tab(browser, gateway)
    page = tab.page
    await sign_in(tab, ADMIN_KEY)
    await page.get_by_role("button", name="Create API token").click()
    form = page.get_by_role("dialog", name="Create API token")
    await form.get_by_label("Name").fill("Limited")
    await form.get_by_label("Access level").select_option("read_only")
    await form.get_by_label("Rate limit: requests").fill("100")
    await form.get_by_role("button", name="Create", exact=True).click()
    requests = form.get_by_label("Rate limit: requests")
    await expect(requests).to_have_attribute("aria-invalid", "true")
    await expect(requests).to_have_accessible_description(re.compile("Enter both the number of requests"))

    await form.get_by_label("Rate limit: seconds").fill("60")
    await form.get_by_label("Rate limit: burst").fill("10")
    await form.get_by_label("Quota: requests").fill("5000")
    await form.get_by_label("Quota: period").select_option("month")
    await form.get_by_role("button", name="Create", exact=True).click()
    await shown_token(tab)
    token = await token_named(gateway, "Limited")
    assert token["rate_limit"] == {"requests": 100, "per_seconds": 60, "burst": 10}
    assert token["quota"] == {"requests": 5000, "period": "month"}
    await expect(page.get_by_role("row", name=re.compile("Limited"))).to_contain_text("100 / 60 s (burst 10)")

    await tab.open_menu_item("Limited", "Edit")
    edit = page.get_by_role("dialog", name="Edit API token")
    await expect(edit.get_by_label("Rate limit: burst")).to_have_value("10")
    await edit.get_by_label("Rate limit: requests").fill("")
    await edit.get_by_label("Rate limit: seconds").fill("")
    await edit.get_by_label("Rate limit: burst").fill("")
    await edit.get_by_label("Quota: requests").fill("0")
    await edit.get_by_role("button", name="Save").click()
    await expect(edit.get_by_label("Quota: requests")).to_have_accessible_description(re.compile("whole number"))
    await edit.get_by_label("Quota: requests").fill("7")
    await edit.get_by_label("Quota: period").select_option("total")
    await edit.get_by_role("button", name="Save").click()
    await expect(edit).to_be_hidden()
    token = await token_named(gateway, "Limited")
    assert token["rate_limit"] is None and token["quota"] == {"requests": 7, "period": "total"}
    tab.assert_quiet_and_local(ADMIN_KEY)
