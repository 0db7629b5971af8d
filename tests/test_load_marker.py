"""The load marker (issue 13: "a Redis that comes back empty"): ``bulk_load`` writes it after the users,
the service reads it in the background, and a store that should hold users but has no marker is not
ready and flags its answers ``feature_store_empty`` instead of serving everyone as a new user.

The real Redis on 127.0.0.1:6379 under a key prefix of each test's own, and for the SIGKILL scenario a
private ``redis-server`` without persistence (the compose file's default Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aredis
from redis_process import RedisProcess

from model.artifacts import data_fingerprint
from service.feature_store import FeatureStoreError, KeyLayout, LoadMarker, MemoryFeatureStore
from service.feature_store import loader as loader_module
from service.feature_store.loader import bulk_load, load_memory_store
from service.feature_store.marker import FEATURE_STORE_EMPTY, MarkerWatch
from service.feature_store.redis_store import RedisFeatureStore

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    DEAD_REDIS_URL,
    N_USERS,
    REDIS_HOST,
    REDIS_PORT,
    LiveServer,
    ServingArtifacts,
    live_server,
    load_users,
    metric,
    service_settings,
    users_by_length,
)

pytest_plugins = ["service_fixtures"]

FAST_CHECK_S = 0.1  # the marker watch's interval in these tests: short, so that they wait little
K = 5


def read_marker(layout: KeyLayout, url: str = f"redis://{REDIS_HOST}:{REDIS_PORT}/0") -> LoadMarker | None:
    """The marker as the service's store reads it (its own client, its own event loop)."""

    async def read() -> LoadMarker | None:
        client = aredis.Redis.from_url(url)
        try:
            return await RedisFeatureStore(client, layout, timeout_s=1.0).load_marker()
        finally:
            await client.aclose()

    return asyncio.run(read())


def active_users(artifacts: ServingArtifacts, n: int) -> list[int]:
    """The n users with the most interactions: not cold-start users while their record is there."""
    return [int(u) for u in users_by_length(artifacts.data).index[-n:]]


def wait_for(condition: Any, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout_s}s"
        time.sleep(0.02)


# ----- the marker: written by the loader, read by the store ------------------------------------------------
def test_bulk_load_writes_the_marker_once_every_user_is_written(
    serving_artifacts: ServingArtifacts, redis_client: redis.Redis, key_prefix: str
) -> None:
    layout = KeyLayout(key_prefix)
    assert read_marker(layout) is None
    before = int(time.time())
    stats = bulk_load(
        redis_client, layout, serving_artifacts.data, cap=serving_artifacts.max_history, progress=False
    )
    after = int(time.time())
    marker = read_marker(layout)
    assert marker is not None and marker == stats.marker
    # Default version: the data fingerprint the model manifests record.
    assert marker.version == data_fingerprint(serving_artifacts.data)
    assert before <= marker.time <= after
    assert marker.users == stats.users == N_USERS
    stored = redis_client.hgetall(layout.load_marker_key())
    assert stored == {
        b"version": marker.version.encode(),
        b"time": str(marker.time).encode(),
        b"users": b"300",
    }
    # The marker is a key of the namespace: SCAN-based cleanup removes it with the users.
    assert layout.load_marker_key().startswith(layout.namespace + ":")

    # A version of the caller's, and a subset of the users: the marker names what this load wrote.
    subset = [int(u) for u in serving_artifacts.data.users["user_id"][:7]]
    stats = bulk_load(
        redis_client, layout, serving_artifacts.data, user_ids=subset, progress=False, version="load-42"
    )
    assert read_marker(layout) == stats.marker
    assert (stats.marker.version, stats.marker.users) == ("load-42", 7)
    with pytest.raises(ValueError, match="version"):
        bulk_load(redis_client, layout, serving_artifacts.data, progress=False, version="")


def test_a_load_that_fails_half_way_writes_no_marker(
    serving_artifacts: ServingArtifacts,
    redis_client: redis.Redis,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layout = KeyLayout(key_prefix)
    written: list[int] = []
    write_batch = loader_module._write_batch

    def fail_on_the_third_batch(client: redis.Redis, layout: KeyLayout, batch: list[Any]) -> None:
        if len(written) == 2:
            raise redis.ConnectionError("connection lost mid-load")
        write_batch(client, layout, batch)
        written.append(len(batch))

    monkeypatch.setattr(loader_module, "_write_batch", fail_on_the_third_batch)
    with pytest.raises(redis.ConnectionError):
        bulk_load(redis_client, layout, serving_artifacts.data, batch_size=50, progress=False)
    assert written == [50, 50]  # users were written ...
    assert redis_client.exists(layout.user_key(int(serving_artifacts.data.users["user_id"][0])))
    assert read_marker(layout) is None  # ... but the store does not claim a complete load


def test_a_marker_with_unreadable_numbers_still_counts_as_present(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    layout = KeyLayout(key_prefix)
    redis_client.hset(layout.load_marker_key(), mapping={"version": "v7", "time": "soon", "users": "-3"})
    assert read_marker(layout) == LoadMarker(version="v7", time=None, users=None)


def test_an_unreachable_store_raises_instead_of_claiming_no_marker() -> None:
    async def read() -> None:
        client = aredis.Redis.from_url(DEAD_REDIS_URL)
        try:
            await RedisFeatureStore(client, KeyLayout("unused"), timeout_s=0.2).load_marker()
        finally:
            await client.aclose()

    with pytest.raises(FeatureStoreError):
        asyncio.run(read())


def test_the_memory_store_carries_the_marker_of_its_preload(serving_artifacts: ServingArtifacts) -> None:
    store = MemoryFeatureStore(cap=serving_artifacts.max_history)
    assert asyncio.run(store.load_marker()) is None
    stats = load_memory_store(store, serving_artifacts.data, version="preload-1")
    marker = asyncio.run(store.load_marker())
    assert marker == stats.marker and (marker.version, marker.users) == ("preload-1", N_USERS)


# ----- the watch: a flag for the request path -------------------------------------------------------------
def test_marker_watch_follows_the_store_and_keeps_its_answer_while_unreachable(
    serving_artifacts: ServingArtifacts, redis_client: redis.Redis, key_prefix: str
) -> None:
    layout = KeyLayout(key_prefix)

    async def scenario() -> None:
        client = aredis.Redis.from_url(f"redis://{REDIS_HOST}:{REDIS_PORT}/0")
        dead = aredis.Redis.from_url(DEAD_REDIS_URL)
        try:
            store = RedisFeatureStore(client, layout, timeout_s=1.0)
            watch = MarkerWatch(store, required=True, interval_s=FAST_CHECK_S)
            not_required = MarkerWatch(store, required=False, interval_s=FAST_CHECK_S)
            assert watch.empty is False  # nothing read yet: nothing claimed
            await watch.start()  # the first read happens before start returns
            await not_required.start()
            assert watch.empty is True and watch.marker is None
            assert not_required.empty is False  # a store allowed to be empty is never flagged

            await asyncio.to_thread(
                bulk_load, redis_client, layout, serving_artifacts.data, progress=False, version="v1"
            )
            # Nobody asks: the background reads notice the marker within an interval or two.
            async with asyncio.timeout(20 * FAST_CHECK_S):
                while watch.empty:
                    await asyncio.sleep(FAST_CHECK_S / 5)
            assert watch.marker is not None and watch.marker.version == "v1"

            await asyncio.to_thread(redis_client.delete, layout.load_marker_key())
            async with asyncio.timeout(20 * FAST_CHECK_S):
                while not watch.empty:
                    await asyncio.sleep(FAST_CHECK_S / 5)
            await watch.stop()
            await watch.stop()  # twice: harmless

            # Unreachable: the read fails, and the last answer stands (requests report the failure).
            unreachable = MarkerWatch(RedisFeatureStore(dead, layout, timeout_s=0.2), True, FAST_CHECK_S)
            unreachable.observe(LoadMarker("v1", 1, 1))
            with pytest.raises(FeatureStoreError):
                await unreachable.check()
            assert unreachable.empty is False and unreachable.marker == LoadMarker("v1", 1, 1)
            await unreachable.start()  # a failed first read does not fail the start ...
            await asyncio.sleep(3 * FAST_CHECK_S)  # ... nor do the background reads' failures
            assert unreachable.empty is False and unreachable.marker == LoadMarker("v1", 1, 1)
            await unreachable.stop()
        finally:
            await client.aclose()
            await dead.aclose()

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="interval_s"):
        MarkerWatch(MemoryFeatureStore(), required=True, interval_s=0)


class SwallowingStore(MemoryFeatureStore):
    """A store whose background marker reads hang and swallow a cancellation, as redis-py was seen to
    (a reply returned for a command cancelled while it was answered); the first read answers at once."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.reading = asyncio.Event()

    async def load_marker(self) -> LoadMarker | None:
        self.reads += 1
        if self.reads > 1:
            self.reading.set()
            with contextlib.suppress(asyncio.CancelledError):  # the caller's task goes on unaware
                await asyncio.sleep(3600)
        return None


def test_marker_watch_stops_even_when_a_read_swallows_the_cancellation() -> None:
    async def scenario() -> None:
        store = SwallowingStore()
        watch = MarkerWatch(store, required=True, interval_s=0.01)
        await watch.start()
        await asyncio.wait_for(store.reading.wait(), timeout=5)  # a background read in flight
        # The app's shutdown awaits this. asyncio.wait, not a timeout: cancelling an await of a task
        # that never ends would wait for it forever.
        stopping = asyncio.create_task(watch.stop())
        done, _ = await asyncio.wait({stopping}, timeout=5)
        assert stopping in done, "the watch did not stop"

    # Not asyncio.run: it waits for every task left, and a watch that never ends would hang the test
    # instead of failing it.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


# ----- the service ------------------------------------------------------------------------------------------
def recommend_batch(server: LiveServer, users: list[int]) -> list[dict[str, Any]]:
    response = server.client.post(
        "/recommend/batch", json={"requests": [{"user_id": u, "k": K} for u in users]}
    )
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_a_loaded_store_is_ready_and_its_answers_are_not_flagged(
    serving_artifacts: ServingArtifacts, redis_client: redis.Redis, key_prefix: str
) -> None:
    load_users(redis_client, key_prefix, serving_artifacts)
    with live_server(service_settings(serving_artifacts.a.directory, key_prefix)) as server:
        ready = server.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        store = ready.json()["feature_store"]
        marker = read_marker(KeyLayout(key_prefix))
        assert store == {
            "kind": "redis",
            "reachable": True,
            "loaded": True,
            "marker": {"version": marker.version, "time": marker.time, "users": N_USERS},
            "marker_required": True,
        }
        [user] = active_users(serving_artifacts, 1)
        answer = server.recommend(user_id=user, k=K).json()
        assert (answer["degraded"], answer["degraded_reason"]) == (False, None)
        assert answer["user_group"] != "cold_start"


def test_a_store_without_its_marker_is_not_ready_and_flags_every_answer(
    serving_artifacts: ServingArtifacts, redis_client: redis.Redis, key_prefix: str
) -> None:
    """The default (a Redis store must hold its marker): an empty namespace, then a load, then the marker
    lost while serving, noticed by the background watch alone (no /readyz in between)."""
    settings = service_settings(
        serving_artifacts.a.directory, key_prefix, feature_marker_check_s=FAST_CHECK_S
    )
    assert settings.require_feature_marker is True  # the default
    users = active_users(serving_artifacts, 3)
    with live_server(settings) as server:
        ready = server.client.get("/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert body["ready"] is False and body["artifacts"]["loaded"] is True
        assert body["feature_store"] == {
            "kind": "redis",
            "reachable": True,
            "loaded": False,
            "marker": None,
            "marker_required": True,
        }
        answer = server.recommend(user_id=users[0], k=K)
        assert answer.status_code == 200
        assert (answer.json()["degraded"], answer.json()["degraded_reason"]) == (True, FEATURE_STORE_EMPTY)
        assert len(answer.json()["items"]) == K
        results = recommend_batch(server, users)
        assert {(r["degraded"], r["degraded_reason"]) for r in results} == {(True, FEATURE_STORE_EMPTY)}
        samples = server.metrics()
        assert metric(samples, "coldwarm_degraded_answers_total", reason=FEATURE_STORE_EMPTY) == 1 + len(
            users
        )
        # Not a Redis error: Redis answered every read.
        assert metric(samples, "coldwarm_redis_errors_total", operation="get_users") == 0

        load_users(redis_client, key_prefix, serving_artifacts)
        wait_for(
            lambda: not server.recommend(user_id=users[0], k=K).json()["degraded"],
            timeout_s=20 * FAST_CHECK_S,
            what="answers unflagged after the load",
        )
        results = recommend_batch(server, users)
        assert all(not r["degraded"] and r["user_group"] != "cold_start" for r in results)
        flagged = metric(server.metrics(), "coldwarm_degraded_answers_total", reason=FEATURE_STORE_EMPTY)

        # The marker goes (a FLUSHALL, a restart without persistence): flagged within an interval or two.
        redis_client.delete(KeyLayout(key_prefix).load_marker_key())
        wait_for(
            lambda: server.recommend(user_id=users[0], k=K).json()["degraded_reason"] == FEATURE_STORE_EMPTY,
            timeout_s=20 * FAST_CHECK_S,
            what="answers flagged after the marker was deleted",
        )
        assert (
            metric(server.metrics(), "coldwarm_degraded_answers_total", reason=FEATURE_STORE_EMPTY) > flagged
        )
        assert server.client.get("/readyz").json()["feature_store"]["loaded"] is False


def test_requests_read_a_flag_not_the_marker(
    serving_artifacts: ServingArtifacts, redis_client: redis.Redis, key_prefix: str
) -> None:
    """With a check interval of an hour, a deleted marker goes unnoticed by requests (they never read it)
    until a /readyz probe reads it, which refreshes the flag for the requests that follow."""
    layout = load_users(redis_client, key_prefix, serving_artifacts)
    settings = service_settings(serving_artifacts.a.directory, key_prefix, feature_marker_check_s=3600)
    [user] = active_users(serving_artifacts, 1)
    with live_server(settings) as server:
        assert server.recommend(user_id=user, k=K).json()["degraded"] is False
        redis_client.delete(layout.load_marker_key())
        answer = server.recommend(user_id=user, k=K).json()
        assert (answer["degraded"], answer["user_group"] != "cold_start") == (False, True)
        assert server.client.get("/readyz").status_code == 503
        answer = server.recommend(user_id=user, k=K).json()
        assert (answer["degraded"], answer["degraded_reason"]) == (True, FEATURE_STORE_EMPTY)


def test_a_store_allowed_to_start_empty_is_ready_and_unflagged(
    serving_artifacts: ServingArtifacts, key_prefix: str
) -> None:
    settings = service_settings(serving_artifacts.a.directory, key_prefix, require_feature_marker=False)
    with live_server(settings) as server:
        ready = server.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["feature_store"] == {
            "kind": "redis",
            "reachable": True,
            "loaded": True,
            "marker": None,
            "marker_required": False,
        }
        answer = server.recommend(user_id=active_users(serving_artifacts, 1)[0], k=K).json()
        assert (answer["degraded"], answer["degraded_reason"], answer["user_group"]) == (
            False,
            None,
            "cold_start",
        )


def test_an_unreachable_store_keeps_its_own_reason(
    serving_artifacts: ServingArtifacts, key_prefix: str
) -> None:
    settings = service_settings(
        serving_artifacts.a.directory, key_prefix, redis_url=DEAD_REDIS_URL, redis_timeout_ms=50
    )
    with live_server(settings) as server:
        answer = server.recommend(user_id=1, k=K).json()
        assert (answer["degraded"], answer["degraded_reason"]) == (True, "feature_store_unavailable")
        ready = server.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["feature_store"] == {
            "kind": "redis",
            "reachable": False,
            "loaded": None,
            "marker": None,
            "marker_required": True,
        }
        assert metric(server.metrics(), "coldwarm_degraded_answers_total", reason=FEATURE_STORE_EMPTY) == 0


@pytest.mark.parametrize("preloaded", [True, False], ids=["preloaded", "empty"])
def test_the_in_process_store_never_needs_a_marker(
    serving_artifacts: ServingArtifacts, preloaded: bool
) -> None:
    """``coldwarm serve --data`` preloads it; without --data it starts empty on purpose (a demo, events
    only). Either way it holds what this process put in it, and is ready."""
    store = MemoryFeatureStore(cap=serving_artifacts.max_history)
    if preloaded:
        load_memory_store(store, serving_artifacts.data, version="preload")
    settings = service_settings(serving_artifacts.a.directory, "unused", redis_url=None)
    assert settings.require_feature_marker is True  # the default, which concerns Redis stores only
    with live_server(settings, store=store) as server:
        ready = server.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        marker = {"version": "preload", "time": store.marker.time, "users": N_USERS} if preloaded else None
        assert ready.json()["feature_store"] == {
            "kind": "given",
            "reachable": True,
            "loaded": True,
            "marker": marker,
            "marker_required": False,
        }
        answer = server.recommend(user_id=active_users(serving_artifacts, 1)[0], k=K).json()
        assert answer["degraded"] is False


# ----- a Redis killed and restarted without persistence, under a light stream of requests -----------------
@dataclass(frozen=True)
class Answer:
    sent: float  # perf_counter
    status: int | None
    degraded: bool | None = None
    reason: str | None = None
    user_group: str | None = None


class LightStream:
    """/recommend for loaded users, one after the other (about 50 a second), from a thread of its own."""

    def __init__(self, url: str, users: list[int]) -> None:
        self.url, self.users = url, users
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="light-stream", daemon=True)

    def __enter__(self) -> LightStream:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            i = 0
            while not self._stop.is_set():
                sent = time.perf_counter()
                try:
                    response = client.post(
                        "/recommend", json={"user_id": self.users[i % len(self.users)], "k": K}
                    )
                except httpx.HTTPError:
                    self.answers.append(Answer(sent, None))
                else:
                    body = response.json() if response.status_code == 200 else {}
                    self.answers.append(
                        Answer(
                            sent,
                            response.status_code,
                            body.get("degraded"),
                            body.get("degraded_reason"),
                            body.get("user_group"),
                        )
                    )
                i += 1
                time.sleep(0.02)

    def between(self, lo: float, hi: float) -> list[Answer]:
        return [a for a in list(self.answers) if lo <= a.sent < hi]

    def wait_for_answers(self, since: float, n: int, timeout_s: float = 30.0) -> None:
        """Until n requests sent since ``since`` are answered: each phase lasts as long as a loaded machine
        needs to serve a few, instead of a fixed time that a slow moment could leave nearly empty."""
        wait_for(lambda: len(self.between(since, float("inf"))) >= n, timeout_s, f"{n} answers")


def test_a_redis_restarted_without_persistence_is_flagged_until_reloaded(
    serving_artifacts: ServingArtifacts, volatile_redis: RedisProcess
) -> None:
    """Loaded → SIGKILL (answers degraded: unreachable) → restarted empty on the same port (answers
    flagged feature_store_empty, /readyz says so) → load-features again (answers normal)."""
    prefix = f"coldwarm-marker-test-{uuid.uuid4().hex}"
    admin = volatile_redis.client()
    layout = load_users(admin, prefix, serving_artifacts)
    admin.close()
    settings = service_settings(
        serving_artifacts.a.directory,
        prefix,
        redis_url=volatile_redis.url,
        redis_timeout_ms=100,  # a dead Redis fails at once (refused); the budget bounds the rest
        feature_marker_check_s=FAST_CHECK_S,
    )
    users = active_users(serving_artifacts, 10)
    # Room for one interval, the read itself and a scheduling hiccup on 2 busy shared cores.
    settle_s = FAST_CHECK_S + 0.9
    per_phase = 10  # answers each phase waits for
    edge_s = 0.2  # requests this close to a kill or a restart may be caught on either side of it
    with live_server(settings) as server, LightStream(server.url, users) as stream:
        assert server.client.get("/readyz").status_code == 200
        stream.wait_for_answers(0, per_phase)
        killed = time.perf_counter()
        volatile_redis.kill()
        stream.wait_for_answers(killed + edge_s, per_phase)
        down = server.client.get("/readyz")
        time.sleep(edge_s)
        restarted = time.perf_counter()
        volatile_redis.start()
        back = time.perf_counter()
        # No /readyz for a while: the background watch alone must notice the empty store.
        time.sleep(settle_s)
        stream.wait_for_answers(back + settle_s, per_phase)
        empty = server.client.get("/readyz")
        empty_metrics = server.metrics()
        admin = volatile_redis.client()
        assert admin.dbsize() == 0, "the restarted Redis should have come back empty"
        reloading = time.perf_counter()
        load_users(admin, prefix, serving_artifacts)
        loaded = time.perf_counter()
        admin.close()
        time.sleep(settle_s)
        stream.wait_for_answers(loaded + settle_s, per_phase)
        ready = server.client.get("/readyz")

    assert all(a.status == 200 for a in stream.answers), [a for a in stream.answers if a.status != 200][:5]

    before = stream.between(0, killed)
    assert len(before) >= per_phase and all(not a.degraded and a.user_group != "cold_start" for a in before)

    while_down = stream.between(killed + edge_s, restarted - edge_s)
    assert len(while_down) >= per_phase
    assert {(a.degraded, a.reason) for a in while_down} == {(True, "feature_store_unavailable")}
    assert down.status_code == 503 and down.json()["feature_store"]["reachable"] is False

    after_restart = stream.between(back + settle_s, reloading)
    assert len(after_restart) >= per_phase
    assert {(a.degraded, a.reason, a.user_group) for a in after_restart} == {
        (True, FEATURE_STORE_EMPTY, "cold_start")
    }
    assert empty.status_code == 503
    assert empty.json()["feature_store"] == {
        "kind": "redis",
        "reachable": True,
        "loaded": False,
        "marker": None,
        "marker_required": True,
    }
    # The metric was read once per_phase flagged answers had come back.
    assert metric(empty_metrics, "coldwarm_degraded_answers_total", reason=FEATURE_STORE_EMPTY) >= per_phase
    # Between the restart and the watch's next read, answers may still go out unflagged: at most one
    # interval's worth (plus the read), never the whole outage after it.
    unflagged = [a for a in stream.between(back, reloading) if not a.degraded]
    assert all(a.sent < back + settle_s for a in unflagged)

    reloaded = stream.between(loaded + settle_s, float("inf"))
    assert len(reloaded) >= per_phase
    assert all(not a.degraded and a.user_group != "cold_start" for a in reloaded)
    assert ready.status_code == 200 and ready.json()["feature_store"]["marker"]["users"] == N_USERS
    assert read_marker(layout, volatile_redis.url) is not None
