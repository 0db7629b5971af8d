"""The service when things go wrong around it: broken artifacts at start-up (not ready, repaired by a
reload), reloads under load (consistent versions, old bundles freed), overload (load shed with the
cold-start answer), and secrets kept out of logs. Real uvicorn and the real Redis throughout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import shutil
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from index_builder.build import INDEX_FILE, INDEX_MANIFEST_FILE, resolve_index_dir
from index_builder.faiss_index import build_index, search
from index_builder.search_backends import FaissSearch
from index_builder.settings import IndexSettings
from model.artifacts import FEATURES_FILE, MANIFEST_FILE, USER_TOWER_FILE, ArtifactError
from service.engine import (
    COLD_ANSWER_SIZE,
    OverloadedError,
    Recommender,
    ServingBundle,
    compute,
    embed_user,
    load_bundle,
)
from service.feature_store import KeyLayout, UserRecord
from service.feature_store.redis_store import parse_record
from service.settings import redacted_url

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    ServingArtifacts,
    live_server,
    load_users,
    one_request_queued,
    service_settings,
)

pytest_plugins = ["service_fixtures"]

TOKEN = "reliability-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
UNKNOWN_USER = 10**12


# ----- broken artifacts -------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(path: Path, **changes: str) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _index_dir(version_dir: Path) -> Path:
    return resolve_index_dir(version_dir)


# name -> (damage done to a copy of a version directory, what the refusal must name)
BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated user tower": (lambda d: _truncate(d / USER_TOWER_FILE), USER_TOWER_FILE),
    "truncated index": (lambda d: _truncate(_index_dir(d) / INDEX_FILE), INDEX_FILE),
    "index of another model": (
        lambda d: _edit_json(_index_dir(d) / INDEX_MANIFEST_FILE, model_version="0123456789ab"),
        INDEX_MANIFEST_FILE,
    ),
    "manifest of another version": (
        lambda d: _edit_json(d / MANIFEST_FILE, model_version="0123456789ab"),
        MANIFEST_FILE,
    ),
    "missing features file": (lambda d: (d / FEATURES_FILE).unlink(), FEATURES_FILE),
    "missing index": (lambda d: shutil.rmtree(d / "index"), "no index found"),
}


def broken_copy(source: Path, root: Path, breakage: str) -> tuple[Path, str]:
    damage, culprit = BREAKAGES[breakage]
    target = root / breakage.replace(" ", "-")
    shutil.copytree(source, target)
    damage(target)
    return target, culprit


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_artifacts_are_refused_naming_the_file(
    serving_artifacts: ServingArtifacts, tmp_path: Path, breakage: str
) -> None:
    directory, culprit = broken_copy(serving_artifacts.a.directory, tmp_path, breakage)
    with pytest.raises(ArtifactError) as raised:
        load_bundle(directory, IndexSettings())
    assert culprit in str(raised.value)
    assert str(directory) in str(raised.value)


@pytest.mark.parametrize("breakage", ["truncated user tower", "truncated index"])
def test_service_with_broken_artifacts_is_not_ready_until_a_good_reload(
    serving_artifacts: ServingArtifacts, key_prefix: str, tmp_path: Path, breakage: str
) -> None:
    root = tmp_path / "artifacts"
    good = shutil.copytree(serving_artifacts.a.directory, root / serving_artifacts.a.directory.name)
    broken, culprit = broken_copy(serving_artifacts.a.directory, root, breakage)
    with live_server(
        service_settings(broken, key_prefix, admin_token=TOKEN, require_feature_marker=False)
    ) as server:
        client = server.client
        assert client.get("/healthz").status_code == 200  # alive: an orchestrator must not kill it
        ready = client.get("/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert body["ready"] is False and body["artifacts"]["loaded"] is False
        assert culprit in body["artifacts"]["error"]
        # The reason, not the server's directory layout: paths stay in the logs.
        assert str(tmp_path) not in ready.text
        assert body["model_version"] is None and body["n_items"] == 0

        refused = server.recommend(user_id=1, k=5)
        assert refused.status_code == 503
        assert "not ready" in refused.json()["message"] and culprit in refused.json()["message"]
        assert str(tmp_path) not in refused.text
        # Writes do not need the model: events keep flowing into the store.
        event = client.post("/events", json={"user_id": UNKNOWN_USER, "item_id": 3})
        assert event.status_code == 200 and event.json()["interaction_count"] == 1

        response = client.post("/admin/reload", json={"artifacts_dir": good.name}, headers=AUTH)
        assert response.status_code == 200, response.text
        assert client.get("/readyz").json()["ready"] is True
        answer = server.recommend(user_id=1, k=5)
        assert answer.status_code == 200
        assert answer.json()["model_version"] == serving_artifacts.a.model_version
        assert len(answer.json()["items"]) == 5


# ----- reloads under load -------------------------------------------------------------------------------
def test_reloads_under_load_answer_every_request_with_a_consistent_pair_and_free_old_bundles(
    serving_artifacts: ServingArtifacts, redis_client: redis.Redis, key_prefix: str
) -> None:
    a, b = serving_artifacts.a, serving_artifacts.b
    layout = load_users(redis_client, key_prefix, serving_artifacts)
    pairs = {(a.model_version, a.index_version), (b.model_version, b.index_version)}
    # One request time for every request, so each answer can be recomputed offline afterwards.
    now = int(time.time())
    answers: list[tuple[int, dict]] = []
    failures: list[str] = []
    stop = threading.Event()

    def traffic(url: str, worker: int) -> None:
        with httpx.Client(base_url=url, timeout=10.0) as client:
            n = 0
            while not stop.is_set():
                n += 1
                user_id = (worker * 37 + n) % 300 + 1 if n % 4 else UNKNOWN_USER + n
                try:
                    response = client.post(
                        "/recommend", json={"user_id": user_id, "k": 10, "request_time": now}
                    )
                except httpx.HTTPError as error:
                    failures.append(f"{type(error).__name__}: {error}")
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text}")
                else:
                    answers.append((user_id, response.json()))

    with live_server(service_settings(a.directory, key_prefix, admin_token=TOKEN)) as server:
        recommender = server.app.state.coldwarm.recommender
        workers = [threading.Thread(target=traffic, args=(server.url, w)) for w in range(4)]
        for worker in workers:
            worker.start()
        swapped_out = []
        try:
            for i in range(10):
                swapped_out.append(weakref.ref(recommender.bundle))
                target = b if i % 2 == 0 else a
                response = server.client.post(
                    "/admin/reload", json={"artifacts_dir": target.directory.name}, headers=AUTH
                )
                assert response.status_code == 200, response.text
                assert response.json()["model_version"] == target.model_version
                time.sleep(0.1)
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=30)
        assert recommender.bundle.model_version == a.model_version
        gc.collect()
        alive = [ref().model_version for ref in swapped_out if ref() is not None]
        assert alive == [], f"bundles still referenced after being swapped out: {alive}"

    assert failures == []
    assert len(answers) >= 50, "too little traffic overlapped the reloads to show anything"
    served_pairs = {(answer["model_version"], answer["index_version"]) for _, answer in answers}
    assert served_pairs == pairs
    assert not any(answer["degraded"] for _, answer in answers)
    assert all(len(answer["items"]) == 10 for _, answer in answers)
    assert_each_answer_is_its_named_version(answers, now, redis_client, layout, [a.directory, b.directory])


def stored_record(client: redis.Redis, layout: KeyLayout, user_id: int) -> UserRecord:
    """The user's record as the service parses it from Redis."""
    fields = client.hgetall(layout.user_key(user_id))
    return parse_record(user_id, fields, client.lrange(layout.actions_key(user_id), 0, -1))


def assert_each_answer_is_its_named_version(
    answers: list[tuple[int, dict]],
    now: int,
    client: redis.Redis,
    layout: KeyLayout,
    versions: list[Path],
) -> None:
    """Every answer's items and scores are what the version it names computes, not only its name:
    a batch that took the model of one bundle and the index of the other, or an answer labelled
    with the bundle current when it was sent instead of the one that computed it, fails here."""
    # IndexSettings() from the environment, as the service builds its own.
    bundles = {bundle.model_version: bundle for bundle in (load_bundle(v, IndexSettings()) for v in versions)}
    records = {user_id: stored_record(client, layout, user_id) for user_id in {u for u, _ in answers}}
    differing = 0
    for user_id, answer in answers:
        record = records[user_id]
        expected = {
            version: compute(bundle, record, now, 10, set(record.actions))
            for version, bundle in bundles.items()
        }
        named = expected[answer["model_version"]]
        assert [item["item_id"] for item in answer["items"]] == named.item_ids, (user_id, answer)
        assert [item["score"] for item in answer["items"]] == pytest.approx(named.scores, abs=1e-5)
        differing += len({tuple(e.item_ids) for e in expected.values()}) > 1
    # The check has teeth only where the two versions answer differently.
    assert differing >= len(answers) // 2


# ----- overload ----------------------------------------------------------------------------------------
def _cold_ids(bundle: ServingBundle, k: int, exclude: set[int]) -> list[int]:
    return compute(bundle, UserRecord.unknown(0), int(time.time()), k, exclude).item_ids


def test_recommender_sheds_beyond_its_queue_budget_with_the_cold_answer(bundle_a: ServingBundle) -> None:
    assert bundle_a.cold_answer is not None
    assert len(bundle_a.cold_answer.item_ids) == min(COLD_ANSWER_SIZE, bundle_a.n_items)

    async def scenario() -> None:
        # Unbatched, one second per request (as if measured), 1.5 s of queue allowed: two may wait,
        # not three.
        recommender = Recommender(bundle_a, history_cap=50, max_queue_ms=1500, max_batch=1)
        recommender.batcher.cost.observe(1, 1.0)
        model_thread_free = threading.Event()
        recommender.batcher.executor.submit(model_thread_free.wait)  # the model thread is busy
        queued = [
            asyncio.create_task(recommender.recommend(UserRecord.unknown(u), int(time.time()), 5, set()))
            for u in (1, 2)
        ]
        await asyncio.sleep(0.05)
        assert recommender.pending == 2 and recommender.expected_wait_s == 2.0
        with pytest.raises(OverloadedError):
            await recommender.recommend(UserRecord.unknown(3), int(time.time()), 5, set())
        model_thread_free.set()
        results = await asyncio.gather(*queued)
        assert all(len(result.item_ids) == 5 for result in results)
        assert recommender.pending == 0
        assert recommender.batcher.cost.seconds < 0.9  # moved towards the real (millisecond) cost
        recommender.close()

    asyncio.run(scenario())
    recommender = Recommender(bundle_a, history_cap=50)
    exclude = set(_cold_ids(bundle_a, 3, set()))
    shed = recommender.shed(10, exclude)
    assert shed.item_ids == _cold_ids(bundle_a, 10, exclude)
    assert shed.model_version == bundle_a.model_version and shed.index_version == bundle_a.index_version
    recommender.close()


def test_overloaded_service_answers_degraded_instead_of_queueing(
    serving_artifacts: ServingArtifacts, key_prefix: str
) -> None:
    # No queueing allowed: a request arriving while another one is computed is shed.
    settings = service_settings(
        serving_artifacts.a.directory, key_prefix, max_queue_ms=0, require_feature_marker=False
    )
    with live_server(settings) as server:
        recommender = server.app.state.coldwarm.recommender
        with one_request_queued(server) as first:
            assert recommender.pending == 1

            shed = server.recommend(user_id=UNKNOWN_USER, k=5)
            assert shed.status_code == 200
            body = shed.json()
            assert body["degraded"] is True and body["degraded_reason"] == "overloaded"
            assert [item["item_id"] for item in body["items"]] == _cold_ids(recommender.bundle, 5, set())
            assert body["model_version"] == serving_artifacts.a.model_version

        assert first[0].status_code == 200 and first[0].json()["degraded"] is False
        samples = server.client.get("/metrics").text
        assert 'coldwarm_degraded_answers_total{reason="overloaded"} 1.0' in samples


# ----- approximate index running short -----------------------------------------------------------------
def test_an_approximate_index_that_runs_short_falls_back_to_exact_search(bundle_a: ServingBundle) -> None:
    """IVF probing 1 of 4 lists reaches about a quarter of the catalog: a large k still gets k items, the
    exact ranking's."""
    item_ids = bundle_a.artifacts.items.item_ids
    ivf = build_index(bundle_a.vectors, item_ids, IndexSettings(type="ivf", nlist=4, nprobe=1))
    short = dataclasses.replace(bundle_a, index=ivf, searcher=FaissSearch(ivf))
    record, now, k = UserRecord.unknown(0), int(time.time()), len(item_ids) - 5
    _, reached = search(ivf, embed_user(short, record, now)[0], k)
    assert (reached[0] < 0).any(), "the IVF index was meant to run short"
    answer = compute(short, record, now, k, {int(item_ids[0])})
    exact = compute(bundle_a, record, now, k, {int(item_ids[0])})
    assert len(answer.item_ids) == k
    assert answer.item_ids == exact.item_ids
    assert answer.scores == pytest.approx(exact.scores, abs=1e-5)


# ----- secrets -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://app:hunter2@cache.example.com/1", "rediss://app:***@cache.example.com/1"),
        ("redis://app@redis:6379", "redis://app@redis:6379"),
        ("redis://redis:6379/0?password=hunter2", "redis://redis:6379/0?password=***"),
        (
            "redis://app:one@redis:6379/0?socket_timeout=1&Password=two",
            "redis://app:***@redis:6379/0?socket_timeout=1&Password=***",
        ),
    ],
)
def test_redacted_url_hides_only_the_password(url: str, expected: str) -> None:
    assert redacted_url(url) == expected


def test_secrets_stay_out_of_logs_reprs_and_answers(
    serving_artifacts: ServingArtifacts, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = service_settings(
        serving_artifacts.a.directory,
        key_prefix,
        admin_token="tok-7d1f",
        redis_url="redis://app:hunter2@127.0.0.1:1/0",  # nothing listens: every call fails
        redis_timeout_ms=100,
    )
    assert "tok-7d1f" not in repr(settings) and "tok-7d1f" not in str(settings)
    with caplog.at_level(logging.DEBUG), live_server(settings) as server:
        answer = server.recommend(user_id=1, k=5)
        assert answer.status_code == 200 and answer.json()["degraded"] is True
        event = server.client.post("/events", json={"user_id": 1, "item_id": 2})
        wrong = server.client.post("/admin/reload", headers={"authorization": "Bearer tok-7d1"})
        texts = [answer.text, event.text, wrong.text, server.client.get("/readyz").text]
    assert event.status_code == 503 and wrong.status_code == 401
    assert "app:***@127.0.0.1" in caplog.text  # the store's start-up line, redacted
    for text in [caplog.text, *texts]:
        assert "hunter2" not in text and "tok-7d1f" not in text
