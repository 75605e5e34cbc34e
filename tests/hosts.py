"""Separate hosts on one machine, for tests of a deployment over many hosts.

As root, where the kernel allows it, each host is a network namespace of its own (`ip netns`), joined to the
others by a veth pair on one bridge in a private 10.x.y.0/24 network: a process on one host reaches another
only by its address, as across a LAN, and has no loopback in common with it. The test process itself sits
on the bridge as one more host. Names are random per run, so suites running side by side do not collide,
and everything is removed when the hosts are closed.

Elsewhere (not root, no `ip`, namespaces refused), the hosts are separate loopback addresses (127.0.0.2,
127.0.0.3, ...) on the machine's one network: each process still listens on its own address and has its own
working directory, but a process could reach another's loopback ports. `isolated` says which it is.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    wrapper: tuple[str, ...]
    """Prefix a command with this to run it on the host (empty without namespaces)."""
    directory: Path
    """The host's own working directory."""

    def command(self, *arguments: str) -> list[str]:
        return [*self.wrapper, *arguments]


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, timeout=30)


def namespaces_available() -> bool:
    """Whether this machine lets us make what Hosts makes: a namespace, a bridge, a veth pair into it."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"gwprobe{secrets.token_hex(3)}"
    steps = (
        ("netns", "add", probe),
        ("link", "add", f"{probe}b", "type", "bridge"),
        ("link", "add", f"{probe}v", "type", "veth", "peer", "name", "eth0", "netns", probe),
    )
    try:
        for step in steps:
            _ip(*step)
    except (subprocess.CalledProcessError, OSError):
        return False
    finally:
        for cleanup in (("link", "del", f"{probe}b"), ("link", "del", f"{probe}v"), ("netns", "del", probe)):
            subprocess.run(["ip", *cleanup], capture_output=True, timeout=30, check=False)
    return True


class Hosts:
    """Hosts made on demand by name; `client` is where the test process itself is reached."""

    def __init__(self, directory: Path, *, isolated: bool | None = None) -> None:
        self.directory = directory
        self.isolated = namespaces_available() if isolated is None else isolated
        self._run = secrets.token_hex(3)
        self._hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._bridge = f"gwb{self._run}"
        if self.isolated:
            self._subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
            self.client = f"{self._subnet}.1"
            try:
                _ip("link", "add", self._bridge, "type", "bridge")
                _ip("addr", "add", f"{self.client}/24", "dev", self._bridge)
                _ip("link", "set", self._bridge, "up")
            except BaseException:
                self.close()
                raise
        else:
            self.client = "127.0.0.1"

    def host(self, name: str) -> Host:
        if name in self._hosts:
            return self._hosts[name]
        number = len(self._hosts) + 2
        directory = self.directory / name
        directory.mkdir(parents=True, exist_ok=True)
        if not self.isolated:
            host = Host(name, f"127.0.0.{number}", (), directory)
        else:
            namespace = f"gw{self._run}-{name}"
            outside = f"gw{self._run}h{number}"
            address = f"{self._subnet}.{number}"
            _ip("netns", "add", namespace)
            self._namespaces.append(namespace)
            _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _ip("link", "set", outside, "master", self._bridge, "up")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            host = Host(name, address, ("ip", "netns", "exec", namespace), directory)
        self._hosts[name] = host
        return host

    def close(self) -> None:
        """Remove the namespaces (which takes their veth pairs along) and the bridge."""
        for namespace in self._namespaces:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30, check=False)
        self._namespaces.clear()
        if self.isolated:
            subprocess.run(["ip", "link", "del", self._bridge], capture_output=True, timeout=30, check=False)
