"""Fixtures every test module may use: the real Redis of these machines (127.0.0.1:6379)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis_cluster import Cluster, cluster_tools_missing, running_cluster
from redis_process import REDIS_SERVER, RedisProcess, running_redis

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379

# Compiling the user tower (AOTInductor, model/compiled_tower.py) costs tens of seconds per export;
# the tests that export through the command line would pay it many times over. tests/test_compiled_tower.py
# compiles on purpose; every other export (and the subprocesses started here) writes TorchScript only.
os.environ.setdefault("COLDWARM_EXPORT__COMPILED_TOWER", "off")


# Under CI every test runs: a skip there means a missing tool or service, and a green run that tested
# nothing. Skips allowed under CI, by test id prefix, with the reason (none today).
ALLOWED_CI_SKIPS: dict[str, str] = {}
_ci_skips: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if os.environ.get("CI") == "true" and report.skipped:
        allowed = any(report.nodeid.startswith(prefix) for prefix in ALLOWED_CI_SKIPS)
        if not allowed:
            reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            _ci_skips.append((report.nodeid, str(reason)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _ci_skips:
        lines = "\n".join(f"  {nodeid}: {reason}" for nodeid, reason in _ci_skips)
        print(f"\nCI=true: {len(_ci_skips)} test(s) skipped, which CI does not allow:\n{lines}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real Redis Cluster (3 masters, 3 replicas) on loopback ports, for the whole session."""
    missing = cluster_tools_missing()
    if missing:
        pytest.skip(f"no Redis Cluster: {missing}")
    with running_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of the test's own, persistent (append-only file, fsync always): a SIGKILL and a
    restart keep every acknowledged write."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH: the test needs a Redis of its own to kill")
    with running_redis(tmp_path / "redis", persistent=True) as server:
        yield server


@pytest.fixture()
def volatile_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of the test's own without persistence (the compose file's default): a restart
    comes back empty."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH: the test needs a Redis of its own to kill")
    with running_redis(tmp_path / "redis", persistent=False) as server:
        yield server


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=2.0)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis on {REDIS_HOST}:{REDIS_PORT} ({exc})")
    yield client
    client.close()
