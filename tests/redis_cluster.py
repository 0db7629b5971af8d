"""A real Redis Cluster for tests: three masters and three replicas, ``redis-server`` processes on free
loopback ports (``cluster-enabled yes``, no persistence, a 1 s ``cluster-node-timeout`` so that a
failover takes seconds, not the default's 15+), joined by ``redis-cli --cluster create``."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.cluster import RedisCluster

MASTERS = 3
REPLICAS_PER_MASTER = 1
NODE_TIMEOUT_MS = 1000
START_TIMEOUT_S = 60.0


# A node also listens on its port + 10000 (the cluster bus), so ports stay at or below 55535.
PORT_RANGE = (20_000, 45_000)
BUS_OFFSET = 10_000


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n ports whose cluster-bus ports are free too (an ephemeral port may exceed 55535)."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(*PORT_RANGE)
        if port not in ports and port_free(port) and port_free(port + BUS_OFFSET):
            ports.append(port)
    return ports


@dataclass
class Cluster:
    ports: list[int]
    directory: Path
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def client(self) -> RedisCluster:
        """A cluster client that starts from a node still running (the first may have been killed)."""
        alive = next(port for port in self.ports if port in self.processes)
        return RedisCluster(host="127.0.0.1", port=alive, socket_timeout=5.0)

    def start_node(self, port: int) -> None:
        node_dir = self.directory / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        command = [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--save", "", "--appendonly", "no",
            # A replica may take over however long it lost its master (the default refuses after
            # 10 node timeouts, which a test cluster reaches while its replicas still sync).
            "--cluster-replica-validity-factor", "0",
            # The other masters keep serving their slots while one is failing over (the default
            # answers CLUSTERDOWN everywhere until every slot is covered again).
            "--cluster-require-full-coverage", "no",
            "--daemonize", "no", "--loglevel", "warning",
        ]  # fmt: skip
        log_file = node_dir / "redis.log"
        with log_file.open("ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.processes[port] = process

        def up() -> bool:
            if process.poll() is not None:
                del self.processes[port]
                reason = log_file.read_text(errors="replace").strip().splitlines()[-1:]
                raise NodeExitedError(f"redis-server on {port} exited at start: {reason}")
            return answers(port)

        wait_for(up, f"redis-server on {port} did not start")

    def masters(self) -> list[int]:
        """Ports of the nodes that are masters now."""
        found = []
        for port in self.ports:
            if port in self.processes and self.processes[port].poll() is None:
                role = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0).execute_command("ROLE")
                if role[0] in (b"master", "master"):
                    found.append(port)
        return found

    def kill(self, port: int) -> None:
        """SIGKILL one node: no shutdown, no goodbye to the cluster."""
        process = self.processes.pop(port)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def replicas_synced(self) -> bool:
        """Every replica has a live link to its master (cluster_state:ok says nothing of replication)."""
        for port in self.processes:
            info = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0).info("replication")
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def healthy(self) -> bool:
        for port in self.processes:
            try:
                node = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0)
                info = node.execute_command("CLUSTER INFO")
            except redis.RedisError:
                return False
            # redis-py parses CLUSTER INFO into a dict; older versions return the raw text.
            state = info.get("cluster_state") if isinstance(info, dict) else info
            if state not in ("ok", b"ok") and "cluster_state:ok" not in str(state):
                return False
        return True

    def stop(self) -> None:
        for process in self.processes.values():
            process.send_signal(signal.SIGKILL)
        for process in self.processes.values():
            process.wait(timeout=10)
        self.processes.clear()


def answers(port: int) -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def wait_for(condition: object, message: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(0.1)


def cluster_tools_missing() -> str | None:
    missing = [tool for tool in ("redis-server", "redis-cli") if shutil.which(tool) is None]
    return f"{', '.join(missing)} not installed" if missing else None


class NodeExitedError(RuntimeError):
    """A node's process ended before it answered: most often its port or bus port was taken between
    ``free_ports``'s check and the server's bind (another process's outgoing connection)."""


def started_cluster(directory: Path, attempts: int = 3) -> Cluster:
    """Every node of a new cluster answering, on fresh ports again when a node could not bind."""
    for attempt in range(attempts):
        cluster = Cluster(free_ports(MASTERS * (1 + REPLICAS_PER_MASTER)), directory / f"attempt-{attempt}")
        try:
            for port in cluster.ports:
                cluster.start_node(port)
        except NodeExitedError:
            cluster.stop()
            if attempt < attempts - 1:
                continue
            raise
        return cluster
    raise ValueError(f"attempts must be >= 1, got {attempts}")


@contextmanager
def running_cluster(directory: Path) -> Iterator[Cluster]:
    cluster = started_cluster(directory)
    try:
        create = [
            "redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in cluster.ports),
            "--cluster-replicas", str(REPLICAS_PER_MASTER), "--cluster-yes",
        ]  # fmt: skip
        subprocess.run(create, check=True, capture_output=True, timeout=60)
        wait_for(cluster.healthy, "the cluster did not reach cluster_state:ok")
        wait_for(cluster.replicas_synced, "the replicas did not finish their first sync")
        yield cluster
    finally:
        cluster.stop()
