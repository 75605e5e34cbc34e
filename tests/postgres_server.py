"""A real PostgreSQL server for the suite: `initdb` into a temporary directory, on a free loopback port.

initdb and postgres refuse to run as root, so when the suite runs as root the cluster belongs to the
`postgres` user (Debian's package creates it) and every server command runs through `runuser`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.redis_server import free_port

SUPERUSER = "gateway"
PASSWORD = "test-postgres-password-0123"


def _bin_directory() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda path: int(Path(path).parent.name.split(".")[0])
    )
    if not candidates:
        raise RuntimeError("PostgreSQL is not installed: run scripts/test, which installs Debian's postgresql")
    return Path(candidates[-1])


class PostgresServer:
    """`durable=False` trades the last commits before a crash for speed; tests that crash the server keep them.
    `host` is the one address it listens on; `wrapper` prefixes every server command (`ip netns exec NS` runs
    it on another network namespace's host)."""

    def __init__(self, *, durable: bool = False, host: str = "127.0.0.1", wrapper: tuple[str, ...] = ()) -> None:
        self.durable = durable
        self.host = host
        self.bin = _bin_directory()
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="gateway-postgres-"))
        self.data = self.directory / "data"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self._as_user = [*wrapper, *self._as_user]

    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql://{SUPERUSER}{secret}@{self.host}:{self.port}/{database}"

    def _run(self, *command: str) -> None:
        result = subprocess.run(
            [*self._as_user, *command], capture_output=True, text=True, timeout=60, cwd=self.directory
        )
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {result.stdout}{result.stderr}")

    def initialise(self) -> None:
        password_file = self.directory / "password"
        password_file.write_text(PASSWORD)
        if self._as_user:
            owner = pwd.getpwnam("postgres")
            os.chown(password_file, owner.pw_uid, owner.pw_gid)
        self._run(
            str(self.bin / "initdb"),
            "-D", str(self.data),
            "-U", SUPERUSER,
            f"--pwfile={password_file}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses={self.host} -c fsync=off"
            " -c full_page_writes=off -c max_connections=200"
        )
        if not self.durable:
            options += " -c synchronous_commit=off"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.directory / "log"),
            "-o", options, "-w", "-t", "30", "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """`fast` closes sessions cleanly; `immediate` is as abrupt as a crash."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.directory, ignore_errors=True)
