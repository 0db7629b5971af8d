"""``coldwarm serve --workers 2`` as an operator runs it: two worker processes behind one port, over
the real Redis and the test artifacts. Both answer; a write through one is read through the other (the
store is shared); each maps the index file instead of copying it; without Redis it refuses to start.
One process's access log, which COLDWARM_ACCESS_LOG switches off."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from index_builder.build import INDEX_FILE, resolve_index_dir

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import REDIS_URL, ServingArtifacts, load_users  # noqa: E402

pytest_plugins = ["service_fixtures"]

WORKERS = 2
STARTUP_S = 120


def coldwarm_command() -> list[str]:
    script = shutil.which("coldwarm")
    return [script] if script else [sys.executable, "-m", "coldwarm"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def children(pid: int) -> list[int]:
    """The worker processes of a uvicorn supervisor (multiprocessing spawns them; its resource tracker
    is a child too, and is not a worker)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                found.append(int(child))
    return found


def serving_env(artifacts: ServingArtifacts, key_prefix: str, redis_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLDWARM_")}
    env.update(COLDWARM_ARTIFACTS_DIR=str(artifacts.root), COLDWARM_KEY_PREFIX=key_prefix)
    if redis_url:
        env["COLDWARM_REDIS_URL"] = redis_url
    return env


@contextmanager
def serving(
    arguments: list[str], env: dict[str, str], log_path: Path, workers: int = 1
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``coldwarm serve ARGUMENTS`` on a free port, its output in ``log_path``, until every worker is
    ready; (the process, its URL). Stopped with SIGINT, as an operator's Ctrl-C does."""
    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*coldwarm_command(), "serve", "--port", str(port), *arguments],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + STARTUP_S
            while (workers > 1 and len(children(process.pid)) < workers) or not all_ready(url):
                assert process.poll() is None, log_path.read_text()[-5000:]
                assert time.monotonic() < deadline, "coldwarm serve did not become ready"
                time.sleep(0.25)
            yield process, url
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


@pytest.fixture()
def workers(
    serving_artifacts: ServingArtifacts, redis_client: redis.Redis, key_prefix: str, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    load_users(redis_client, key_prefix, serving_artifacts)
    env = serving_env(serving_artifacts, key_prefix, REDIS_URL)
    with serving(["--workers", str(WORKERS)], env, tmp_path / "serve.log", WORKERS) as running:
        yield running


def maps_within(pid: int, path: str, timeout_s: float) -> bool:
    """Whether process ``pid`` maps ``path`` within ``timeout_s`` (or exits first: a replaced worker)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if path in Path(f"/proc/{pid}/maps").read_text():
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True  # gone: replaced by the supervisor, whose new worker is another pid
        time.sleep(0.25)
    return False


def all_ready(url: str) -> bool:
    """Ready answers on fresh connections: with two workers, each has loaded the model by then."""
    try:
        return all(httpx.get(f"{url}/readyz", timeout=5).status_code == 200 for _ in range(2 * WORKERS))
    except httpx.TransportError:
        return False


def test_two_workers_answer_share_the_store_and_map_the_index(
    workers: tuple[subprocess.Popen[str], str], serving_artifacts: ServingArtifacts
) -> None:
    process, url = workers
    pids = children(process.pid)
    assert len(pids) == WORKERS
    user = int(serving_artifacts.split.test[0])
    item = int(serving_artifacts.catalog[0])
    for attempt in range(20):
        # A fresh connection per request: the kernel spreads them over the workers' shared socket.
        response = httpx.post(f"{url}/recommend", json={"user_id": user, "k": 5}, timeout=30)
        assert response.status_code == 200 and response.json()["degraded"] is False
        write = httpx.post(
            f"{url}/events", json={"user_id": 10**12 + attempt, "item_id": item, "timestamp": 1_000_000}
        )
        assert write.status_code == 200, write.text
        for _ in range(3):  # read back on whichever worker answers: the store is Redis, not the process
            seen = httpx.get(f"{url}/users/{10**12 + attempt}").json()
            assert seen["interaction_count"] == 1 and seen["recent_items"] == [item]
    index_file = str((resolve_index_dir(serving_artifacts.root) / INDEX_FILE).resolve())
    # The workers as they are now: uvicorn's supervisor replaces a worker that misses its health
    # check (a starved CPU can do that), and the replacement must map the index as well, once it has
    # loaded it; a worker that copied the index never maps it.
    for pid in children(process.pid):
        assert maps_within(pid, index_file, STARTUP_S), f"worker {pid} holds a copy of the index, not a map"


def test_more_than_one_worker_needs_redis(serving_artifacts: ServingArtifacts, key_prefix: str) -> None:
    result = subprocess.run(
        [*coldwarm_command(), "serve", "--port", str(free_port()), "--workers", "2"],
        env=serving_env(serving_artifacts, key_prefix, None),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "COLDWARM_REDIS_URL" in result.stdout + result.stderr


@pytest.mark.parametrize("access_log", [True, False])
def test_the_access_log_is_a_setting(
    access_log: bool,
    serving_artifacts: ServingArtifacts,
    redis_client: redis.Redis,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    """COLDWARM_ACCESS_LOG=false keeps uvicorn's per-request lines out of the log, and only them."""
    load_users(redis_client, key_prefix, serving_artifacts)
    env = serving_env(serving_artifacts, key_prefix, REDIS_URL) | {"COLDWARM_ACCESS_LOG": str(access_log)}
    log_path = tmp_path / "serve.log"
    with serving([], env, log_path) as (_, url):
        assert httpx.post(f"{url}/recommend", json={"user_id": 1, "k": 3}, timeout=30).status_code == 200
    text = log_path.read_text()
    assert "Uvicorn running on" in text  # the server's own lines are logged either way
    assert ('"POST /recommend HTTP/1.1" 200' in text) == access_log
    assert ('"GET /readyz HTTP/1.1" 200' in text) == access_log
