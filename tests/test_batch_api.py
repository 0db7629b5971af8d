"""POST /recommend/batch end to end (a real uvicorn server, the real Redis on 127.0.0.1:6379, features
bulk-loaded into this test's key prefix): each result is what /recommend answers for the same request,
a bad entry gets its own error, a store failure or an overload degrades every entry as /recommend
would, and the batching metrics show the work was done in model batches."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from service.schemas import MAX_BATCH_USERS, BatchRecommendResponse

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    DEAD_REDIS_URL,
    LiveServer,
    ServingArtifacts,
    live_server,
    load_users,
    metric,
    one_request_queued,
    service_settings,
    stored_actions,
    users_by_length,
)

pytest_plugins = ["service_fixtures"]

UNKNOWN_USER = 10**12
SCORE_TOLERANCE = 1e-5


@pytest.fixture()
def server(
    serving_artifacts: ServingArtifacts, redis_client: redis.Redis, key_prefix: str
) -> Iterator[LiveServer]:
    load_users(redis_client, key_prefix, serving_artifacts)
    with live_server(service_settings(serving_artifacts.a.directory, key_prefix)) as live:
        yield live


def some_users(artifacts: ServingArtifacts, n: int) -> list[int]:
    lengths = users_by_length(artifacts.data)
    return [int(u) for u in lengths.sort_values().index[:: max(1, len(lengths) // n)][:n]]


def batch(server: LiveServer, requests: list[Any]) -> httpx.Response:
    return server.client.post("/recommend/batch", json={"requests": requests})


def assert_same(batched: dict[str, Any], single: dict[str, Any]) -> None:
    assert [i["item_id"] for i in batched["items"]] == [i["item_id"] for i in single["items"]]
    assert [i["score"] for i in batched["items"]] == pytest.approx(
        [i["score"] for i in single["items"]], abs=SCORE_TOLERANCE
    )
    for field in ("user_id", "user_group", "model_version", "index_version", "degraded", "degraded_reason"):
        assert batched[field] == single[field], field
    assert batched["gate"]["cold"] == pytest.approx(single["gate"]["cold"], abs=SCORE_TOLERANCE)


def test_each_result_is_the_recommend_answer_and_bad_entries_fail_alone(
    server: LiveServer, serving_artifacts: ServingArtifacts
) -> None:
    users = some_users(serving_artifacts, 12)
    catalog = serving_artifacts.catalog.tolist()
    requests: list[Any] = []
    for row, user in enumerate([*users, UNKNOWN_USER]):
        request: dict[str, Any] = {"user_id": user, "k": (3, 10, 25)[row % 3]}
        if row % 4 == 1:
            request["exclude_seen"] = False
        if row % 4 == 2:
            request["exclude_items"] = catalog[:15]
        requests.append(request)
    future = int(time.time()) + 10 * 86_400
    bad: dict[int, Any] = {
        2: {"user_id": "7"},  # strict: a string is not a user id
        5: {"user_id": 1, "k": 0},
        7: {"user_id": 1, "colour": "red"},
        9: {"user_id": 1, "request_time": future},
        11: 42,  # not even an object
    }
    mixed = list(requests)
    for index, entry in bad.items():
        mixed.insert(index, entry)

    response = batch(server, mixed)
    assert response.status_code == 200, response.text
    body = response.json()
    BatchRecommendResponse.model_validate(body)
    results = body["results"]
    assert len(results) == len(mixed)
    good = iter(requests)
    for index, result in enumerate(results):
        if index in bad:
            assert result["index"] == index and result["status"] == 422, result
            assert result["message"], result
            continue
        request = next(good)
        single = server.recommend(**request)
        assert single.status_code == 200
        assert_same(result, single.json())
        assert len(result["items"]) == request["k"]
    assert "future" in results[9]["message"]
    assert "k" in results[5]["message"]


def test_the_batch_is_computed_in_one_model_call(
    server: LiveServer, serving_artifacts: ServingArtifacts
) -> None:
    users = some_users(serving_artifacts, 40)
    before = server.metrics()
    response = batch(server, [{"user_id": u, "k": 5} for u in users])
    assert response.status_code == 200
    results = response.json()["results"]
    assert {r["latency_ms"]["model"] for r in results} == {results[0]["latency_ms"]["model"]}
    after = server.metrics()
    calls = metric(after, "coldwarm_batch_size_count") - metric(before, "coldwarm_batch_size_count")
    users_computed = metric(after, "coldwarm_batch_size_sum") - metric(before, "coldwarm_batch_size_sum")
    assert (calls, users_computed) == (1, len(users))
    assert metric(after, "coldwarm_batch_size_bucket", le="32.0") == metric(
        before, "coldwarm_batch_size_bucket", le="32.0"
    )
    assert (
        metric(after, "coldwarm_batch_size_bucket", le="64.0")
        - metric(before, "coldwarm_batch_size_bucket", le="64.0")
        == 1
    )


def test_envelope_errors_are_422_for_the_whole_call(server: LiveServer) -> None:
    too_many = [{"user_id": u, "k": 1} for u in range(MAX_BATCH_USERS + 1)]
    for body in ({"requests": []}, {"requests": too_many}, {"users": [1]}, [1, 2]):
        response = server.client.post("/recommend/batch", json=body)
        assert response.status_code == 422, body
        assert response.json()["message"]


def test_a_dead_store_degrades_every_entry(serving_artifacts: ServingArtifacts, key_prefix: str) -> None:
    settings = service_settings(serving_artifacts.a.directory, key_prefix, redis_url=DEAD_REDIS_URL)
    with live_server(settings) as server:
        response = batch(server, [{"user_id": u, "k": 5} for u in (1, 2, UNKNOWN_USER)])
        assert response.status_code == 200
        results = response.json()["results"]
        cold = server.recommend(user_id=UNKNOWN_USER, k=5).json()
        for result in results:
            assert result["degraded"] is True and result["degraded_reason"] == "feature_store_unavailable"
            assert result["user_group"] == "cold_start"
            assert [i["item_id"] for i in result["items"]] == [i["item_id"] for i in cold["items"]]


def test_an_overload_sheds_the_whole_batch_with_cold_answers(
    serving_artifacts: ServingArtifacts, redis_client: redis.Redis, key_prefix: str
) -> None:
    layout = load_users(redis_client, key_prefix, serving_artifacts)
    settings = service_settings(serving_artifacts.a.directory, key_prefix, max_queue_ms=0)
    with live_server(settings) as server:
        recommender = server.app.state.coldwarm.recommender
        with one_request_queued(server) as waiting:
            users = some_users(serving_artifacts, 3)
            response = batch(server, [{"user_id": u, "k": 4} for u in users])
        assert response.status_code == 200
        for user, result in zip(users, response.json()["results"], strict=True):
            assert result["degraded"] is True and result["degraded_reason"] == "overloaded"
            # The cold answer less what the user has seen, as /recommend sheds it.
            shed = recommender.shed(4, set(stored_actions(redis_client, layout, user)))
            assert [i["item_id"] for i in result["items"]] == shed.item_ids
        assert waiting[0].status_code == 200 and waiting[0].json()["degraded"] is False
