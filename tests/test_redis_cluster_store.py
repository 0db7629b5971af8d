"""The feature store on a real Redis Cluster, beyond the contract suite it shares with one Redis
(tests/test_feature_store.py runs every store test on the cluster too): reads of many users take one
MULTI per slot, every cluster failure is a FeatureStoreError (never anything a route would turn into a
500), a killed master's users fail over to its replica, and the service reports the cluster's state."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot
from redis.exceptions import CrossSlotTransactionError, SlotNotCoveredError
from redis_cluster import Cluster, running_cluster

from service.feature_store import FeatureStoreError, RedisFeatureStore
from service.feature_store.client import create_client
from service.feature_store.keys import KeyLayout
from service.feature_store.loader import bulk_load

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import ServingArtifacts, live_server, service_settings  # noqa: E402

pytest_plugins = ["service_fixtures"]

CAP = 20
USERS = list(range(1, 61))


def open_store(cluster: Cluster, layout: KeyLayout, timeout_s: float = 2.0) -> RedisFeatureStore:
    return RedisFeatureStore(create_client(cluster.url, 64, timeout_s, cluster=True), layout, CAP, timeout_s)


def slots(layout: KeyLayout, users: list[int]) -> set[int]:
    return {key_slot(layout.user_key(u).encode()) for u in users}


def test_a_read_of_many_users_is_one_multi_per_slot_in_the_order_asked(redis_cluster: Cluster) -> None:
    layout = KeyLayout(prefix=f"coldwarm-test-{uuid.uuid4().hex}")

    async def scenario() -> tuple[list[Any], list[list[int]]]:
        store = open_store(redis_cluster, layout)
        for user in USERS:
            await store.record_event(user, 1000 + user, 1_000 + user)
        reads: list[list[int]] = []
        read = store._read

        async def counted(user_ids: list[int]) -> list[Any]:
            reads.append(list(user_ids))
            return await read(user_ids)

        store._read = counted  # type: ignore[method-assign]
        asked = [*reversed(USERS), 10**12, 7]
        records = await store.get_users(asked)
        await store.client.aclose()
        return records, reads

    records, reads = asyncio.run(scenario())
    assert [r.user_id for r in records] == [*reversed(USERS), 10**12, 7]
    assert [r.actions for r in records[:3]] == [[1060], [1059], [1058]]
    assert not records[-2].found and records[-1].actions == [1007]
    # One MULTI per slot the users fall in, each holding only that slot's users.
    assert len(reads) == len(slots(layout, [*USERS, 10**12]))
    assert all(len(slots(layout, users)) == 1 for users in reads)


@pytest.mark.parametrize(
    "error", [SlotNotCoveredError("slot 7 is not covered"), CrossSlotTransactionError("x")]
)
def test_cluster_errors_are_feature_store_errors(redis_cluster: Cluster, error: Exception) -> None:
    """redis-py's cluster errors are not RedisErrors; the store must still map them (a 500 otherwise)."""
    layout = KeyLayout(prefix=f"coldwarm-test-{uuid.uuid4().hex}")

    async def scenario() -> FeatureStoreError:
        store = open_store(redis_cluster, layout)

        async def failing(user_ids: list[int]) -> list[Any]:
            raise error

        store._read = failing  # type: ignore[method-assign]
        try:
            with pytest.raises(FeatureStoreError) as caught:
                await store.get_users([1, 2])
            return caught.value
        finally:
            await store.client.aclose()

    caught = asyncio.run(scenario())
    assert caught.reason == "unavailable" and type(error).__name__ in str(caught)


def test_a_killed_master_fails_over_and_only_its_slots_fail_meanwhile(tmp_path: Path) -> None:
    """SIGKILL a master of a private cluster: its users' reads and writes fail as FeatureStoreError
    (never another exception) until its replica is promoted; the other masters' users never fail;
    then everything works again, with what was written before the kill."""
    layout = KeyLayout(prefix="failover")
    with running_cluster(tmp_path) as cluster:

        async def scenario() -> dict[str, Any]:
            store = open_store(cluster, layout, timeout_s=0.5)
            for user in USERS:
                await store.record_event(user, 1000 + user, 1_000)
            # Replication is asynchronous: a quiet cluster copies the writes within milliseconds.
            await asyncio.sleep(0.5)
            victim = cluster.masters()[0]
            node = store.client.get_node(host="127.0.0.1", port=victim)
            owned = {u for u in USERS if store.client.get_node_from_key(layout.user_key(u)).name == node.name}
            cluster.kill(victim)
            failures: dict[str, int] = {"owned": 0, "others": 0}
            started, recovered = time.monotonic(), None
            while time.monotonic() - started < 30:
                for user in USERS:
                    try:
                        await store.record_event(user, 2000 + user, 2_000, event_id=f"after-{user}")
                    except FeatureStoreError:
                        failures["owned" if user in owned else "others"] += 1
                if failures["owned"] and all([await ok(store, u) for u in owned]):
                    recovered = time.monotonic() - started
                    break
                await asyncio.sleep(0.2)
            # What survived is read once the cluster has settled: on a loaded machine the first read of
            # every slot right after the promotion can exceed the 0.5 s bound, which is not the point here.
            records = None
            for _ in range(20):
                try:
                    records = await store.get_users(USERS)
                    break
                except FeatureStoreError:
                    await asyncio.sleep(0.5)
            await store.client.aclose()
            return {"owned": owned, "failures": failures, "recovered": recovered, "records": records}

        outcome = asyncio.run(scenario())
    assert outcome["owned"], "the killed master held no test user"
    assert outcome["failures"]["owned"] > 0 and outcome["failures"]["others"] == 0, outcome["failures"]
    assert outcome["recovered"] is not None, "the replica was never promoted"
    assert outcome["records"] is not None, "the cluster never answered a read of every user again"
    for record in outcome["records"]:
        # The first event survived the failover (it reached the replica before the kill, as the
        # replication of a quiet cluster does within milliseconds); the retried one counts once.
        assert record.actions[-1] == 1000 + record.user_id
        assert record.actions.count(2000 + record.user_id) == 1


async def ok(store: RedisFeatureStore, user: int) -> bool:
    try:
        await store.record_event(user, 2000 + user, 2_000, event_id=f"after-{user}")
        return True
    except FeatureStoreError:
        return False


def test_the_service_serves_from_a_cluster_and_reports_its_state(
    serving_artifacts: ServingArtifacts, redis_cluster: Cluster
) -> None:
    prefix = f"coldwarm-test-{uuid.uuid4().hex}"
    # load-features into the cluster: the users, and the load marker in the slot of its key.
    admin = redis_cluster.client()
    data, cap = serving_artifacts.data, serving_artifacts.max_history
    stats = bulk_load(admin, KeyLayout(prefix), data, cap=cap, progress=False)
    admin.close()
    settings = service_settings(
        serving_artifacts.a.directory, prefix, redis_url=redis_cluster.url, redis_cluster=True
    )
    with live_server(settings) as server:
        ready = server.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        store = ready.json()["feature_store"]
        assert stats.marker is not None
        assert store == {
            "kind": "redis-cluster",
            "reachable": True,
            "cluster_state": "ok",
            "loaded": True,
            "marker": stats.marker.as_dict(),
            "marker_required": True,
        }
        item = int(serving_artifacts.catalog[0])
        for user in USERS[:20]:
            response = server.client.post(
                "/events", json={"user_id": user, "item_id": item, "timestamp": 1_000}
            )
            assert response.status_code == 200, response.text
        batch = server.client.post(
            "/recommend/batch", json={"requests": [{"user_id": u, "k": 5} for u in USERS]}
        )
        assert batch.status_code == 200
        results = batch.json()["results"]
        assert all(not r["degraded"] and len(r["items"]) == 5 for r in results)
        # exclude_seen: the item each of the first 20 users just saw is not recommended to them.
        assert all(item not in [i["item_id"] for i in r["items"]] for r in results[:20])
    client = redis_cluster.client()
    for key in list(client.scan_iter(match=f"{prefix}:*", count=1000)):
        client.delete(key)
    client.close()


def test_waiting_for_a_replica_acknowledges_only_replicated_events(
    redis_cluster: Cluster, redis_client: Any
) -> None:
    """WAIT 1: on the cluster (one replica a master) every event is acknowledged; on the single Redis
    of these machines (no replica) none is, yet each is applied once, however often it is retried."""
    prefix = f"coldwarm-test-{uuid.uuid4().hex}"
    layout = KeyLayout(prefix=prefix)

    async def on_cluster() -> list[Any]:
        client = create_client(redis_cluster.url, 16, 2.0, cluster=True)
        store = RedisFeatureStore(client, layout, CAP, 2.0, wait_replicas=1, wait_timeout_ms=500)
        records = [await store.record_event(u, 500 + u, 1_000, event_id=f"w{u}") for u in USERS[:10]]
        await client.aclose()
        return records

    async def on_single() -> tuple[list[FeatureStoreError], Any]:
        client = create_client("redis://127.0.0.1:6379/0", 16, 2.0)
        store = RedisFeatureStore(client, layout, CAP, 2.0, wait_replicas=1, wait_timeout_ms=20)
        failures = []
        for _ in range(3):  # the caller retries after each 503
            with pytest.raises(FeatureStoreError) as caught:
                await store.record_event(7, 77, 1_000, event_id="retried")
            failures.append(caught.value)
        [record] = await store.get_users([7])
        await client.aclose()
        return failures, record

    records = asyncio.run(on_cluster())
    assert [r.actions for r in records] == [[500 + u] for u in USERS[:10]]
    failures, record = asyncio.run(on_single())
    assert all("0 of 1 replicas" in str(f) for f in failures)
    assert (record.count, record.actions) == (1, [77])
    for key in redis_client.scan_iter(match=layout.pattern()):
        redis_client.delete(key)
    client = redis_cluster.client()
    for key in list(client.scan_iter(match=layout.pattern(), count=1000)):
        client.delete(key)
    client.close()
