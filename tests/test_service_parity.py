"""Serving computes what the offline model computes: the same user description, the same embedding,
bias and gate from the exported TorchScript tower, the same full-catalog scores and top-k from the
FAISS index; and the index's recall is what its manifest says.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from index_builder.build import (
    INDEX_FILE,
    INDEX_MANIFEST_FILE,
    RECALL_SEED,
    build_index_artifacts,
    load_index,
    measure_recall,
    resolve_index_dir,
)
from index_builder.faiss_index import exact_search, read_index, search
from index_builder.recall import sample_user_queries
from index_builder.search_backends import FaissSearch
from index_builder.settings import IndexSettings
from index_builder.vectors import fold_bias, query_vectors
from model.artifacts import load_artifacts
from model.evaluation.protocol import EvalPoint, build_eval_points
from model.features import EncodedUsers
from model.ranker import encode_points
from service.engine import ServingBundle, compute
from service.feature_store import (
    MemoryFeatureStore,
    UserRecord,
    records_from_interactions,
    records_to_raw_users,
)

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import ServingArtifacts, user_profile, users_by_length  # noqa: E402

# The shared fixtures (serving_artifacts, bundle_a), registered once per session.
pytest_plugins = ["service_fixtures"]

# 60 > max_history (50): the stored actions list is capped while the count keeps growing.
HISTORY_LENGTHS = (0, 1, 5, 20, 60)
EMBEDDING_TOLERANCE = 1e-5
SCORE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParityCase:
    point: EvalPoint
    record: UserRecord  # what the service reads for the user at the point's request time


def replay(artifacts: ServingArtifacts, point: EvalPoint) -> UserRecord:
    """The user as the service learns of them: a profile write, then one event per history item."""

    async def run() -> UserRecord:
        store = MemoryFeatureStore(cap=artifacts.max_history)
        await store.put_profile(point.user_id, user_profile(artifacts.data, point.user_id))
        for item, stamp in zip(point.history_item_ids, point.history_timestamps, strict=True):
            await store.record_event(point.user_id, int(item), int(stamp))
        [record] = await store.get_users([point.user_id])
        return record

    return asyncio.run(run())


@pytest.fixture(scope="module")
def cases(serving_artifacts: ServingArtifacts) -> list[ParityCase]:
    """Points of unseen test users and of train users, at every history length they have."""
    lengths = users_by_length(serving_artifacts.data)
    long_users = set(lengths[lengths >= max(HISTORY_LENGTHS) + 10].index.tolist())
    test_users = [int(u) for u in serving_artifacts.split.test if int(u) in long_users][:4]
    train_users = [int(u) for u in serving_artifacts.split.train if int(u) in long_users][:2]
    short = [int(u) for u in serving_artifacts.split.test if 15 <= lengths[int(u)] < 30][:2]
    points = build_eval_points(serving_artifacts.data, test_users + train_users + short, HISTORY_LENGTHS)
    assert {p.h for p in points} == set(HISTORY_LENGTHS)
    assert len(points) >= 25
    return [ParityCase(point, replay(serving_artifacts, point)) for point in points]


def served_encoding(bundle: ServingBundle, cases: list[ParityCase]) -> EncodedUsers:
    encoder = bundle.artifacts.encoder
    raw = records_to_raw_users(
        [case.record for case in cases],
        [case.point.request_time for case in cases],
        encoder.config.max_history,
    )
    return encoder.encode_users(raw)


def tensors(users: EncodedUsers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.as_tensor(users.profile), torch.as_tensor(users.history), torch.as_tensor(users.state)


def test_replayed_records_equal_the_offline_records(
    serving_artifacts: ServingArtifacts, cases: list[ParityCase]
) -> None:
    for case in cases:
        point = case.point
        [offline] = records_from_interactions(
            serving_artifacts.data,
            [point.user_id],
            as_of=point.request_time,
            cap=serving_artifacts.max_history,
        )
        assert case.record == offline, (point.user_id, point.h)
        assert case.record.count == point.h
        assert len(case.record.actions) == min(point.h, serving_artifacts.max_history)
        assert case.record.actions == point.history_item_ids[::-1][: serving_artifacts.max_history].tolist()


def test_service_user_embedding_equals_the_offline_one(
    serving_artifacts: ServingArtifacts, bundle_a: ServingBundle, cases: list[ParityCase]
) -> None:
    points = [case.point for case in cases]
    offline_inputs = encode_points(points, serving_artifacts.data.users, serving_artifacts.encoder)
    served_inputs = served_encoding(bundle_a, cases)
    for part in ("profile", "history", "state"):
        np.testing.assert_array_equal(
            getattr(served_inputs, part), getattr(offline_inputs, part), err_msg=part
        )

    net = serving_artifacts.a.net.eval()
    with torch.no_grad():
        offline = net.user_tower(*tensors(offline_inputs))
        served = bundle_a.artifacts.user_tower(*tensors(served_inputs))
    for name, expected, actual in zip(("embedding", "user bias", "gate"), offline, served, strict=True):
        assert expected.shape == actual.shape, name
        diff = float((expected - actual).abs().max())
        assert diff <= EMBEDDING_TOLERANCE, f"{name}: max abs diff {diff}"
    # Not trivially equal: the users differ, and history moves the gate.
    embedding, _, gate = served
    assert float(torch.cdist(embedding, embedding).max()) > 0.1
    assert float(gate[:, 0].max() - gate[:, 0].min()) > 1e-3


def offline_scores(artifacts: ServingArtifacts, point: EvalPoint) -> np.ndarray:
    """score_all of the eager net: (n_catalog,), columns in catalog order."""
    encoded = encode_points([point], artifacts.data.users, artifacts.encoder)
    with torch.no_grad():
        return artifacts.a.net.eval().score_all(*tensors(encoded))[0].numpy().astype(np.float64)


def assert_offline_top_k(
    artifacts: ServingArtifacts, scores: np.ndarray, excluded: set[int], served_ids: list[int], k: int
) -> None:
    """The served ids are the offline top-k of the non-excluded items (ties within tolerance may swap)."""
    catalog = artifacts.catalog
    masked = scores.copy()
    masked[np.isin(catalog, list(excluded))] = -np.inf
    order = np.argsort(-masked, kind="stable")
    expected_k = min(k, int(np.isfinite(masked).sum()))
    expected_ids = catalog[order[:expected_k]].tolist()
    assert len(served_ids) == expected_k
    if served_ids == expected_ids:
        return
    # Only float noise may reorder: position by position, the scores must agree.
    served_scores = scores[artifacts.encoder.catalog_positions(np.array(served_ids))]
    np.testing.assert_allclose(served_scores, masked[order[:expected_k]], atol=SCORE_TOLERANCE)


@pytest.mark.parametrize("k", [10, 50, 1000])
def test_service_scores_and_top_k_equal_offline_score_all(
    serving_artifacts: ServingArtifacts, bundle_a: ServingBundle, cases: list[ParityCase], k: int
) -> None:
    assert bundle_a.index_manifest["type"] == "flat"
    for case in cases:
        point, record = case.point, case.record
        scores = offline_scores(serving_artifacts, point)
        for excluded in (set(record.actions), set()):  # exclude_seen true and false
            result = compute(bundle_a, record, point.request_time, k, excluded)
            assert result.model_version == serving_artifacts.a.model_version
            positions = serving_artifacts.encoder.catalog_positions(np.array(result.item_ids, dtype=np.int64))
            assert (positions >= 0).all()
            np.testing.assert_allclose(result.scores, scores[positions], atol=SCORE_TOLERANCE)
            assert_offline_top_k(serving_artifacts, scores, excluded, result.item_ids, k)


def test_service_scores_with_the_offline_protocols_exclusion(
    serving_artifacts: ServingArtifacts, bundle_a: ServingBundle, cases: list[ParityCase]
) -> None:
    """Up to the cap, the stored actions are the whole history, so the service excludes what the
    protocol excludes; beyond it the service only drops the recent ones."""
    cap = serving_artifacts.max_history
    for case in cases:
        point = case.point
        history = set(point.history_item_ids.tolist())
        excluded = set(case.record.actions)
        if point.h <= cap:
            assert excluded == history
        else:
            # The cap drops the oldest actions: the service excludes fewer items than the protocol.
            assert excluded < history, (point.user_id, point.h, len(history), len(excluded))
        result = compute(bundle_a, case.record, point.request_time, 20, excluded)
        assert not set(result.item_ids) & excluded


# ----- index recall ---------------------------------------------------------------------------------
def folded(bundle: ServingBundle) -> tuple[np.ndarray, np.ndarray]:
    items = bundle.artifacts.items
    return fold_bias(items.embeddings, items.bias, bundle.artifacts.scale), items.item_ids


def read_manifest(index_dir: Path) -> dict:
    return json.loads((index_dir / INDEX_MANIFEST_FILE).read_text())


def test_flat_index_manifest_reports_exact_recall(serving_artifacts: ServingArtifacts) -> None:
    for version in (serving_artifacts.a, serving_artifacts.b):
        manifest = read_manifest(resolve_index_dir(version.directory))
        assert manifest["type"] == "flat"
        assert manifest["model_version"] == version.model_version
        assert manifest["index_version"] == version.index_version
        assert manifest["n_items"] == len(serving_artifacts.catalog)
        k = manifest["recall_k"]
        assert k == 100
        assert manifest[f"recall_at_{k}"] == 1.0
        assert manifest["recall_query_source"].startswith("users:")


def user_queries(bundle: ServingBundle, cases: list[ParityCase]) -> np.ndarray:
    with torch.no_grad():
        embedding, _, _ = bundle.artifacts.user_tower(*tensors(served_encoding(bundle, cases)))
    return query_vectors(embedding.numpy())


def test_ivf_with_small_nprobe_reports_lower_recall_and_still_returns_k_valid_ids(
    serving_artifacts: ServingArtifacts, bundle_a: ServingBundle, cases: list[ParityCase], tmp_path: Path
) -> None:
    a = serving_artifacts.a
    settings = IndexSettings(type="ivf", nlist=4, nprobe=1, use_gpu=False, recall_sample=200, recall_k=100)
    # A separate out_dir: the served artifacts' own index/LATEST must keep naming the flat index.
    index_dir = build_index_artifacts(
        a.directory, out_dir=tmp_path, settings=settings, data=serving_artifacts.data
    )
    manifest = read_manifest(index_dir)
    assert manifest["type"] == "ivf" and manifest["params"] == {"nlist": 4, "nprobe": 1}
    assert manifest["model_version"] == a.model_version
    recall = manifest["recall_at_100"]
    assert 0.0 < recall < 1.0
    # The manifest's figure is the recall of this index on the training users' queries: recomputed here
    # from the same sampled queries, it must come out the same.
    queries_100 = sample_user_queries(
        load_artifacts(a.directory), serving_artifacts.data, 200, seed=RECALL_SEED
    )
    built = read_index(index_dir / INDEX_FILE, settings)
    assert measure_recall(built, *folded(bundle_a), queries_100, 100) == pytest.approx(recall, abs=1e-5)
    assert read_manifest(resolve_index_dir(a.directory))["type"] == "flat"

    index, loaded = load_index(tmp_path, settings, a.model_version)
    assert loaded["index_version"] == index_dir.name
    inner = faiss.downcast_index(index.index)
    assert inner.nprobe == 1
    smallest_list = min(inner.invlists.list_size(i) for i in range(inner.nlist))
    k = 10
    # Every probed list holds k items besides a short history, so one probe fills k slots.
    assert smallest_list >= k + 5, smallest_list

    queries = user_queries(bundle_a, cases)
    scores, ids = search(index, queries, k)
    catalog = set(serving_artifacts.catalog.tolist())
    for row_scores, row_ids in zip(scores, ids, strict=True):
        assert (row_ids >= 0).all() and len(set(row_ids.tolist())) == k
        assert set(row_ids.tolist()) <= catalog
        assert np.isfinite(row_scores).all() and (np.diff(row_scores) <= 1e-6).all()

    # Recomputed here, recall@k against exact search is below 1 as well; the approximate scores are
    # exact inner products of the items it does find.
    items = bundle_a.artifacts.items
    vectors = fold_bias(items.embeddings, items.bias, bundle_a.artifacts.scale)
    _, exact_ids = exact_search(vectors, items.item_ids, queries, k)
    hits = np.mean([len(set(x) & set(y)) / k for x, y in zip(ids.tolist(), exact_ids.tolist(), strict=True)])
    assert hits < 1.0
    rows = {int(i): n for n, i in enumerate(items.item_ids)}
    expected = np.einsum("bd,bkd->bk", queries, vectors[[[rows[int(i)] for i in r] for r in ids]])
    np.testing.assert_allclose(scores, expected, atol=1e-4)

    # The engine over the IVF bundle answers k valid, unexcluded items too.
    bundle = ServingBundle(
        bundle_a.artifacts,
        index,
        loaded,
        loaded["index_version"],
        vectors,
        FaissSearch(index),
        exact=bundle_a.exact,
    )
    for case in [case for case in cases if case.point.h <= 5]:
        result = compute(bundle, case.record, case.point.request_time, k, set(case.record.actions))
        assert len(result.item_ids) == k and len(set(result.item_ids)) == k
        assert set(result.item_ids) <= catalog and not set(result.item_ids) & set(case.record.actions)
        assert result.index_version == index_dir.name
