"""schemathesis against the live admin API: no 5xx, and every answer as /openapi.json documents it.

The CLI runs in a subprocess against the app's real port, so its synchronous HTTP client never blocks the
event loop that serves it. The run is bounded (examples per operation, one worker) and deterministic
(`--generation-deterministic`: no randomness, no example database), so a failure reproduces on every machine.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.admin_api.conftest import audit_actions
from tests.conftest import ADMIN_KEY, Gateway

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
MAX_EXAMPLES = 25
RUN_TIMEOUT = 240.0


async def _schemathesis(url: str, *arguments: str, cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        url,
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
        cwd=cwd,  # no schemathesis.toml of the developer's is picked up, and reports land in tmp_path
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, output.decode(errors="replace")


async def test_admin_api_answers_as_its_openapi_document_says(gateway: Gateway, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{gateway.admin.server.port}/openapi.json"
    common = (
        "--checks",
        ",".join(CHECKS),
        "--header",
        f"Authorization: Bearer {ADMIN_KEY}",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--generation-deterministic",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--no-color",
    )

    # Deleting admin keys runs last and alone: once it has deleted the bootstrap key (allowed while another
    # admin key exists), every later request would only see 401.
    code, output = await _schemathesis(url, *common, "--exclude-operation-id", "deleteAdminKey", cwd=tmp_path)
    assert code == 0, output
    # It ran as an admin, not against a wall of 401s: its changes are in the audit log.
    assert {"token.create", "admin_key.create"} <= set(await audit_actions(gateway))
    code, output = await _schemathesis(url, *common, "--include-operation-id", "deleteAdminKey", cwd=tmp_path)
    assert code == 0, output
