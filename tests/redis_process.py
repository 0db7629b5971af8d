"""A private ``redis-server`` for tests: on a loopback port and a directory of its own, to kill, restart
and pause. ``tests/conftest.py`` hands one out as the ``private_redis`` (persistent) and
``volatile_redis`` (no persistence) fixtures."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """A redis-server on a loopback port and a directory of its own, to kill, restart and pause.

    ``persistent``: the append-only file, fsync before every reply, no RDB snapshots, so that a SIGKILL
    and a restart on the same port and directory keep every write Redis acknowledged. Without it (the
    compose file's default Redis) a restart comes back empty, acknowledged writes or not: that is a
    deployment choice, outside the service.
    """

    def __init__(self, executable: str, directory: Path, port: int, persistent: bool = True) -> None:
        self.executable = executable
        self.directory = directory
        self.port = port
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.directory / "redis.log"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5.0, socket_connect_timeout=1.0)

    def start(self, timeout_s: float = 10.0) -> None:
        """Starts (or restarts, on the same port and directory) and returns once PING answers."""
        assert self.process is None or self.process.poll() is not None, "redis-server already runs"
        # No RDB snapshots either way (--save ""): the append-only file is the only persistence.
        appendonly = ["yes", "--appendfsync", "always"] if self.persistent else ["no"]
        command = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", *appendonly,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_file),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited ({self.process.returncode}): {self.log_tail()}")
                try:
                    if probe.ping():  # a LOADING error (the append-only file) is a RedisError too
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING in {timeout_s}s: {self.log_tail()}")
                time.sleep(0.01)
        finally:
            probe.close()

    def kill(self) -> None:
        """SIGKILL, and wait until the process is gone (its sockets closed)."""
        assert self.process is not None and self.process.poll() is None, "redis-server is not running"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def pause(self, milliseconds: int) -> None:
        """CLIENT PAUSE ... ALL: every client's commands wait (reads too) until the pause ends."""
        client = self.client()
        try:
            assert client.execute_command("CLIENT", "PAUSE", milliseconds, "ALL") in (True, b"OK", "OK")
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextmanager
def running_redis(directory: Path, persistent: bool) -> Iterator[RedisProcess]:
    """A started private redis-server, stopped on exit; REDIS_SERVER must be set."""
    assert REDIS_SERVER is not None, "redis-server is not on PATH"
    server = RedisProcess(REDIS_SERVER, directory, free_port(), persistent)
    try:
        server.start()
        yield server
    finally:
        server.stop()
