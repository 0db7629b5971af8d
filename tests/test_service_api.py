"""The HTTP API end to end: a real uvicorn server over ``create_app``, the real Redis on 127.0.0.1:6379
(features bulk-loaded into a key prefix of each test's own), and a tiny trained model exported twice.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from index_builder.settings import IndexSettings
from model.artifacts import MANIFEST_FILE, USER_TOWER_FILE
from service.engine import ServingBundle, compute
from service.feature_store import KeyLayout, UserRecord
from service.schemas import RecommendResponse

# Asserts in the shared helpers get pytest's messages too (they are imported before pytest_plugins).
pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    DEAD_REDIS_URL,
    N_ITEMS,
    N_USERS,
    LiveServer,
    ServingArtifacts,
    live_server,
    load_users,
    metric,
    service_settings,
    stored_actions,
    stored_count,
    users_by_length,
)

# The shared fixtures (serving_artifacts, bundle_a, key_prefix; redis_client from conftest.py).
pytest_plugins = ["service_fixtures"]

UNKNOWN_USER = 10**12  # far outside the synthetic ids 1..300
LATENCY_STAGES = ("features", "queue", "model", "search", "total")


@dataclass
class Served:
    """A server on version A over a Redis prefix holding every user of the data set."""

    server: LiveServer
    layout: KeyLayout
    artifacts: ServingArtifacts
    redis: redis.Redis

    def actions(self, user_id: int) -> list[int]:
        return stored_actions(self.redis, self.layout, user_id)


@pytest.fixture()
def served(
    serving_artifacts: ServingArtifacts, redis_client: redis.Redis, key_prefix: str
) -> Iterator[Served]:
    layout = load_users(redis_client, key_prefix, serving_artifacts)
    with live_server(service_settings(serving_artifacts.a.directory, key_prefix)) as server:
        yield Served(server, layout, serving_artifacts, redis_client)


def long_user(artifacts: ServingArtifacts) -> int:
    """A user with more interactions than the store keeps (its actions list is full)."""
    lengths = users_by_length(artifacts.data)
    return int(lengths[lengths > artifacts.max_history + 10].index[0])


def short_user(artifacts: ServingArtifacts) -> int:
    lengths = users_by_length(artifacts.data)
    return int(lengths[(lengths >= 5) & (lengths < 10)].index[0])


def warm_up_user(artifacts: ServingArtifacts) -> int:
    lengths = users_by_length(artifacts.data)
    return int(lengths[(lengths >= 10) & (lengths < 50)].index[0])


def item_ids(answer: dict) -> list[int]:
    return [item["item_id"] for item in answer["items"]]


def assert_well_formed(answer: dict, k: int, artifacts: ServingArtifacts, version: str = "a") -> None:
    """The invariants of every successful /recommend answer."""
    served_version = getattr(artifacts, version)
    ids = item_ids(answer)
    assert len(ids) == k
    assert len(set(ids)) == len(ids), "duplicate items"
    assert set(ids) <= set(artifacts.catalog.tolist()), "ids outside the catalog"
    scores = [item["score"] for item in answer["items"]]
    assert all(np.isfinite(scores))
    assert all(a >= b for a, b in zip(scores, scores[1:], strict=False)), f"scores not sorted: {scores}"
    gate = answer["gate"]
    assert 0.0 <= gate["cold"] <= 1.0 and 0.0 <= gate["warm"] <= 1.0
    assert gate["cold"] + gate["warm"] == pytest.approx(1.0, abs=1e-5)
    assert answer["model_version"] == served_version.model_version
    assert answer["index_version"] == served_version.index_version
    latency = answer["latency_ms"]
    assert set(latency) == set(LATENCY_STAGES)
    assert all(latency[stage] >= 0.0 for stage in LATENCY_STAGES)
    assert all(latency["total"] >= latency[stage] for stage in LATENCY_STAGES)
    assert latency["total"] >= latency["features"] + latency["model"] + latency["search"] - 1e-6


# ----- /recommend -----------------------------------------------------------------------------------
def test_recommend_answers_k_unseen_items_with_scores_gate_versions_and_latency(served: Served) -> None:
    artifacts = served.artifacts
    for user_id in (long_user(artifacts), warm_up_user(artifacts), short_user(artifacts)):
        actions = served.actions(user_id)
        assert actions, "the user was bulk-loaded"
        response = served.server.recommend(user_id=user_id, k=20)
        assert response.status_code == 200, response.text
        answer = response.json()
        RecommendResponse.model_validate(answer)  # the body keeps the documented schema
        assert_well_formed(answer, 20, artifacts)
        assert answer["user_id"] == user_id
        assert answer["degraded"] is False and answer["degraded_reason"] is None
        assert not set(item_ids(answer)) & set(actions), "a recently seen item was recommended"
        count = stored_count(served.redis, served.layout, user_id)
        expected_group = "active" if count >= 50 else "warm_up" if count >= 10 else "cold_start"
        assert answer["user_group"] == expected_group

        # exclude_items drops exactly those items: the rest of the ranking moves up unchanged.
        first = item_ids(answer)
        dropped = first[:3] + [first[10]]
        again = served.server.recommend(user_id=user_id, k=20, exclude_items=dropped).json()
        assert_well_formed(again, 20, artifacts)
        assert not set(item_ids(again)) & set(dropped)
        assert not set(item_ids(again)) & set(actions)
        kept = [i for i in first if i not in dropped]
        assert item_ids(again)[: len(kept)] == kept

        # exclude_seen false: the same ranking with the seen items left in.
        everything = served.server.recommend(user_id=user_id, k=20, exclude_seen=False).json()
        assert_well_formed(everything, 20, artifacts)
        unseen = [i for i in item_ids(everything) if i not in set(actions)]
        assert first[: len(unseen)] == unseen


def test_recommend_is_deterministic_and_scores_match_the_model(
    served: Served, bundle_a: ServingBundle
) -> None:
    """Same request, same answer; and the answer is what the engine computes from Redis' record."""
    user_id = warm_up_user(served.artifacts)
    first = served.server.recommend(user_id=user_id, k=15).json()
    second = served.server.recommend(user_id=user_id, k=15).json()
    assert item_ids(first) == item_ids(second)
    actions = served.actions(user_id)
    record = UserRecord(
        user_id=user_id,
        actions=actions,
        count=stored_count(served.redis, served.layout, user_id),
        found=True,
    )
    # The profile and timestamps matter as well; read them as the service does.
    raw = {k.decode(): v.decode() for k, v in served.redis.hgetall(served.layout.user_key(user_id)).items()}
    record.profile = {
        name: raw[name] for name in ("gender", "age", "occupation", "zip_code") if raw.get(name)
    }
    record.first_ts, record.last_ts = int(raw["first_ts"]), int(raw["last_ts"])
    expected = compute(bundle_a, record, int(time.time()), 15, set(actions))
    assert item_ids(first) == expected.item_ids
    np.testing.assert_allclose([i["score"] for i in first["items"]], expected.scores, atol=1e-5)


def test_k_beyond_the_catalog_returns_every_remaining_item(served: Served) -> None:
    user_id = long_user(served.artifacts)
    actions = set(served.actions(user_id))
    extra = [item for item in served.artifacts.catalog.tolist() if item not in actions][:7]
    excluded = actions | set(extra)
    for k in (N_ITEMS - len(excluded) + 1, 1000):
        response = served.server.recommend(user_id=user_id, k=k, exclude_items=[*extra, 10**9])
        assert response.status_code == 200, response.text
        answer = response.json()
        assert_well_formed(answer, N_ITEMS - len(excluded), served.artifacts)
        assert set(item_ids(answer)) == set(served.artifacts.catalog.tolist()) - excluded

    # Everything excluded: an empty list, not an error.
    everything = served.server.recommend(
        user_id=user_id, k=10, exclude_items=served.artifacts.catalog.tolist()
    ).json()
    assert everything["items"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": 1, "k": 0}, "body.k"),
        ({"user_id": 1, "k": 1001}, "body.k"),
        ({"user_id": 1, "k": -5}, "body.k"),
        ({"user_id": 1, "k": "many"}, "body.k"),
        ({"k": 10}, "body.user_id"),
        ({"user_id": "alice"}, "body.user_id"),
        ({"user_id": -1}, "body.user_id"),
        ({"user_id": 2**63}, "body.user_id"),
        ({"user_id": 1.5}, "body.user_id"),
        ({"user_id": 1, "nprobe": 3}, "body.nprobe"),
        ({"user_id": 1, "exclude_items": ["x"]}, "body.exclude_items"),
        ({"user_id": 1, "exclude_items": list(range(10_001))}, "body.exclude_items"),
        ({"user_id": 1, "exclude_seen": "perhaps"}, "body.exclude_seen"),
    ],
)
def test_invalid_recommend_bodies_are_422_naming_the_field(served: Served, body: dict, field: str) -> None:
    response = served.server.client.post("/recommend", json=body)
    assert response.status_code == 422, response.text
    message = response.json()["message"]
    assert field in message, message


def test_k_bounds_are_inclusive(served: Served) -> None:
    for k in (1, 1000):
        response = served.server.recommend(user_id=short_user(served.artifacts), k=k)
        assert response.status_code == 200, response.text
        assert len(response.json()["items"]) == min(
            k, N_ITEMS - len(served.actions(short_user(served.artifacts)))
        )


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"user_id": 1,', {"content-type": "application/json"}),
        (b"user_id=1", {"content-type": "application/json"}),
        (b"", {"content-type": "application/json"}),
        (b"[1, 2]", {"content-type": "application/json"}),
        (b"null", {"content-type": "application/json"}),
        (b'{"user_id": 1}', {"content-type": "text/plain"}),
        (b"\xff\xfe", {"content-type": "application/json"}),
    ],
)
def test_malformed_bodies_are_422_never_500(served: Served, content: bytes, headers: dict) -> None:
    response = served.server.client.post("/recommend", content=content, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["message"]


def test_unknown_user_is_served_as_cold_start(served: Served, bundle_a: ServingBundle) -> None:
    assert served.actions(UNKNOWN_USER) == []
    response = served.server.recommend(user_id=UNKNOWN_USER, k=25)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert_well_formed(answer, 25, served.artifacts)
    assert answer["user_group"] == "cold_start"
    assert answer["degraded"] is False and answer["degraded_reason"] is None
    # Nothing is known of either user, so two unknown users get the same answer: the engine's for an
    # empty record. Reading an unknown user writes nothing.
    other = served.server.recommend(user_id=UNKNOWN_USER + 1, k=25).json()
    assert item_ids(other) == item_ids(answer)
    assert item_ids(answer) == compute(bundle_a, UserRecord.unknown(UNKNOWN_USER), 0, 25, set()).item_ids
    assert served.redis.exists(served.layout.user_key(UNKNOWN_USER)) == 0


# ----- events and users -----------------------------------------------------------------------------
def test_events_turn_a_cold_user_warm(served: Served) -> None:
    client = served.server.client
    user_id = UNKNOWN_USER + 7
    before = served.server.recommend(user_id=user_id, k=10).json()
    assert before["user_group"] == "cold_start"
    # Items outside the cold answer, so that a changed answer is the model's doing, not the exclusion's.
    events = [i for i in served.artifacts.catalog.tolist() if i not in set(item_ids(before))][20:32]
    start = int(time.time()) - 3600
    stamps = [start + 60 * n for n in range(len(events))]
    groups = []
    for n, (item, stamp) in enumerate(zip(events, stamps, strict=True), start=1):
        response = client.post("/events", json={"user_id": user_id, "item_id": item, "timestamp": stamp})
        assert response.status_code == 200, response.text
        state = response.json()
        assert state["interaction_count"] == n
        assert state["recent_items"] == events[:n][::-1]
        groups.append(served.server.recommend(user_id=user_id, k=10).json()["user_group"])
    assert groups == ["cold_start"] * 9 + ["warm_up"] * 3

    state = client.get(f"/users/{user_id}").json()
    assert state == {
        "user_id": user_id,
        "interaction_count": len(events),
        "first_timestamp": stamps[0],
        "last_timestamp": stamps[-1],
        "recent_items": events[::-1],
        "user_group": "warm_up",
    }
    assert served.actions(user_id) == events[::-1]
    assert stored_count(served.redis, served.layout, user_id) == len(events)

    after = served.server.recommend(user_id=user_id, k=10).json()
    assert_well_formed(after, 10, served.artifacts)
    assert after["user_group"] == "warm_up"
    assert not set(item_ids(after)) & set(events)
    assert item_ids(after) != item_ids(before)
    assert after["gate"] != before["gate"]


def test_event_without_timestamp_uses_now_and_bad_events_are_422(served: Served) -> None:
    client = served.server.client
    user_id = UNKNOWN_USER + 8
    before = int(time.time())
    state = client.post("/events", json={"user_id": user_id, "item_id": 5}).json()
    assert before <= state["first_timestamp"] == state["last_timestamp"] <= int(time.time())
    for body, field in (
        ({"user_id": user_id, "item_id": -1}, "body.item_id"),
        ({"user_id": user_id}, "body.item_id"),
        ({"user_id": user_id, "item_id": 3, "timestamp": -5}, "body.timestamp"),
        ({"user_id": user_id, "item_id": 3, "rating": 5}, "body.rating"),
        ({"user_id": user_id, "item_id": 3, "event_id": "has space"}, "body.event_id"),
        ({"user_id": user_id, "item_id": 3, "event_id": ""}, "body.event_id"),
    ):
        response = client.post("/events", json=body)
        assert response.status_code == 422, response.text
        assert field in response.json()["message"]
    assert client.get(f"/users/{user_id}").json()["interaction_count"] == 1

    # A retry carrying the same event_id (after a 503 or a lost answer) counts once.
    retry = {"user_id": user_id, "item_id": 6, "event_id": "order-17:view"}
    answers = [client.post("/events", json=retry).json() for _ in range(3)]
    assert [a["interaction_count"] for a in answers] == [2, 2, 2]
    assert answers[-1]["recent_items"] == [6, 5]
    # The same id with another item is a client bug, not a retry: 409, and nothing changes.
    reused = client.post("/events", json={**retry, "item_id": 7})
    assert reused.status_code == 409
    assert "order-17:view" in reused.json()["message"]
    assert client.get(f"/users/{user_id}").json()["recent_items"] == [6, 5]


def test_get_user_of_a_loaded_and_an_unknown_user(served: Served) -> None:
    client = served.server.client
    user_id = long_user(served.artifacts)
    state = client.get(f"/users/{user_id}").json()
    assert state["recent_items"] == served.actions(user_id)
    assert len(state["recent_items"]) == served.artifacts.max_history
    assert state["interaction_count"] == stored_count(served.redis, served.layout, user_id)
    assert state["interaction_count"] > served.artifacts.max_history
    assert client.get(f"/users/{UNKNOWN_USER}").json() == {
        "user_id": UNKNOWN_USER,
        "interaction_count": 0,
        "first_timestamp": None,
        "last_timestamp": None,
        "recent_items": [],
        "user_group": "cold_start",
    }
    assert client.get("/users/-3").status_code == 422
    assert client.get("/users/abc").status_code == 422


def test_profile_accepts_unknown_values_and_rejects_unknown_fields(served: Served) -> None:
    client = served.server.client
    user_id = UNKNOWN_USER + 9
    response = client.put(f"/users/{user_id}/profile", json={"occupation": "astronaut", "gender": "F"})
    assert response.status_code == 200, response.text
    assert response.json() == {"user_id": user_id, "profile": {"occupation": "astronaut", "gender": "F"}}
    raw = served.redis.hgetall(served.layout.user_key(user_id))
    assert raw[b"occupation"] == b"astronaut" and raw[b"gender"] == b"F"
    # Other fields are left as they were.
    client.put(f"/users/{user_id}/profile", json={"age": "25"})
    assert client.put(f"/users/{user_id}/profile", json={}).json()["profile"] == {
        "occupation": "astronaut",
        "gender": "F",
        "age": "25",
    }
    answer = served.server.recommend(user_id=user_id, k=10)
    assert answer.status_code == 200, answer.text
    assert_well_formed(answer.json(), 10, served.artifacts)
    assert answer.json()["user_group"] == "cold_start"

    for body, field in (
        ({"planet": "mars"}, "body.planet"),
        ({"occupation": 7}, "body.occupation"),
        ({"zip_code": "9" * 65}, "body.zip_code"),
    ):
        response = client.put(f"/users/{user_id}/profile", json=body)
        assert response.status_code == 422, response.text
        assert field in response.json()["message"]


# ----- Redis down -----------------------------------------------------------------------------------
def test_redis_down_degrades_reads_and_refuses_writes(
    serving_artifacts: ServingArtifacts, bundle_a: ServingBundle, key_prefix: str
) -> None:
    settings = service_settings(
        serving_artifacts.a.directory, key_prefix, redis_url=DEAD_REDIS_URL, redis_timeout_ms=50
    )
    with live_server(settings) as server:
        user_id = long_user(serving_artifacts)
        cold = compute(bundle_a, UserRecord.unknown(user_id), 0, 12, set()).item_ids
        for _ in range(2):
            started = time.perf_counter()
            response = server.recommend(user_id=user_id, k=12)
            assert time.perf_counter() - started < 2.0
            assert response.status_code == 200, response.text
            answer = response.json()
            assert_well_formed(answer, 12, serving_artifacts)
            assert answer["degraded"] is True
            assert answer["degraded_reason"] in ("feature_store_unavailable", "feature_store_timeout")
            assert answer["user_group"] == "cold_start"
            assert item_ids(answer) == cold
        reason = answer["degraded_reason"]
        samples = server.metrics()
        assert metric(samples, "coldwarm_degraded_answers_total", reason=reason) == 2
        assert metric(samples, "coldwarm_redis_errors_total", operation="get_users") == 2

        event = server.client.post("/events", json={"user_id": user_id, "item_id": 3, "timestamp": 1})
        assert event.status_code == 503
        assert "feature store unavailable" in event.json()["detail"]
        assert server.client.put(f"/users/{user_id}/profile", json={"age": "25"}).status_code == 503
        assert server.client.get(f"/users/{user_id}").status_code == 503

        ready = server.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False
        assert ready.json()["feature_store"] == {
            "kind": "redis",
            "reachable": False,
            "loaded": None,  # the marker cannot be read either
            "marker": None,
            "marker_required": True,
        }
        assert server.client.get("/healthz").status_code == 200

        samples = server.metrics()
        assert metric(samples, "coldwarm_redis_errors_total", operation="record_event") == 1
        assert metric(samples, "coldwarm_redis_errors_total", operation="put_profile") == 1
        assert metric(samples, "coldwarm_redis_errors_total", operation="get_users") == 3
        assert metric(samples, "coldwarm_degraded_answers_total", reason=reason) == 2
        labels = {"endpoint": "/events", "status": "503", "user_group": "none"}
        assert metric(samples, "coldwarm_requests_total", **labels) == 1


def test_readyz_with_redis_up(served: Served) -> None:
    response = served.server.client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True
    store = body["feature_store"]
    marker = store.pop("marker")
    assert store == {"kind": "redis", "reachable": True, "loaded": True, "marker_required": True}
    assert marker["users"] == N_USERS and marker["version"] and marker["time"] > 0
    assert body["model_version"] == served.artifacts.a.model_version
    assert body["index_version"] == served.artifacts.a.index_version
    assert body["n_items"] == N_ITEMS


# ----- reload ---------------------------------------------------------------------------------------
def corrupt_copies(source: Path, into: Path) -> dict[str, tuple[Path, str]]:
    """Broken artifacts directories, each a copy of ``source`` with one thing wrong, and the name the
    refusal must mention."""
    broken = {}
    truncated = into / "truncated-tower"
    shutil.copytree(source, truncated)
    tower = truncated / USER_TOWER_FILE
    tower.write_bytes(tower.read_bytes()[:100])
    broken["truncated user tower"] = (truncated, USER_TOWER_FILE)
    no_manifest = into / "no-manifest"
    shutil.copytree(source, no_manifest)
    (no_manifest / MANIFEST_FILE).unlink()
    broken["manifest removed"] = (no_manifest, "no-manifest")
    no_index = into / "no-index"
    shutil.copytree(source, no_index)
    shutil.rmtree(no_index / "index")
    broken["index removed"] = (no_index, "no index found")
    broken["missing directory"] = (into / "does-not-exist", "does-not-exist")
    return broken


def test_admin_reload(
    serving_artifacts: ServingArtifacts,
    redis_client: redis.Redis,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    a, b = serving_artifacts.a, serving_artifacts.b
    load_users(redis_client, key_prefix, serving_artifacts)
    user_id = warm_up_user(serving_artifacts)
    # A root of this test's own: reloads may only name directories inside the configured root, and the
    # broken copies below must lie there to be refused for what is wrong with them.
    root = tmp_path / "artifacts"
    a_dir, b_dir = (shutil.copytree(v.directory, root / v.directory.name) for v in (a, b))
    settings = service_settings(a_dir, key_prefix, admin_token="s3cret-token")
    good = {"authorization": "Bearer s3cret-token"}
    with live_server(settings) as server:
        client = server.client
        answer_a = server.recommend(user_id=user_id, k=10).json()
        assert_well_formed(answer_a, 10, serving_artifacts, "a")

        body = {"artifacts_dir": b_dir.name}
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": "Basic s3cret-token"},
            {"authorization": "s3cret-token"},
            {"authorization": "Bearer"},
        ):
            response = client.post("/admin/reload", json=body, headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
        assert server.recommend(user_id=user_id, k=10).json()["model_version"] == a.model_version

        response = client.post("/admin/reload", json=body, headers=good)
        assert response.status_code == 200, response.text
        assert response.json() == {
            "model_version": b.model_version,
            "index_version": b.index_version,
            "n_items": N_ITEMS,
        }
        answer_b = server.recommend(user_id=user_id, k=10).json()
        assert_well_formed(answer_b, 10, serving_artifacts, "b")
        assert item_ids(answer_b) != item_ids(answer_a)

        broken = corrupt_copies(a.directory, root)
        for name, (directory, culprit) in broken.items():
            response = client.post("/admin/reload", json={"artifacts_dir": str(directory)}, headers=good)
            assert response.status_code == 422, (name, response.text)
            message = response.json()["message"]
            assert "still serving the previous version" in message, name
            assert culprit in message, (name, message)
            still = server.recommend(user_id=user_id, k=10)
            assert still.status_code == 200, (name, still.text)
            assert item_ids(still.json()) == item_ids(answer_b), name
            assert still.json()["model_version"] == b.model_version, name

        samples = server.metrics()
        assert metric(samples, "coldwarm_reloads_total", result="ok") == 1
        assert metric(samples, "coldwarm_reloads_total", result="refused") == len(broken)
        info = {"model_version": b.model_version, "index_version": b.index_version}
        served = {"search_backend": "faiss-cpu", "device": "cpu", "tower_format": "torchscript"}
        assert metric(samples, "coldwarm_serving_info", **info, **served) == 1
        ready = client.get("/readyz").json()
        assert (ready["model_version"], ready["index_version"]) == (b.model_version, b.index_version)
        assert (ready["search_backend"], ready["exact_batch_from"]) == (
            "faiss-cpu",
            IndexSettings().exact_batch_from,
        )

        # No body: the configured directory (A) again.
        response = client.post("/admin/reload", headers=good)
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == a.model_version
        assert item_ids(server.recommend(user_id=user_id, k=10).json()) == item_ids(answer_a)

        response = client.post("/admin/reload", json={"artifacts_dir": str(b_dir), "x": 1}, headers=good)
        assert response.status_code == 422 and "body.x" in response.json()["message"]

        # Nothing outside the configured root is ever loaded, however it is spelt.
        for outside in (str(b.directory), "../elsewhere", f"{b_dir.name}/../../{b_dir.name}", "/etc"):
            response = client.post("/admin/reload", json={"artifacts_dir": outside}, headers=good)
            assert response.status_code == 422, (outside, response.text)
            assert "inside the artifacts root" in response.json()["message"], outside
        (root / "link-out").symlink_to(b.directory)
        response = client.post("/admin/reload", json={"artifacts_dir": "link-out"}, headers=good)
        assert response.status_code == 422 and "inside the artifacts root" in response.json()["message"]
        assert server.recommend(user_id=user_id, k=10).json()["model_version"] == a.model_version


def test_admin_reload_is_404_without_a_token(served: Served) -> None:
    response = served.server.client.post(
        "/admin/reload",
        json={"artifacts_dir": str(served.artifacts.b.directory)},
        headers={"authorization": "Bearer anything"},
    )
    assert response.status_code == 404
    assert served.server.recommend(user_id=1, k=5).json()["model_version"] == served.artifacts.a.model_version


# ----- metrics --------------------------------------------------------------------------------------
def test_metrics_after_traffic(served: Served) -> None:
    client = served.server.client
    artifacts = served.artifacts
    users = {"active": long_user(artifacts), "warm_up": warm_up_user(artifacts), "cold_start": UNKNOWN_USER}
    for group, user_id in users.items():
        answer = served.server.recommend(user_id=user_id, k=10).json()
        assert answer["user_group"] == group
    assert client.post("/recommend", json={"user_id": 1, "k": 0}).status_code == 422
    assert client.post("/events", json={"user_id": UNKNOWN_USER + 3, "item_id": 4}).status_code == 200
    assert client.get("/no-such-path").status_code == 404

    samples = served.server.metrics()
    for group in users:
        labels = {"endpoint": "/recommend", "status": "200", "user_group": group}
        assert metric(samples, "coldwarm_requests_total", **labels) == 1, group
        assert metric(samples, "coldwarm_gate_cold_weight_count", user_group=group) == 1, group
    assert (
        metric(samples, "coldwarm_requests_total", endpoint="/recommend", status="422", user_group="none")
        == 1
    )
    assert (
        metric(samples, "coldwarm_requests_total", endpoint="/events", status="200", user_group="cold_start")
        == 1
    )
    # An unmatched path is one label value, not the path: scanners must not grow the series.
    not_found = [
        labels
        for (name, labels), _ in samples.items()
        if name == "coldwarm_requests_total" and ("status", "404") in labels
    ]
    assert len(not_found) == 1 and ("endpoint", "/no-such-path") not in not_found[0]

    for stage in LATENCY_STAGES:
        assert ("coldwarm_stage_latency_seconds_bucket", (("le", "0.0005"), ("stage", stage))) in samples, (
            stage
        )
        assert ("coldwarm_stage_latency_seconds_bucket", (("le", "5e-05"), ("stage", stage))) in samples, (
            stage
        )
        assert metric(samples, "coldwarm_stage_latency_seconds_count", stage=stage) == 3, stage
        assert metric(samples, "coldwarm_stage_latency_seconds_bucket", le="+Inf", stage=stage) == 3, stage
    info = {"model_version": artifacts.a.model_version, "index_version": artifacts.a.index_version}
    served = {"search_backend": "faiss-cpu", "device": "cpu", "tower_format": "torchscript"}
    assert metric(samples, "coldwarm_serving_info", **info, **served) == 1
    assert metric(samples, "coldwarm_index_items") == N_ITEMS == len(artifacts.catalog)
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")


# ----- concurrency ----------------------------------------------------------------------------------
def test_fifty_concurrent_requests(served: Served) -> None:
    lengths = users_by_length(served.artifacts.data)
    users = [int(u) for u in lengths.index[:: max(1, len(lengths) // 25)][:25]] + [UNKNOWN_USER]
    sequential = {u: item_ids(served.server.recommend(user_id=u, k=10).json()) for u in users}
    requests = [users[n % len(users)] for n in range(50)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.server.url, timeout=60.0) as client:
            return await asyncio.gather(
                *(client.post("/recommend", json={"user_id": u, "k": 10}) for u in requests)
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 50
    for user_id, response in zip(requests, responses, strict=True):
        answer = response.json()
        assert answer["user_id"] == user_id
        assert answer["degraded"] is False
        assert item_ids(answer) == sequential[user_id], "concurrent answers mixed up users"
