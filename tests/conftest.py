"""Fixtures every test module may use: the real Redis of these machines (127.0.0.1:6379)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=2.0)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis on {REDIS_HOST}:{REDIS_PORT} ({exc})")
    yield client
    client.close()
