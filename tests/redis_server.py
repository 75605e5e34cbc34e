"""A real redis-server for the suite, on a free loopback port, started and stopped by the tests themselves."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        wrapper: tuple[str, ...] = (),
        password: str | None = None,
        replica_of: int | None = None,
    ) -> None:
        """`wrapper` prefixes the server's command (`ip netns exec NS` runs it on another namespace's host);
        beyond loopback, Redis answers only with a `password`. `replica_of` makes it a replica of that port."""
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed: run scripts/test, which installs it")
        self.executable = executable
        self.directory = directory
        self.port = port or free_port()
        self.host = host
        self.wrapper = wrapper
        self.password = password
        self.replica_of = replica_of
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        secret = f":{self.password}@" if self.password else ""
        return f"redis://{secret}{self.host}:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                *self.wrapper,
                self.executable,
                "--port", str(self.port),
                "--bind", self.host,
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--protected-mode", "yes",
                *(("--requirepass", self.password, "--masterauth", self.password) if self.password else ()),
                *(("--replicaof", "127.0.0.1", str(self.replica_of)) if self.replica_of else ()),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(
            host=self.host, port=self.port, password=self.password, socket_connect_timeout=0.2
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait()


SERVICE = "gateway-primary"


class SentinelSet:
    """A primary, one replica and `count` redis-sentinel processes watching them, quick to fail over: a primary
    that does not answer for half a second is down, and a majority of the sentinels promotes the replica."""

    def __init__(self, directory: Path, *, count: int = 3, password: str | None = None) -> None:
        executable = shutil.which("redis-sentinel")
        if executable is None:
            raise RuntimeError("redis-sentinel is not installed: run scripts/test, which installs it")
        self.executable = executable
        self.directory = directory
        self.password = password
        self.primary = RedisServer(directory / "primary", password=password)
        self.replica = RedisServer(directory / "replica", password=password, replica_of=self.primary.port)
        self.ports = [free_port() for _ in range(count)]
        self.processes: list[subprocess.Popen[bytes]] = []

    def url(self, *, extra_hosts: tuple[str, ...] = ()) -> str:
        credentials = f":{self.password}@" if self.password else ""
        hosts = ",".join([*extra_hosts, *(f"127.0.0.1:{port}" for port in self.ports)])
        return f"redis+sentinel://{credentials}{hosts}/{SERVICE}/0"

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        _poll(self._replica_synced, "the replica never synced")
        quorum = len(self.ports) // 2 + 1
        for port in self.ports:
            directory = self.directory / f"sentinel-{port}"
            directory.mkdir(parents=True)
            config = directory / "sentinel.conf"  # sentinel rewrites its own config file: one each
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} {quorum}\n"
                f"sentinel down-after-milliseconds {SERVICE} 500\n"
                f"sentinel failover-timeout {SERVICE} 2000\n"
                + (f"sentinel auth-pass {SERVICE} {self.password}\n" if self.password else "")
            )
            self.processes.append(
                subprocess.Popen(
                    [self.executable, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        # Failover needs every sentinel to know the replica and a quorum of its peers.
        _poll(
            lambda: all(
                int(state["num-slaves"]) >= 1 and int(state["num-other-sentinels"]) >= len(self.ports) - 1
                for state in (self._state(port) for port in self.ports)
            ),
            "the sentinels never saw the replica and each other",
        )

    def primary_port(self) -> int:
        with redis.Redis(port=self.ports[0], socket_connect_timeout=0.2) as client:
            _, port = client.sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def kill_primary_and_wait_for_promotion(self) -> None:
        self.primary.kill()
        _poll(
            lambda: all(self._promoted(port) for port in self.ports)
            and self._info(self.replica.port).get("role") == "master",
            "the replica was never promoted",
            timeout=60,
        )

    def _replica_synced(self) -> bool:
        return self._info(self.replica.port).get("master_link_status") == "up"

    def _promoted(self, port: int) -> bool:
        with redis.Redis(port=port, socket_connect_timeout=0.2) as client:
            _, primary = client.sentinel_get_master_addr_by_name(SERVICE)
        return int(primary) == self.replica.port

    def _state(self, port: int) -> dict[str, str]:
        with redis.Redis(port=port, socket_connect_timeout=0.2, decode_responses=True) as client:
            return dict(client.sentinel_master(SERVICE))

    def _info(self, port: int) -> dict[str, object]:
        with redis.Redis(port=port, password=self.password, socket_connect_timeout=0.2) as client:
            return dict(client.info("replication"))

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        self.replica.kill()
        self.primary.kill()


def _poll(check: Callable[[], bool], failure: str, *, timeout: float = 30) -> None:
    """Wait for a state outside the test's control (replication, a sentinel's view), bounded."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.ConnectionError, redis.ResponseError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(failure)
        time.sleep(0.05)


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = random.randint(20000, 30000)
        try:
            with socket.socket() as first, socket.socket() as bus:
                first.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterNodeServer(RedisServer):
    """One redis-server in cluster mode, its node table in its own directory."""

    def __init__(self, directory: Path, *, password: str | None = None, node_timeout_ms: int = 500) -> None:
        super().__init__(directory, free_cluster_port(), password=password)
        self.node_timeout_ms = node_timeout_ms

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port", str(self.port),
                "--bind", self.host,
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.directory / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # A replica promotes itself however long its link to the primary was down before.
                "--cluster-replica-validity-factor", "0",
                *(("--requirepass", self.password, "--masterauth", self.password) if self.password else ()),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _poll(lambda: self.client().ping(), "a cluster node did not start", timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=self.host, port=self.port, password=self.password, socket_connect_timeout=0.2,
            socket_timeout=1, decode_responses=True,
        )

    def command(self, *args: str) -> object:
        with self.client() as client:
            return client.execute_command(*args)


class RedisClusterSet:
    """A real Redis Cluster: three primaries and one replica each (`redis-cli --cluster create`), quick to fail
    over: a node that does not answer for half a second is failing, and its replica takes its slots."""

    def __init__(self, directory: Path, *, password: str | None = None, primaries: int = 3) -> None:
        self.directory = directory
        self.password = password
        self.nodes = [
            ClusterNodeServer(directory / f"node-{index}", password=password) for index in range(primaries * 2)
        ]

    def url(self, *, count: int | None = None) -> str:
        credentials = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.live_nodes()[:count])
        return f"redis+cluster://{credentials}{hosts}/"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                "redis-cli",
                *(("-a", self.password, "--no-auth-warning") if self.password else ()),
                "--cluster", "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas", "1",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        self.wait_until_healthy()

    def live_nodes(self) -> list[ClusterNodeServer]:
        return [node for node in self.nodes if node.process is not None and node.process.poll() is None]

    def role(self, node: ClusterNodeServer) -> str:
        return str(node.command("ROLE")[0])  # type: ignore[index]

    def primaries(self) -> list[ClusterNodeServer]:
        return [node for node in self.live_nodes() if self.role(node) == "master"]

    def replica_of(self, primary: ClusterNodeServer) -> ClusterNodeServer:
        for node in self.live_nodes():
            if self.role(node) == "slave" and int(node.command("ROLE")[2]) == primary.port:  # type: ignore[index]
                return node
        raise RuntimeError(f"the primary on port {primary.port} has no live replica")

    def owner_of(self, key: str) -> ClusterNodeServer:
        """The primary serving `key`'s slot now."""
        first = self.live_nodes()[0]
        slot = int(first.command("CLUSTER", "KEYSLOT", key))  # type: ignore[call-overload]
        for start, end, owner, *_ in first.command("CLUSTER", "SLOTS"):  # type: ignore[union-attr]
            if start <= slot <= end:
                return next(node for node in self.nodes if node.port == int(owner[1]))
        raise RuntimeError(f"no node serves slot {slot}")

    def subscribers(self, channel: str) -> list[ClusterNodeServer]:
        """The nodes where a client is subscribed to `channel` (PUBSUB NUMSUB counts one node's own)."""
        return [node for node in self.live_nodes() if int(node.command("PUBSUB", "NUMSUB", channel)[1]) > 0]  # type: ignore[index]

    def wait_until_healthy(self, *, timeout: float = 60) -> None:
        """Every live node says cluster_state:ok, every slot is served by a live primary, and every live
        replica is in sync with its primary."""

        def healthy() -> bool:
            live = {node.port for node in self.live_nodes()}
            for node in self.live_nodes():
                if self.role(node) == "slave" and node.command("ROLE")[3] != "connected":  # type: ignore[index]
                    return False
                info = str(node.command("CLUSTER", "INFO"))
                if "cluster_state:ok" not in info:
                    return False
                slots = node.command("CLUSTER", "SLOTS")
                if sum(end - start + 1 for start, end, *_ in slots) != 16384:  # type: ignore[union-attr]
                    return False
                if any(int(owner[1]) not in live for _, _, owner, *_ in slots):  # type: ignore[union-attr]
                    return False
            return True

        _poll(healthy, "the cluster never reached cluster_state:ok", timeout=timeout)

    def kill_and_wait_for_promotion(self, primary: ClusterNodeServer) -> ClusterNodeServer:
        """Kill a primary; its replica is promoted and every live node agrees. Returns the promoted one."""
        replica = self.replica_of(primary)
        primary.kill()
        _poll(lambda: self.role(replica) == "master", "the replica was never promoted", timeout=60)
        self.wait_until_healthy()
        return replica

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
