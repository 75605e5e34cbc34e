"""The admin API over HTTP, as the command line needs it: one call, its status and its JSON.

urllib rather than aiohttp: a command makes one or a few calls in a row, and starts faster without an event
loop. Proxies from the environment are not used: the admin key goes straight to the admin API.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

USER_AGENT = "gateway-admin-cli"
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class Unreachable(Exception):
    """No answer from the admin API (refused, unknown host, timeout, TLS), or an answer not its own."""


class Refused(Exception):
    """The admin API answered with a problem (4xx or 5xx); `problem` is its JSON body as sent."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.code = str(problem.get("code") or f"http_{status}")
        self.detail = str(problem.get("detail") or "")
        super().__init__(f"{status} {self.code}: {self.detail}")


class AdminClient:
    """Calls one admin API with one admin key. The key is sent in the Authorization header, never shown."""

    def __init__(self, url: str, key: str, *, timeout: float = 30.0, ca_file: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"the admin URL must be http:// or https:// and name a host, not {url!r}")
        self.url = url.rstrip("/")
        self._key = key
        self._timeout = timeout
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if parsed.scheme == "https":
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_file)))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"AdminClient({self.url!r}, key='**********')"

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str | None] | None = None,
    ) -> tuple[int, Any]:
        """(status, JSON body or None for an empty one); raises Refused or Unreachable."""
        target = self.url + path
        params = {name: value for name, value in (query or {}).items() if value is not None}
        if params:
            target += "?" + urllib.parse.urlencode(params)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(target, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self._key}")
        request.add_header("Accept", "application/json, application/problem+json")
        request.add_header("User-Agent", USER_AGENT)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                return response.status, self._json(response.status, response.read(MAX_ANSWER_BYTES))
        except urllib.error.HTTPError as error:
            with error:
                raw = error.read(MAX_ANSWER_BYTES)
            answer = self._json(error.code, raw)
            raise Refused(error.code, answer if isinstance(answer, dict) else {}) from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", None) or error
            raise Unreachable(f"cannot reach the admin API at {self.url}: {reason}") from None

    def _json(self, status: int, raw: bytes) -> Any:
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise Unreachable(
                f"{self.url} answered HTTP {status} with something other than JSON: is it the admin API?"
            ) from None
