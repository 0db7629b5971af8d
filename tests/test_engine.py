"""Batched answers equal unbatched ones: ``compute_batch`` against ``compute`` query by query, and the
Recommender's micro-batched path for every (max_batch, wait) against the plain one, on batches that mix
known and unknown users, exclusions and different k (the FAISS contrib pattern: every execution mode
is compared with the plain one)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence, Set
from typing import Any

import numpy as np
import pytest
import torch

from index_builder.faiss_index import build_index
from index_builder.search_backends import FaissSearch, TorchExactSearch
from index_builder.settings import IndexSettings
from service.engine import (
    Recommendation,
    Recommender,
    RecommendQuery,
    ServingBundle,
    compute,
    compute_batch,
    exact_batch_from,
    load_bundle,
)
from service.feature_store import UserRecord, records_from_interactions

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import ServingArtifacts  # noqa: E402

pytest_plugins = ["service_fixtures"]

SCORE_TOLERANCE = 1e-5
UNKNOWN_USER = 10**12


@pytest.fixture(scope="module")
def queries(serving_artifacts: ServingArtifacts) -> list[RecommendQuery]:
    """Known users with histories of every length, unknown users, no / own / extra exclusions, k 1..120."""
    data = serving_artifacts.data
    users = sorted(int(u) for u in data.interactions["user_id"].unique())[:14]
    known = records_from_interactions(data, users, cap=serving_artifacts.max_history)
    assert len({len(r.actions) for r in known}) > 3, (
        "the known users should have histories of several lengths"
    )
    catalog = serving_artifacts.catalog.tolist()
    now = int(data.interactions["timestamp"].max()) + 3600
    mixed: list[RecommendQuery] = []
    for row, record in enumerate(
        [*known, UserRecord.unknown(UNKNOWN_USER), UserRecord.unknown(UNKNOWN_USER + 1)]
    ):
        k = (1, 5, 20, 50, 120)[row % 5]
        exclude: set[int] = set()
        if row % 3 == 1:
            exclude = set(record.actions)
        elif row % 3 == 2:
            exclude = set(catalog[row : row + 40])
        mixed.append(RecommendQuery(record, now - 60 * row, k, exclude))
    return mixed


def assert_same_answer(batched: Recommendation, alone: Recommendation) -> None:
    assert batched.item_ids == alone.item_ids
    assert batched.scores == pytest.approx(alone.scores, abs=SCORE_TOLERANCE)
    assert batched.gate_cold == pytest.approx(alone.gate_cold, abs=SCORE_TOLERANCE)
    assert batched.model_version == alone.model_version and batched.index_version == alone.index_version


def alone(bundle: ServingBundle, query: RecommendQuery) -> Recommendation:
    return compute(bundle, query.record, query.now, query.k, query.exclude)


def test_a_batch_answers_each_query_as_it_would_be_answered_alone(
    bundle_a: ServingBundle, queries: list[RecommendQuery]
) -> None:
    batched = compute_batch(bundle_a, queries)
    assert len(batched) == len(queries)
    for query, answer in zip(queries, batched, strict=True):
        assert len(answer.item_ids) == query.k
        assert not set(answer.item_ids) & set(query.exclude)
        assert answer.batch_size == len(queries)
        assert_same_answer(answer, alone(bundle_a, query))
    # The batch really mixes cold and warm users: their gates differ.
    gates = {round(answer.gate_cold, 3) for answer in batched}
    assert len(gates) > 2


def test_rows_an_approximate_index_leaves_short_fall_back_to_exact_search(
    bundle_a: ServingBundle, queries: list[RecommendQuery]
) -> None:
    """IVF probing 1 of 4 lists: the rows asking for most of the catalog run short and are searched
    exactly, the other rows keep the index's answer; each row equals its own computation alone."""
    item_ids = bundle_a.artifacts.items.item_ids
    ivf = build_index(bundle_a.vectors, item_ids, IndexSettings(type="ivf", nlist=4, nprobe=1))
    short = dataclasses.replace(bundle_a, index=ivf, searcher=FaissSearch(ivf))
    big_k = len(item_ids) - 50
    mixed = [*queries[:3], dataclasses.replace(queries[3], k=big_k), *queries[4:6]]
    batched = compute_batch(short, mixed)
    assert len(batched[3].item_ids) == big_k
    assert batched[3].item_ids == alone(bundle_a, mixed[3]).item_ids  # the exact ranking
    for query, answer in zip(mixed, batched, strict=True):
        assert_same_answer(answer, alone(short, query))


@pytest.mark.parametrize(("max_batch", "wait_us"), [(1, 0.0), (4, 0.0), (64, 0.0), (64, 2000.0)])
def test_the_recommender_answers_concurrent_requests_as_unbatched(
    bundle_a: ServingBundle, queries: list[RecommendQuery], max_batch: int, wait_us: float
) -> None:
    async def scenario() -> tuple[list[Recommendation], list[int]]:
        recommender = Recommender(
            bundle_a, history_cap=50, max_queue_ms=60_000, max_batch=max_batch, batch_wait_us=wait_us
        )
        sizes: list[int] = []
        recommender.batcher.on_batch = lambda stats: sizes.append(stats.size)
        answers = await asyncio.gather(
            *(recommender.recommend(q.record, q.now, q.k, q.exclude) for q in queries)
        )
        recommender.close()
        return list(answers), sizes

    answers, sizes = asyncio.run(scenario())
    for query, answer in zip(queries, answers, strict=True):
        assert_same_answer(answer, alone(bundle_a, query))
        assert answer.queue_seconds >= 0.0
    assert sum(sizes) == len(queries) and max(sizes) <= max_batch
    if max_batch > 1:
        assert max(sizes) > 1, "requests arriving together were never batched"


def test_a_reload_between_batches_serves_each_batch_from_one_bundle(
    serving_artifacts: ServingArtifacts, bundle_a: ServingBundle, queries: list[RecommendQuery]
) -> None:
    """A batch computed after the swap is the new bundle's, whole: versions and items agree per answer."""
    bundle_b = load_bundle(serving_artifacts.b.directory, IndexSettings())

    async def scenario() -> list[Recommendation]:
        recommender = Recommender(bundle_a, history_cap=50, max_queue_ms=60_000, max_batch=64)
        first = await recommender.recommend_many(queries[:5])
        recommender._bundle = bundle_b  # what reload does once the new bundle is loaded and checked
        second = await recommender.recommend_many(queries[5:10])
        recommender.close()
        return [*first, *second]  # type: ignore[list-item]

    answers = asyncio.run(scenario())
    for query, answer in zip(queries[:10], answers, strict=True):
        bundle = bundle_a if answer.model_version == bundle_a.model_version else bundle_b
        assert_same_answer(answer, alone(bundle, query))
    assert {a.model_version for a in answers[:5]} == {bundle_a.model_version}
    assert {a.model_version for a in answers[5:]} == {bundle_b.model_version}
    assert bundle_a.model_version != bundle_b.model_version


def test_batched_timings_are_the_batchs(bundle_a: ServingBundle, queries: list[RecommendQuery]) -> None:
    started = time.perf_counter()
    batched = compute_batch(bundle_a, queries)
    elapsed = time.perf_counter() - started
    assert len({(a.model_seconds, a.search_seconds) for a in batched}) == 1
    assert 0 < batched[0].model_seconds + batched[0].search_seconds <= elapsed
    assert np.isfinite([s for a in batched for s in a.scores]).all()


def test_a_query_with_many_exclusions_is_answered_alone_not_by_widening_the_batch(
    bundle_a: ServingBundle, queries: list[RecommendQuery]
) -> None:
    """One query excluding most of the catalog beside ordinary ones: each answer equals its own
    computation alone, and the ordinary rows were searched no wider than they need."""
    catalog = bundle_a.artifacts.items.item_ids.tolist()
    heavy = dataclasses.replace(queries[2], k=20, exclude=set(catalog[: len(catalog) - 30]))
    batch = [*queries[:6], heavy]
    fetched: list[int] = []
    searcher = bundle_a.searcher

    class Recording:
        name, n_items = searcher.name, searcher.n_items

        def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            fetched.append(k)
            return searcher.search(vectors, k)

    recorded = dataclasses.replace(bundle_a, searcher=Recording())
    answers = compute_batch(recorded, batch)
    for query, answer in zip(batch, answers, strict=True):
        assert_same_answer(answer, alone(bundle_a, query))
    assert len(answers[-1].item_ids) == 20 and not set(answers[-1].item_ids) & heavy.exclude
    heavy_need = min(heavy.k + len(heavy.exclude), len(catalog))
    # The shared search fetched what most rows need; the heavy row (and any other row that ran short)
    # was searched again alone, at its own width.
    assert fetched[0] < heavy_need and fetched[1:] and max(fetched[1:]) == heavy_need, fetched
    assert len(fetched) - 1 < len(batch), fetched


class RecordingExactSearch(TorchExactSearch):
    """The torch search, noting the size of each batch it left exclusions out of."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def search_excluding(
        self, queries: np.ndarray, k: int, exclude: Sequence[Set[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        self.batches.append(len(queries))
        return super().search_excluding(queries, k, exclude)


def test_the_torch_backend_leaves_exclusions_out_inside_its_search(
    bundle_a: ServingBundle, queries: list[RecommendQuery]
) -> None:
    """Exclusions masked before the top-k give FAISS's over-fetched and filtered answers, with one search
    for the batch, also for a query that excludes all but 30 items and asks for 50."""
    item_ids = bundle_a.artifacts.items.item_ids
    searcher = RecordingExactSearch(bundle_a.vectors, item_ids, torch.device("cpu"))
    masked = dataclasses.replace(bundle_a, searcher=searcher)
    catalog = item_ids.tolist()
    heavy = dataclasses.replace(queries[2], k=50, exclude=set(catalog[: len(catalog) - 30]))
    batch = [*queries, heavy]
    answers = compute_batch(masked, batch)
    assert searcher.batches == [len(batch)]
    for query, answer in zip(batch, answers, strict=True):
        assert_same_answer(answer, alone(bundle_a, query))
    assert sorted(answers[-1].item_ids) == sorted(catalog[-30:])


def test_large_batches_on_a_flat_index_are_searched_exactly_with_their_exclusions_masked(
    bundle_a: ServingBundle, queries: list[RecommendQuery]
) -> None:
    """FAISS flat answers batches below exact_batch_from, the torch search the others: the same answers
    (a single query went through FAISS alone); an approximate index keeps FAISS for every batch."""
    assert (
        bundle_a.searcher.name == "faiss-cpu"
        and bundle_a.exact_batch_from == IndexSettings().exact_batch_from
    )
    exact = RecordingExactSearch(bundle_a.vectors, bundle_a.artifacts.items.item_ids, torch.device("cpu"))
    hybrid = dataclasses.replace(bundle_a, exact=exact, exact_batch_from=4)
    for batch in (queries[:3], queries[:4], queries):
        for query, answer in zip(batch, compute_batch(hybrid, batch), strict=True):
            assert_same_answer(answer, alone(bundle_a, query))
    assert exact.batches == [4, len(queries)]
    faiss_cpu, settings = bundle_a.searcher, IndexSettings(exact_batch_from=8)
    assert exact_batch_from({"type": "flat"}, faiss_cpu, settings) == 8
    assert exact_batch_from({"type": "ivf"}, faiss_cpu, settings) is None
    assert exact_batch_from({"type": "hnsw"}, faiss_cpu, settings) is None
    assert exact_batch_from({"type": "flat"}, faiss_cpu, IndexSettings(exact_batch_from=0)) is None
    approximate = dataclasses.replace(bundle_a, exact_batch_from=None)
    assert approximate.masked_searcher(1000) is None
