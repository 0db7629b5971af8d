"""The feature store: key layout, offline records and their parity with evaluation, bulk loading, and
the store's behaviour, run against the real Redis on 127.0.0.1:6379 (each test in its own key prefix,
deleted afterwards) and against the embedded memory store, which must behave the same.

No pytest-asyncio: each test drives its coroutine with ``asyncio.run`` and opens its async clients
inside it, because a redis.asyncio connection belongs to the loop that opened it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import TypeVar

import numpy as np
import pandas as pd
import pytest
import redis
import redis.asyncio as aredis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis_cluster import Cluster  # noqa: E402

from model.data.schema import InteractionData, make_interaction_data
from model.data.synthetic import generate_synthetic
from model.evaluation.protocol import EvalPoint, build_eval_points
from model.features import FeatureEncoder
from model.ranker import encode_points
from model.settings import FeatureConfig
from service.feature_store import FeatureStore, FeatureStoreError, LoadMarker, RedisFeatureStore
from service.feature_store.client import create_client
from service.feature_store.keys import KeyLayout
from service.feature_store.loader import bulk_load, load_memory_store
from service.feature_store.memory_store import MemoryFeatureStore
from service.feature_store.records import (
    EVENT_IDS_KEPT,
    EventIdConflictError,
    UserRecord,
    records_from_interactions,
    records_to_raw_users,
)

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
CAP = 5  # small, so that histories overflow it
T = TypeVar("T")


# ----- fixtures ------------------------------------------------------------------------------------
@pytest.fixture()
def layout(redis_client: redis.Redis) -> Iterator[KeyLayout]:
    layout = KeyLayout(prefix=f"coldwarm-test-{uuid.uuid4().hex}")
    yield layout
    keys = list(redis_client.scan_iter(match=layout.pattern(), count=1000))
    if keys:
        redis_client.delete(*keys)


class Backend:
    """One store kind: opens stores (inside a running loop) and bulk-loads data into them. "redis" is
    the real Redis of these machines, "redis-cluster" a real 3-master cluster (tests/redis_cluster.py):
    the same tests run on both, as redis-py runs its suite on a server and on a cluster."""

    def __init__(
        self,
        kind: str,
        layout: KeyLayout | None = None,
        sync: redis.Redis | RedisCluster | None = None,
        url: str = REDIS_URL,
    ) -> None:
        self.kind = kind
        self.layout = layout
        self.sync = sync
        self.url = url
        self.memory = MemoryFeatureStore(cap=CAP)  # kept across asyncio.run calls of one test

    @asynccontextmanager
    async def open(self, timeout_s: float = 5.0) -> AsyncIterator[FeatureStore]:
        if self.kind == "memory":
            yield self.memory
            return
        # 16 connections for 200 concurrent callers: a blocking pool (one Redis) or the store's own
        # limit (a cluster) queues them; the default pool fails them.
        cluster = self.kind == "redis-cluster"
        client = create_client(self.url, max_connections=16, timeout_s=timeout_s, cluster=cluster)
        try:
            yield RedisFeatureStore(client, self.layout, cap=CAP, timeout_s=timeout_s)
        finally:
            await client.aclose()

    def run(self, scenario: Callable[[FeatureStore], Awaitable[T]]) -> T:
        async def main() -> T:
            async with self.open() as store:
                return await scenario(store)

        return asyncio.run(main())

    def load(self, data: InteractionData) -> None:
        if self.kind == "memory":
            load_memory_store(self.memory, data)
        else:
            bulk_load(self.sync, self.layout, data, cap=CAP, progress=False)


@pytest.fixture()
def cluster_layout(redis_cluster: Cluster) -> Iterator[tuple[KeyLayout, RedisCluster]]:
    layout = KeyLayout(prefix=f"coldwarm-test-{uuid.uuid4().hex}")
    client = redis_cluster.client()
    yield layout, client
    for key in list(client.scan_iter(match=layout.pattern(), count=1000)):
        client.delete(key)  # one by one: the keys of several users lie in several slots
    client.close()


@pytest.fixture(params=["redis", "redis-cluster", "memory"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return Backend("memory")
    if request.param == "redis-cluster":
        layout, client = request.getfixturevalue("cluster_layout")
        return Backend("redis-cluster", layout, client, request.getfixturevalue("redis_cluster").url)
    return Backend("redis", request.getfixturevalue("layout"), request.getfixturevalue("redis_client"))


# ----- data ----------------------------------------------------------------------------------------
def tiny_data() -> InteractionData:
    """User 1: 8 interactions given shuffled (two share a timestamp); 2: one; 3: profile only."""
    rows = [(1, 100 + i, 1_000 + 10 * i) for i in range(7)] + [(1, 200, 1_060)]
    rows = rows[::-1] + [(2, 300, 5_000)]
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    users = pd.DataFrame(
        {
            "user_id": [1, 2, 3],
            "gender": ["F", "M", ""],
            "age": ["25", "", "35"],
            "occupation": ["4", "7", "1"],
            "zip_code": ["55455", "02139", "94110"],
        }
    )
    return make_interaction_data(interactions, users, None, name="tiny")


@pytest.fixture(scope="module")
def synthetic() -> InteractionData:
    return generate_synthetic(n_users=40, n_items=60, interactions_per_user=(1, 45), seed=3)


@pytest.fixture(scope="module")
def encoder(synthetic: InteractionData) -> FeatureEncoder:
    # Fitted on half the users, so the other half brings unseen profile values (OOV) along.
    train_users = synthetic.users["user_id"].to_numpy()[::2]
    return FeatureEncoder.fit(synthetic, train_users, FeatureConfig(max_history=CAP))


def whole_history_point(data: InteractionData, user_id: int, request_time: int) -> EvalPoint:
    rows = data.interactions[data.interactions["user_id"] == user_id]
    return EvalPoint(
        user_id=user_id,
        h=len(rows),
        history_item_ids=rows["item_id"].to_numpy(np.int64),
        history_timestamps=rows["timestamp"].to_numpy(np.int64),
        target_item_ids=np.zeros(0, np.int64),
        request_time=request_time,
    )


def assert_same_encoding(left: object, right: object) -> None:
    for part in ("profile", "history", "state"):
        np.testing.assert_array_equal(getattr(left, part), getattr(right, part), err_msg=part)


# ----- key layout ----------------------------------------------------------------------------------
def test_key_layout_strings() -> None:
    layout = KeyLayout()
    assert layout.user_key(42) == "coldwarm:v1:{42}:user"
    assert layout.actions_key(np.int64(42)) == "coldwarm:v1:{42}:actions"
    assert KeyLayout("svc", 3).user_key(7) == "svc:v3:{7}:user"
    assert layout.pattern() == "coldwarm:v1:*"
    assert KeyLayout("a*b").pattern() == "a\\*b:v1:*"  # a prefix is matched literally
    # The hash tag keeps a user's two keys in one cluster slot.
    assert key_slot(layout.user_key(42).encode()) == key_slot(layout.actions_key(42).encode())
    for bad in ("42", 42.0, True):
        with pytest.raises(TypeError):
            layout.user_key(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        KeyLayout("a{b}")


# ----- offline records -----------------------------------------------------------------------------
def test_records_from_interactions() -> None:
    data = tiny_data()
    one, two, three, unknown = records_from_interactions(data, [1, 2, 3, 99], cap=CAP)
    # Newest first; the two interactions at 1060 in (timestamp, item) order, as training sees them.
    assert one == UserRecord(
        1, {"gender": "F", "age": "25", "occupation": "4", "zip_code": "55455"},
        [200, 106, 105, 104, 103], 8, 1_000, 1_060, True,
    )  # fmt: skip
    assert two.profile == {"gender": "M", "occupation": "7", "zip_code": "02139"}  # "" left out
    assert (two.actions, two.count) == ([300], 1)
    assert (three.found, three.count, three.actions, three.first_ts) == (True, 0, [], None)
    assert unknown == UserRecord.unknown(99) and not unknown.found

    [early] = records_from_interactions(data, [1], as_of=1_030, cap=CAP)
    assert (early.actions, early.count, early.first_ts, early.last_ts) == ([102, 101, 100], 3, 1_000, 1_020)
    # The time cut drops every interaction at as_of, both of the tied ones too.
    [tied] = records_from_interactions(data, [1], as_of=1_060, cap=CAP)
    assert (tied.count, tied.last_ts) == (6, 1_050)
    assert [r.user_id for r in records_from_interactions(data, cap=CAP)] == [1, 2, 3]


def test_records_to_raw_users_unknown_is_cold_and_damage_is_repaired() -> None:
    records = [
        UserRecord.unknown(5),
        UserRecord(6, {"gender": "F"}, [9, 8, 7], 10, 100, 200, True),
        UserRecord(7, {}, [4], 0, None, None, True),  # damaged: actions without count or timestamps
    ]
    raw = records_to_raw_users(records, now=1_000, max_history=2)
    np.testing.assert_array_equal(raw.history, [[-1, -1], [9, 8], [4, -1]])
    np.testing.assert_array_equal(raw.interaction_count, [0, 10, 1])
    np.testing.assert_array_equal(raw.first_timestamp, [0, 100, 1_000])
    np.testing.assert_array_equal(raw.last_timestamp, [0, 200, 1_000])
    assert list(raw.profiles["gender"]) == ["", "F", ""]
    assert list(records_to_raw_users(records, [1, 2, 3], 2).now) == [1, 2, 3]
    with pytest.raises(ValueError, match="one per record"):
        records_to_raw_users(records, [1, 2], 2)


def test_offline_records_encode_like_evaluation_points(
    synthetic: InteractionData, encoder: FeatureEncoder
) -> None:
    """The service's path (record → RawUsers → encoder) gives the evaluation path's exact inputs."""
    lengths = (0, 1, 2, 3, 5, 10, 30)
    points = build_eval_points(synthetic, synthetic.users["user_id"], lengths, n_targets=1)
    assert {p.h for p in points} == set(lengths)  # 0, below, at and above the cap
    records = []
    for point in points:
        [record] = records_from_interactions(synthetic, [point.user_id], point.request_time, cap=CAP)
        # Synthetic timestamps never tie, so "before the request time" is the point's history.
        assert record.count == point.h
        records.append(record)
    now = [p.request_time for p in points]
    assert_same_encoding(
        encoder.encode_users(records_to_raw_users(records, now, CAP)),
        encode_points(points, synthetic.users, encoder),
    )


# ----- both stores ---------------------------------------------------------------------------------
def test_stores_satisfy_the_protocol() -> None:
    assert isinstance(MemoryFeatureStore(), FeatureStore)
    assert isinstance(RedisFeatureStore(aredis.Redis(host=REDIS_HOST, port=REDIS_PORT)), FeatureStore)


def test_loaded_store_serves_offline_records_and_encodes_like_evaluation(
    backend: Backend, synthetic: InteractionData, encoder: FeatureEncoder
) -> None:
    backend.load(synthetic)
    user_ids = [*synthetic.users["user_id"].tolist(), 10_000]  # the last one is unknown
    got = backend.run(lambda store: store.get_users(user_ids))
    assert got == records_from_interactions(synthetic, user_ids, cap=CAP)
    assert not got[-1].found

    now = int(synthetic.interactions["timestamp"].max()) + 86_400
    points = [whole_history_point(synthetic, u, now) for u in user_ids]
    assert_same_encoding(
        encoder.encode_users(records_to_raw_users(got, now, CAP)),
        encode_points(points, synthetic.users, encoder),
    )


def test_bulk_load_is_idempotent(backend: Backend) -> None:
    data = tiny_data()
    backend.load(data)
    first = backend.run(lambda store: store.get_users([1, 2, 3, 4]))

    async def disturb(store: FeatureStore) -> None:
        await store.record_event(1, 999, 5)
        await store.put_profile(3, {"gender": "M"})

    backend.run(disturb)
    backend.load(data)
    assert backend.run(lambda store: store.get_users([1, 2, 3, 4])) == first
    assert [r.found for r in first] == [True, True, True, False]


def test_replayed_events_match_offline_records(backend: Backend, synthetic: InteractionData) -> None:
    users = synthetic.users["user_id"].tolist()[:6]
    rows = synthetic.interactions[synthetic.interactions["user_id"].isin(users)]

    async def replay(store: FeatureStore) -> list[UserRecord]:
        for row in rows.itertuples():
            await store.record_event(row.user_id, row.item_id, row.timestamp)
        return await store.get_users(users)

    expected = [
        UserRecord(r.user_id, {}, r.actions, r.count, r.first_ts, r.last_ts, True)
        for r in records_from_interactions(synthetic, users, cap=CAP)
    ]
    assert backend.run(replay) == expected


def test_record_event_turns_an_unknown_user_into_a_known_one(backend: Backend) -> None:
    async def scenario(store: FeatureStore) -> tuple[UserRecord, UserRecord, UserRecord]:
        [before] = await store.get_users([7])
        returned = await store.record_event(7, 101, 1_000)
        [after] = await store.get_users([7])
        return before, returned, after

    before, returned, after = backend.run(scenario)
    assert before == UserRecord.unknown(7)
    assert returned == after == UserRecord(7, {}, [101], 1, 1_000, 1_000, True)
    raw = records_to_raw_users([before], now=2_000, max_history=CAP)
    assert raw.interaction_count[0] == 0 and (raw.history == -1).all()


def test_cap_is_respected(backend: Backend) -> None:
    async def scenario(store: FeatureStore) -> UserRecord:
        for i in range(3 * CAP):
            await store.record_event(8, 500 + i, 10_000 + i)
        [record] = await store.get_users([8])
        return record

    record = backend.run(scenario)
    assert record.actions == [500 + i for i in reversed(range(2 * CAP, 3 * CAP))]
    assert (record.count, record.first_ts, record.last_ts) == (3 * CAP, 10_000, 10_000 + 3 * CAP - 1)
    if backend.kind == "redis":
        assert backend.sync.llen(backend.layout.actions_key(8)) == CAP


def test_out_of_order_timestamps_keep_first_and_last(backend: Backend) -> None:
    async def scenario(store: FeatureStore) -> UserRecord:
        for item, stamp in ((1, 500), (2, 100), (3, 900), (4, 300)):
            await store.record_event(9, item, stamp)
        [record] = await store.get_users([9])
        return record

    record = backend.run(scenario)
    assert (record.first_ts, record.last_ts, record.count) == (100, 900, 4)
    assert record.actions == [4, 3, 2, 1]  # arrival order: the store does not re-sort


# Redis only: the memory store's record_event never awaits, so its calls cannot interleave at all.
@pytest.mark.parametrize("backend", ["redis", "redis-cluster"], indirect=True)
def test_concurrent_events_are_atomic(backend: Backend) -> None:
    n = 200

    async def scenario(store: FeatureStore) -> UserRecord:
        await asyncio.gather(*(store.record_event(11, i, 50_000 + i) for i in range(n)))
        [record] = await store.get_users([11])
        return record

    record = backend.run(scenario)
    assert record.count == n
    assert len(record.actions) == min(n, CAP) and len(set(record.actions)) == len(record.actions)
    assert (record.first_ts, record.last_ts) == (50_000, 50_000 + n - 1)


def test_put_profile(backend: Backend, encoder: FeatureEncoder) -> None:
    async def scenario(store: FeatureStore) -> UserRecord:
        await store.record_event(12, 5, 1_000)
        await store.put_profile(12, {"gender": "F", "age": "no-such-age", "zip_code": ""})
        await store.put_profile(12, {})
        with pytest.raises(ValueError, match="height.*shoe_size"):
            await store.put_profile(12, {"gender": "M", "shoe_size": "44", "height": "2m"})
        [record] = await store.get_users([12])
        return record

    record = backend.run(scenario)
    # State untouched, the rejected call wrote nothing, "" reads as unknown.
    assert record == UserRecord(12, {"gender": "F", "age": "no-such-age"}, [5], 1, 1_000, 1_000, True)
    profile = encoder.encode_users(records_to_raw_users([record], 2_000, CAP)).profile[0]
    assert profile[1] == 1 and profile[3] == 0  # unknown age → OOV, no zip → missing


def test_invalid_events_are_rejected(backend: Backend) -> None:
    async def scenario(store: FeatureStore) -> None:
        with pytest.raises(ValueError, match="item_id"):
            await store.record_event(1, -1, 10)
        with pytest.raises(TypeError):
            await store.record_event(1, True, 10)
        with pytest.raises(TypeError):
            await store.record_event(1, 2, 10.5)  # type: ignore[arg-type]

    backend.run(scenario)


def test_an_event_id_seen_among_the_last_ones_is_not_applied_again(backend: Backend) -> None:
    async def scenario(store: FeatureStore) -> list[UserRecord]:
        answers = [await store.record_event(21, 10, 100, "first")]
        answers.append(await store.record_event(21, 10, 101, "first"))  # a retry: same state back
        answers.append(await store.record_event(21, 12, 102, "second"))
        answers.append(await store.record_event(21, 13, 103))  # no id: always applied
        answers.append(await store.record_event(21, 13, 103))
        for n in range(EVENT_IDS_KEPT):
            await store.record_event(21, 50 + n, 200 + n, f"later-{n}")
        answers.append(await store.record_event(21, 14, 104, "first"))  # aged out: a new event
        return answers

    answers = backend.run(scenario)
    assert [a.count for a in answers] == [1, 1, 2, 3, 4, 5 + EVENT_IDS_KEPT]
    assert answers[1] == answers[0] == UserRecord(21, {}, [10], 1, 100, 100, True)
    assert answers[-1].actions[0] == 14


def test_an_event_id_sent_again_with_another_item_is_a_conflict(backend: Backend) -> None:
    """Not a retry: the client reused an id. It is refused, and the first event stays as it was."""

    async def scenario(store: FeatureStore) -> tuple[EventIdConflictError, UserRecord]:
        await store.record_event(22, 10, 100, "reused")
        with pytest.raises(EventIdConflictError) as caught:
            await store.record_event(22, 11, 101, "reused")
        [record] = await store.get_users([22])
        return caught.value, record

    error, record = backend.run(scenario)
    assert "'reused'" in str(error) and "user 22" in str(error)
    assert (record.count, record.actions, record.last_ts) == (1, [10], 100)


@pytest.mark.parametrize("event_id", ["a b", "x" * 65, "é", "a\nb", 7])
def test_malformed_event_ids_are_rejected(backend: Backend, event_id: object) -> None:
    async def scenario(store: FeatureStore) -> list[UserRecord]:
        with pytest.raises(ValueError, match="event_id"):
            await store.record_event(22, 1, 10, event_id)  # type: ignore[arg-type]
        return await store.get_users([22])

    assert backend.run(scenario) == [UserRecord.unknown(22)]


class LossyProxy:
    """A TCP proxy to Redis that, once armed, drops the connection instead of forwarding the reply to
    the next script call (Redis has run the script by then): a reply lost on the network."""

    def __init__(self) -> None:
        self.armed = False

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(REDIS_HOST, REDIS_PORT)
        saw_script = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if b"EVALSHA" in data.upper():
                    saw_script.set()
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if self.armed and saw_script.is_set() and data.startswith(b"*"):
                    self.armed = False
                    client_w.transport.abort()
                    return
                client_w.write(data)
                await client_w.drain()

        try:
            await asyncio.gather(upstream(), downstream())
        except (ConnectionError, OSError):
            pass
        finally:
            client_w.close()
            server_w.close()


@pytest.mark.parametrize("event_id", ["two", None], ids=["caller's id", "no id"])
def test_an_event_whose_reply_is_lost_is_applied_once(
    layout: KeyLayout, redis_client: redis.Redis, event_id: str | None
) -> None:
    """redis-py retries a command once after a connection error; the event id (the caller's, or the
    store's own when the caller sent none) makes the retried script a no-op instead of a second
    interaction."""

    async def scenario() -> UserRecord:
        proxy = LossyProxy()
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = create_client(f"redis://127.0.0.1:{port}/0", timeout_s=2.0)
        try:
            store = RedisFeatureStore(client, layout, cap=CAP, timeout_s=2.0)
            await store.record_event(42, 100, 1_000, "one")  # loads the script
            proxy.armed = True
            return await store.record_event(42, 200, 1_060, event_id)
        finally:
            await client.aclose()
            server.close()

    answer = asyncio.run(scenario())
    stored = [int(v) for v in redis_client.lrange(layout.actions_key(42), 0, -1)]
    assert (answer.count, answer.actions) == (2, [200, 100])
    assert stored == [200, 100] and redis_client.hget(layout.user_key(42), "count") == b"2"


# ----- Redis only ----------------------------------------------------------------------------------
def redis_snapshot(client: redis.Redis, layout: KeyLayout) -> dict[bytes, object]:
    out: dict[bytes, object] = {}
    for key in client.scan_iter(match=layout.pattern(), count=1000):
        kind = client.type(key)
        out[key] = client.hgetall(key) if kind == b"hash" else client.lrange(key, 0, -1)
    return out


def test_bulk_load_redis_content(redis_client: redis.Redis, layout: KeyLayout) -> None:
    data = tiny_data()
    stats = bulk_load(redis_client, layout, data, cap=CAP, progress=False)
    assert (stats.users, stats.actions) == (3, CAP + 1)
    content = redis_snapshot(redis_client, layout)
    assert content == {
        layout.user_key(1).encode(): {
            b"gender": b"F", b"age": b"25", b"occupation": b"4", b"zip_code": b"55455",
            b"count": b"8", b"first_ts": b"1000", b"last_ts": b"1060",
        },
        layout.actions_key(1).encode(): [b"200", b"106", b"105", b"104", b"103"],
        layout.user_key(2).encode(): {
            b"gender": b"M", b"occupation": b"7", b"zip_code": b"02139",
            b"count": b"1", b"first_ts": b"5000", b"last_ts": b"5000",
        },
        layout.actions_key(2).encode(): [b"300"],
        layout.user_key(3).encode(): {
            b"age": b"35", b"occupation": b"1", b"zip_code": b"94110", b"count": b"0",
        },
        # The load marker, written last (tests/test_load_marker.py).
        layout.load_marker_key().encode(): marker_hash(stats.marker),
    }  # fmt: skip
    # Over a store changed since (stale fields, longer lists), a reload restores exactly this content,
    # with the marker of the new load.
    redis_client.hset(layout.user_key(3), mapping={"gender": "M", "first_ts": "1", "age": "x"})
    redis_client.rpush(layout.actions_key(1), *range(10))
    again = bulk_load(
        redis_client, layout, data, cap=CAP, user_ids=[1, 2, 3, 77], batch_size=2, progress=False
    )
    assert again.users == 3
    assert redis_snapshot(redis_client, layout) == {
        **content,
        layout.load_marker_key().encode(): marker_hash(again.marker),
    }


def marker_hash(marker: LoadMarker | None) -> dict[bytes, bytes]:
    """The marker hash a load wrote, as HGETALL returns it."""
    assert marker is not None and marker.users == 3
    return {
        b"version": marker.version.encode(),
        b"time": str(marker.time).encode(),
        b"users": str(marker.users).encode(),
    }


def test_malformed_stored_fields_do_not_raise(redis_client: redis.Redis, layout: KeyLayout) -> None:
    redis_client.hset(
        layout.user_key(13),
        mapping={"count": "lots", "first_ts": "1.5e9", "last_ts": "", "gender": b"\xff\xfe", "age": "30"},
    )
    redis_client.rpush(layout.actions_key(13), "12", "x", "-3", "7 ", "40")
    redis_client.set(layout.user_key(14), "not a hash")  # a key of the wrong type
    backend = Backend("redis", layout, redis_client)

    async def scenario(store: FeatureStore) -> tuple[list[UserRecord], UserRecord]:
        records = await store.get_users([13, 14])
        return records, await store.record_event(13, 41, 2_000)

    (damaged, wrong_type), after = backend.run(scenario)
    assert (damaged.count, damaged.first_ts, damaged.last_ts, damaged.actions) == (0, None, None, [12, 40])
    assert damaged.profile == {"gender": "\ufffd\ufffd", "age": "30"} and damaged.found
    assert wrong_type == UserRecord.unknown(14)
    raw = records_to_raw_users([damaged, wrong_type], now=3_000, max_history=CAP)
    assert list(raw.interaction_count) == [2, 0]
    # The event repairs what it owns: count restarts from the kept actions, timestamps from itself.
    assert (after.count, after.first_ts, after.last_ts) == (CAP, 2_000, 2_000)
    assert after.actions[0] == 41


@pytest.mark.parametrize("decode_responses", [False, True], ids=["bytes", "str"])
def test_stored_values_parse_by_one_rule_for_bytes_and_str_clients(
    redis_client: redis.Redis, layout: KeyLayout, decode_responses: bool
) -> None:
    """Lists of plain digits are converted in one go; any other entry is checked alone, by the rule of
    the Lua script (-?[0-9]+), whether the client returns bytes or decoded strings."""
    data = tiny_data()
    bulk_load(redis_client, layout, data, cap=CAP, progress=False)
    huge = "9" * 5_000  # more digits than int() converts by default
    redis_client.rpush(layout.actions_key(15), "12", "", "40")
    redis_client.rpush(layout.actions_key(16), "12", "\u0663", "40")  # an Arabic-Indic 3: not [0-9]
    redis_client.rpush(layout.actions_key(17), "12", huge, "+5", "007", "-0")
    redis_client.hset(layout.user_key(17), mapping={"count": huge, "first_ts": "-5", "last_ts": "\u0663"})
    # No record fields at all (only event ids; only an empty profile value): still a known user.
    redis_client.hset(layout.user_key(18), mapping={"event_ids": "a b"})
    redis_client.hset(layout.user_key(20), mapping={"gender": ""})
    redis_client.rpush(layout.actions_key(19), "\u0663")  # an unreadable entry still makes a known user

    async def scenario() -> tuple[list[UserRecord], UserRecord]:
        client = aredis.Redis(host=REDIS_HOST, port=REDIS_PORT, decode_responses=decode_responses)
        try:
            store = RedisFeatureStore(client, layout, cap=CAP, timeout_s=5.0)
            records = await store.get_users([15, 16, 17, 18, 19, 20, 1, 2, 3])
            return records, await store.record_event(2, 301, 5_001)  # the script's flat-list reply
        finally:
            await client.aclose()

    records, event = asyncio.run(scenario())
    odd, loaded = records[:6], records[6:]
    assert [r.actions for r in odd] == [[12, 40], [12, 40], [12, 7, 0], [], [], []]
    assert (odd[2].count, odd[2].first_ts, odd[2].last_ts) == (0, -5, None)
    assert odd[3:] == [UserRecord(u, found=True) for u in (18, 19, 20)]
    assert loaded == records_from_interactions(data, [1, 2, 3], cap=CAP)
    assert event == UserRecord(
        2, {"gender": "M", "occupation": "7", "zip_code": "02139"}, [301, 300], 2, 5_000, 5_001, True
    )


def test_get_users_answers_in_the_order_asked(backend: Backend) -> None:
    data = tiny_data()
    backend.load(data)
    asked = [3, 99, 1, 3, np.int64(2)]  # an unknown user, a repeated one, a numpy integer
    got = backend.run(lambda store: store.get_users(asked))
    assert got == records_from_interactions(data, [3, 99, 1, 3, 2], cap=CAP)
    assert [r.user_id for r in got] == [3, 99, 1, 3, 2] and not got[1].found
    assert backend.run(lambda store: store.get_users([])) == []


def test_unreachable_redis_raises_within_the_timeout() -> None:
    timeout_s = 0.15

    async def attempt(port: int) -> tuple[list[float], list[tuple[str, str]]]:
        client = aredis.Redis(host=REDIS_HOST, port=port)
        store = RedisFeatureStore(client, KeyLayout(), cap=CAP, timeout_s=timeout_s)
        elapsed, failures = [], []
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.get_users([1]),
            lambda: store.record_event(1, 2, 3),
            lambda: store.put_profile(1, {"gender": "F"}),
        ]
        for call in calls:
            started = time.perf_counter()
            with pytest.raises(FeatureStoreError) as caught:
                await call()
            elapsed.append(time.perf_counter() - started)
            failures.append((str(caught.value).split(":")[0], caught.value.reason))
        assert await store.ping() is False
        await client.aclose()
        return elapsed, failures

    async def silent_server() -> tuple[list[float], list[tuple[str, str]]]:
        # Accepts connections and never answers: only the timeout can end the call. The writers are
        # kept so that no connection is closed by garbage collection.
        writers: list[asyncio.StreamWriter] = []
        server = await asyncio.start_server(lambda _, writer: writers.append(writer), REDIS_HOST, 0)
        try:
            return await attempt(server.sockets[0].getsockname()[1])
        finally:
            for writer in writers:
                writer.close()
            server.close()

    operations = ["get_users", "record_event", "put_profile"]
    # redis-py's default retry backs off on a refused connection, so there either reason may come first.
    elapsed, failures = asyncio.run(attempt(1))
    assert max(elapsed) < timeout_s + 0.5, elapsed
    assert [operation for operation, _ in failures] == operations
    elapsed, failures = asyncio.run(silent_server())
    assert max(elapsed) < timeout_s + 0.5, elapsed
    assert failures == [(operation, "timeout") for operation in operations]


def test_exhausted_connection_pool_raises_feature_store_error(layout: KeyLayout) -> None:
    """redis-py's default pool refuses callers beyond max_connections instead of queuing them."""

    async def scenario() -> list[object]:
        client = aredis.Redis(host=REDIS_HOST, port=REDIS_PORT, max_connections=1)
        store = RedisFeatureStore(client, layout, cap=CAP, timeout_s=2.0)
        try:
            return await asyncio.gather(*(store.get_users([1]) for _ in range(2)), return_exceptions=True)
        finally:
            await client.aclose()

    outcomes = asyncio.run(scenario())
    assert any(isinstance(o, FeatureStoreError) for o in outcomes), outcomes


def test_create_client_fails_fast_and_survives_a_dropped_connection(
    redis_client: redis.Redis, layout: KeyLayout
) -> None:
    async def refused() -> float:
        client = create_client(f"redis://{REDIS_HOST}:1/0", timeout_s=2.0)
        store = RedisFeatureStore(client, layout, cap=CAP, timeout_s=2.0)
        started = time.perf_counter()
        with pytest.raises(FeatureStoreError, match="ConnectionError") as caught:
            await store.get_users([1])
        assert caught.value.reason == "unavailable"
        with pytest.raises(FeatureStoreError, match="^record_event: ConnectionError") as caught:
            await store.record_event(1, 2, 3)
        assert caught.value.reason == "unavailable"
        await client.aclose()
        return time.perf_counter() - started

    async def dropped() -> list[UserRecord]:
        client = create_client(REDIS_URL, max_connections=1, timeout_s=2.0)
        store = RedisFeatureStore(client, layout, cap=CAP, timeout_s=2.0)
        try:
            await store.record_event(1, 2, 3)
            # What a Redis restart or an idle timeout does to a pooled connection.
            redis_client.client_kill_filter(_id=await client.client_id())
            return await store.get_users([1])
        finally:
            await client.aclose()

    assert asyncio.run(refused()) < 1.0  # no backoff: a down Redis does not cost the whole timeout
    [record] = asyncio.run(dropped())
    assert record.count == 1
