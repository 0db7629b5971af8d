"""What the service serves is what the evaluation measures: protocol points replayed through the real
HTTP API (profile, events with their timestamps, /recommend at the point's request time) against a real
uvicorn server and the real Redis get the offline ArtifactsRanker's top-k, its scores, its gate, and so
its metrics; and /recommend refuses a request_time it cannot mean.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import redis

from model.artifacts import load_artifacts
from model.evaluation.metrics import EMPTY_SLOT
from model.evaluation.protocol import (
    EvalPoint,
    build_eval_points,
    evaluate,
    evaluate_rankings,
    gate_cold_means,
    rank_points,
)
from model.ranker import ArtifactsRanker, ModelRanker, item_columns, on_catalog
from service.feature_store import KeyLayout
from service.replay import (
    DATA_TIME,
    MODES,
    WALL_CLOCK,
    ReplayError,
    ReplayResult,
    replay_points,
)

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    LiveServer,
    ServingArtifacts,
    delete_namespace,
    live_server,
    service_settings,
    users_by_length,
)

pytest_plugins = ["service_fixtures"]

# 60 > the store's cap of 50 actions: exclude_items must carry what the stored list no longer holds.
HISTORY_LENGTHS = (0, 1, 5, 20, 60)
K = 100
SCORE_TOLERANCE = 1e-4
GATE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Replayed:
    points: list[EvalPoint]
    catalog: np.ndarray  # the protocol's catalog
    ranker: ArtifactsRanker  # version A offline, from the same artifacts the server loads
    replay: ReplayResult
    server: LiveServer
    model_version: str


def replay_case_points(artifacts: ServingArtifacts) -> list[EvalPoint]:
    """Unseen test users: two long ones at every length (h = 60 among them), three up to h = 20, two
    up to h = 5 (the synthetic split has only two test users with 70 interactions)."""
    lengths = users_by_length(artifacts.data)
    test_users = [int(u) for u in artifacts.split.test]
    long_users = [u for u in test_users if lengths[u] >= max(HISTORY_LENGTHS) + 10][:2]
    middle_users = [u for u in test_users if 30 <= lengths[u] < max(HISTORY_LENGTHS) + 10][:3]
    short_users = [u for u in test_users if 15 <= lengths[u] < 30][:2]
    points = build_eval_points(artifacts.data, long_users + middle_users + short_users, HISTORY_LENGTHS)
    assert sum(p.h > 50 for p in points) == 2
    assert {p.h for p in points} == set(HISTORY_LENGTHS)
    assert 20 <= len(points) <= 30
    return points


@pytest.fixture(scope="module")
def replayed(serving_artifacts: ServingArtifacts, redis_client: redis.Redis) -> Iterator[Replayed]:
    """One replay of the points in both modes, against version A served by one server for the module.

    Module-scoped, so its key prefix is its own (like ``key_prefix``, which is per test) and every key
    under it is deleted afterwards.
    """
    prefix = f"coldwarm-replay-test-{uuid.uuid4().hex}"
    version = serving_artifacts.a
    catalog = serving_artifacts.data.catalog_item_ids()
    points = replay_case_points(serving_artifacts)
    ranker = ArtifactsRanker(
        "offline", load_artifacts(version.directory), serving_artifacts.data.users, catalog
    )
    try:
        # The replay writes every user through the API: a store that starts empty on purpose.
        settings = service_settings(version.directory, prefix, require_feature_marker=False)
        with live_server(settings) as server:
            replay = asyncio.run(
                replay_points(
                    server.url,
                    points,
                    serving_artifacts.data,
                    catalog,
                    modes=MODES,
                    k=K,
                    concurrency=4,
                    expected_model_version=version.model_version,
                )
            )
            yield Replayed(points, catalog, ranker, replay, server, version.model_version)
    finally:
        delete_namespace(redis_client, KeyLayout(prefix))


def test_artifacts_ranker_scores_what_the_trained_model_scores(
    serving_artifacts: ServingArtifacts, replayed: Replayed
) -> None:
    """The exported tower and item table give the eager net's score_all, column for column."""
    net_ranker = ModelRanker(
        "net",
        serving_artifacts.a.net,
        serving_artifacts.encoder,
        serving_artifacts.data.users,
        replayed.catalog,
    )
    np.testing.assert_allclose(
        replayed.ranker.score(replayed.points),
        net_ranker.score(replayed.points),
        atol=SCORE_TOLERANCE,
        rtol=0,
    )


def test_model_ranker_gates_are_the_exported_towers_and_leave_the_training_mode(
    serving_artifacts: ServingArtifacts, replayed: Replayed
) -> None:
    net = serving_artifacts.a.net
    net_ranker = ModelRanker(
        "net", net, serving_artifacts.encoder, serving_artifacts.data.users, replayed.catalog
    )
    net.train()
    try:
        gates = net_ranker.gates(replayed.points)
        assert net.training  # restored after the eval-mode call
    finally:
        net.eval()
    _, _, exported = replayed.ranker.user_side(replayed.points)
    np.testing.assert_allclose(gates, exported.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(gates.sum(axis=1), 1.0, atol=1e-6)


def test_item_columns_map_any_item_order_onto_the_catalog() -> None:
    columns = item_columns(np.array([30, 10, 20]), np.array([5, 10, 20, 30, 40]))
    np.testing.assert_array_equal(columns, [-1, 1, 2, 0, -1])
    scores = on_catalog(np.array([[3.0, 1.0, 2.0]]), columns)
    np.testing.assert_array_equal(scores, [[-np.inf, 1.0, 2.0, 3.0, -np.inf]])
    assert (item_columns(np.array([], dtype=np.int64), np.array([1, 2])) == -1).all()


def test_served_top_k_and_scores_equal_the_offline_artifacts_ranker(replayed: Replayed) -> None:
    served = replayed.replay.modes[DATA_TIME]
    assert served.degraded == 0, served.degraded_reasons
    offline = rank_points(replayed.ranker, replayed.points, replayed.catalog, K, progress=False)
    assert (offline != EMPTY_SLOT).all()  # 200 items, at most 60 excluded: every list is full
    for row, point in enumerate(replayed.points):
        np.testing.assert_array_equal(
            served.ranked[row], offline[row], err_msg=f"user {point.user_id} h={point.h}"
        )
    scores = replayed.ranker.score(replayed.points).astype(np.float64)
    np.testing.assert_allclose(
        served.scores, np.take_along_axis(scores, offline, axis=1), atol=SCORE_TOLERANCE, rtol=0
    )
    # The protocol excludes all h history items, beyond the store's cap of 50 recent ones too.
    for row, point in enumerate(replayed.points):
        assert not set(served.item_ids[row].tolist()) & set(point.history_item_ids.tolist())
    assert any(p.h > 50 for p in replayed.points)


def test_served_gate_and_metrics_equal_offline(replayed: Replayed) -> None:
    served = replayed.replay.modes[DATA_TIME]
    gates = replayed.ranker.gates(replayed.points)
    np.testing.assert_allclose(served.gates, gates, atol=GATE_TOLERANCE, rtol=0)
    offline = evaluate(replayed.ranker, replayed.points, replayed.catalog, progress=False)
    online = evaluate_rankings("served", replayed.points, served.ranked, replayed.catalog)
    assert online.points == offline.points
    assert online.groups == offline.groups
    assert online.curve == offline.curve
    # Not trivially equal: the figures are not all zero, the gate moves with the history.
    assert offline.groups["all"]["recall@100"] > 0
    means = gate_cold_means(replayed.points, served.gates)
    assert means.keys() == {"cold_start", "warm_up", "active", "all"}
    assert means["cold_start"] != pytest.approx(means["active"], abs=1e-4)


def test_the_wall_clock_mode_queries_the_same_state_at_another_time(replayed: Replayed) -> None:
    """Without request_time the service's clock is "now": years after the synthetic data, so the state
    features, and with them the gate, differ from the data-time answers of the same stored users."""
    data_time, wall_clock = replayed.replay.modes[DATA_TIME], replayed.replay.modes[WALL_CLOCK]
    assert wall_clock.degraded == 0
    assert wall_clock.model_versions == data_time.model_versions == [replayed.model_version]
    warm = np.array([p.h > 0 for p in replayed.points])
    assert np.abs(wall_clock.gates[warm] - data_time.gates[warm]).max() > 1e-4
    for row, point in enumerate(replayed.points):
        assert not set(wall_clock.item_ids[row].tolist()) & set(point.history_item_ids.tolist())


def test_a_user_id_that_already_holds_events_is_refused(
    serving_artifacts: ServingArtifacts, replayed: Replayed
) -> None:
    """Replayed onto an id that holds another user's history, the point would be measured with both
    histories: the replay checks what the store holds and refuses."""
    taken = next(i for i, p in enumerate(replayed.points) if p.h == 20)
    point = next(p for p in replayed.points if p.h == 5 and p.user_id != replayed.points[taken].user_id)
    with pytest.raises(ReplayError, match="replayed before"):
        asyncio.run(
            replay_points(
                replayed.server.url,
                [point],
                serving_artifacts.data,
                replayed.catalog,
                modes=(DATA_TIME,),
                base_user_id=replayed.replay.base_user_id + taken,
            )
        )


def test_request_time_in_the_future_or_negative_is_422(replayed: Replayed) -> None:
    server = replayed.server
    future = int(time.time()) + 3600
    response = server.recommend(user_id=1, k=5, request_time=future)
    assert response.status_code == 422, response.text
    assert "request_time" in response.json()["message"] and "future" in response.json()["message"]
    response = server.recommend(user_id=1, k=5, request_time=-1)
    assert response.status_code == 422, response.text
    assert "request_time" in response.json()["message"]
    # A past request_time and none at all are both fine.
    assert server.recommend(user_id=1, k=5, request_time=int(time.time()) - 86_400).status_code == 200
    assert server.recommend(user_id=1, k=5).status_code == 200


def test_a_non_200_answer_raises_with_its_body(
    serving_artifacts: ServingArtifacts, replayed: Replayed
) -> None:
    """A point whose request_time the service refuses (in the future) stops the replay with the body."""
    point = replayed.points[0]
    future = EvalPoint(
        point.user_id,
        point.h,
        point.history_item_ids,
        point.history_timestamps,
        point.target_item_ids,
        int(time.time()) + 3600,
    )
    with pytest.raises(ReplayError, match="answered 422.*in the future"):
        asyncio.run(
            replay_points(
                replayed.server.url,
                [future],
                serving_artifacts.data,
                replayed.catalog,
                modes=(DATA_TIME,),
                base_user_id=replayed.replay.base_user_id + 10_000,
            )
        )
