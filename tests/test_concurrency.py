"""Many concurrent /events, /recommend and GET /users/{id} for the same few users, against a real
uvicorn server and the real Redis.

The interaction count an /events answer carries is the position its event took in the user's
history (the record_event script is atomic), so the answers alone say in which order Redis applied
the events. Every state the service showed, from /events or GET /users, must then be exactly the state
after that many events: the newest ``min(count, cap)`` items in that order. A read that took the user's
hash and actions list at two different instants ("torn") would pair a count with a list of another
moment and fail that check.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from model.evaluation.protocol import user_group
from service.feature_store import KeyLayout
from service.settings import ServiceSettings

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    ServingArtifacts,
    live_server,
    service_settings,
    stored_actions,
    stored_count,
)

pytest_plugins = ["service_fixtures"]

FIRST_USER = 2 * 10**9  # fresh users: nothing stored under the test's prefix
N_USERS = 5
EVENTS_PER_USER = 80  # beyond the actions cap (50): the list keeps the newest, the count all of them
READS_PER_USER = 40  # of each kind: GET /users/{id} and POST /recommend
IN_FLIGHT = 50
# Bounded, although the test settings' queue budget (COLDWARM_MAX_QUEUE_MS) is generous: shedding is
# not what this test is about.
RECOMMEND_IN_FLIGHT = 16
K = 10
BASE_TS = 1_700_000_000


@dataclass(frozen=True)
class Op:
    kind: str  # "event", "get" or "recommend"
    user_id: int
    item_id: int = -1
    timestamp: int = -1


@dataclass
class Answer:
    op: Op
    status: int
    body: Any


async def perform(
    client: httpx.AsyncClient, op: Op, in_flight: asyncio.Semaphore, recommends: asyncio.Semaphore
) -> Answer:
    async with in_flight:
        if op.kind == "event":
            body = {"user_id": op.user_id, "item_id": op.item_id, "timestamp": op.timestamp}
            response = await client.post("/events", json=body)
        elif op.kind == "get":
            response = await client.get(f"/users/{op.user_id}")
        else:
            async with recommends:
                response = await client.post("/recommend", json={"user_id": op.user_id, "k": K})
    return Answer(op, response.status_code, response.json())


async def run_all(url: str, ops: list[Op]) -> list[Answer]:
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    in_flight, recommends = asyncio.Semaphore(IN_FLIGHT), asyncio.Semaphore(RECOMMEND_IN_FLIGHT)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as client:
        return list(await asyncio.gather(*(perform(client, op, in_flight, recommends) for op in ops)))


def plan(artifacts: ServingArtifacts) -> tuple[list[Op], dict[int, dict[int, int]]]:
    """Every operation, shuffled; and per user, the timestamp of each of its (distinct) items."""
    rng = random.Random(3)
    catalog = artifacts.catalog.tolist()
    ops, stamps = [], {}
    for user in range(FIRST_USER, FIRST_USER + N_USERS):
        items = rng.sample(catalog, EVENTS_PER_USER)  # distinct: each stored item names one event
        stamps[user] = {item: BASE_TS + 60 * n for n, item in enumerate(items)}
        ops += [Op("event", user, item, stamp) for item, stamp in stamps[user].items()]
        ops += [Op("get", user) for _ in range(READS_PER_USER)]
        ops += [Op("recommend", user) for _ in range(READS_PER_USER)]
    rng.shuffle(ops)
    return ops, stamps


def state_after(order: dict[int, int], count: int, cap: int) -> list[int]:
    """recent_items after ``count`` events: the newest first, at most ``cap``."""
    return [order[n] for n in range(count, max(count - cap, 0), -1)]


def test_concurrent_events_and_reads_of_the_same_users_stay_consistent(
    serving_artifacts: ServingArtifacts, redis_client: redis.Redis, key_prefix: str
) -> None:
    cap = serving_artifacts.max_history
    assert cap < EVENTS_PER_USER  # the trimming path is part of the test
    ops, stamps = plan(serving_artifacts)
    # The users exist only through the events sent here: a store that starts empty on purpose.
    settings: ServiceSettings = service_settings(
        serving_artifacts.a.directory, key_prefix, require_feature_marker=False
    )
    with live_server(settings) as server:
        started = time.perf_counter()
        answers = asyncio.run(run_all(server.url, ops))
        elapsed = time.perf_counter() - started
        final_reads = {u: server.client.get(f"/users/{u}").json() for u in stamps}
    assert len(answers) == len(ops)

    refused = [(a.op, a.status, a.body) for a in answers if a.status != 200]
    assert not refused, f"{len(refused)} non-200 answers in {elapsed:.1f}s, e.g. {refused[:3]}"

    layout = KeyLayout(key_prefix)
    torn, between = [], 0
    for user, item_stamps in stamps.items():
        events = [a for a in answers if a.op.kind == "event" and a.op.user_id == user]
        assert len(events) == EVENTS_PER_USER
        # Each event got a count of its own: together exactly 1..n, the order Redis applied them in.
        counts = sorted(a.body["interaction_count"] for a in events)
        assert counts == list(range(1, EVENTS_PER_USER + 1)), f"user {user}: counts {Counter(counts)}"
        order = {a.body["interaction_count"]: a.op.item_id for a in events}

        # Every state shown, by /events or GET /users, is exactly the state after its count of events.
        reads = [a for a in answers if a.op.kind == "get" and a.op.user_id == user]
        for answer in events + reads:
            state = answer.body
            count, recent = state["interaction_count"], state["recent_items"]
            assert state["user_id"] == user
            assert state["user_group"] == user_group(count)
            if len(recent) != min(count, cap) or recent != state_after(order, count, cap):
                torn.append((answer.op.kind, user, count, len(recent)))
                continue
            applied = [item_stamps[item] for item in state_after(order, count, EVENTS_PER_USER)]
            assert (state["first_timestamp"], state["last_timestamp"]) == (
                (min(applied), max(applied)) if applied else (None, None)
            )
        between += sum(0 < a.body["interaction_count"] < EVENTS_PER_USER for a in reads)

        # The end state, in Redis and through the API: every acknowledged event counted once, the
        # newest `cap` of them in the list, in the order they were applied.
        expected = state_after(order, EVENTS_PER_USER, cap)
        assert stored_count(redis_client, layout, user) == EVENTS_PER_USER
        assert stored_actions(redis_client, layout, user) == expected
        assert final_reads[user] == {
            "user_id": user,
            "interaction_count": EVENTS_PER_USER,
            "first_timestamp": min(item_stamps.values()),
            "last_timestamp": max(item_stamps.values()),
            "recent_items": expected,
            "user_group": user_group(EVENTS_PER_USER),
        }
    assert not torn, f"{len(torn)} torn reads (kind, user, count, len(recent_items)): {torn[:10]}"
    # The reads did race the writes: most saw a user part way through its events.
    assert between >= N_USERS * READS_PER_USER / 2

    # Every /recommend: a full, normal answer from version A, whatever the user's state was then.
    catalog = set(serving_artifacts.catalog.tolist())
    for answer in (a for a in answers if a.op.kind == "recommend"):
        body = answer.body
        items = [item["item_id"] for item in body["items"]]
        assert body["user_id"] == answer.op.user_id
        assert (body["degraded"], body["degraded_reason"]) == (False, None)
        assert len(items) == K == len(set(items)) and set(items) <= catalog
        assert body["model_version"] == serving_artifacts.a.model_version
