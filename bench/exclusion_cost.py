"""The most expensive request the API admits: 10,000 ``exclude_items`` (its cap) against an HNSW index.

An approximate index is over-fetched by a request's exclusions (k + exclusions results). When the
exclusions are the very items the user ranks highest, the fetch runs short (HNSW reaches fewer than
10,050 items) and the request falls back to exact search over the whole catalog. This measures what
that costs against an ordinary request, alone and inside a batch of 64, through the engine's own
``compute_batch``.

Setup: a small Cold & Warm Net trained on synthetic data (its user tower and encoder), serving a
catalog of ``--items`` random unit vectors of the tower's width in an HNSW index (the index type whose
over-fetch is the issue) with the CPU exact fallback; one thread; the variants interleaved, medians
of ``--rounds``.

Run: python bench/exclusion_cost.py [--items 100000] [--rounds 15]
Writes bench/results/exclusion_cost.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
from annotated_types import MaxLen

from index_builder.build import build_index_artifacts
from index_builder.faiss_index import build_index
from index_builder.search_backends import FaissSearch, TorchExactSearch
from index_builder.settings import IndexSettings
from model.artifacts import data_fingerprint
from model.data.split import split_users
from model.data.synthetic import generate_synthetic
from model.export import export_model
from model.features import FeatureEncoder
from model.settings import FeatureConfig, ModelConfig, TrainConfig
from model.train import TrainingContext, fit_cold_warm_net
from service.engine import RecommendQuery, ServingBundle, compute_batch, load_bundle
from service.feature_store import UserRecord
from service.schemas import RecommendRequest

RESULTS = Path(__file__).resolve().parent / "results"
# The API's cap on exclude_items (a longer list is a 422), read from the request schema itself.
EXCLUSION_CAP: int = next(
    rule.max_length
    for rule in RecommendRequest.model_fields["exclude_items"].metadata
    if isinstance(rule, MaxLen)
)
K = 50
BATCH = 64
log = logging.getLogger("bench")


def small_bundle(root: Path) -> ServingBundle:
    """A one-epoch synthetic model, exported and loaded as the service loads it."""
    data = generate_synthetic(n_users=300, n_items=200, seed=3)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig())
    context = TrainingContext.build(data, split, encoder, TrainConfig(epochs=1))
    trained = fit_cold_warm_net(context, ModelConfig(), TrainConfig(epochs=1), progress=False)
    trained.net.eval()
    directory = export_model(trained, root, data_fingerprint(data), data.name)
    build_index_artifacts(directory, data=data)
    return load_bundle(directory, IndexSettings(type="flat"), device="cpu", tower_format="torchscript")


def with_large_catalog(bundle: ServingBundle, n_items: int, index_type: str = "hnsw") -> ServingBundle:
    """The same tower in front of ``n_items`` random unit vectors in an index of ``index_type`` (its
    default settings) and the exact CPU fallback over the same vectors."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n_items, bundle.vectors.shape[1])).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    item_ids = np.arange(1, n_items + 1, dtype=np.int64)
    started = time.perf_counter()
    index = build_index(vectors, item_ids, IndexSettings(type=index_type))
    log.info("%s over %d items built in %.0f s", index_type, n_items, time.perf_counter() - started)
    exact = TorchExactSearch(vectors, item_ids, torch.device("cpu"))
    return dataclasses.replace(bundle, index=index, vectors=vectors, searcher=FaissSearch(index), exact=exact)


def queries(bundle: ServingBundle) -> tuple[RecommendQuery, RecommendQuery]:
    """An ordinary request (k 50, 50 seen items excluded) and the worst one: its 10,000 exclusions are
    the items it ranks highest, so none of the over-fetched results survives."""
    now = int(time.time())
    user = UserRecord.unknown(1)
    ranked = compute_batch(bundle, [RecommendQuery(user, now, EXCLUSION_CAP + K, frozenset())])[0]
    ordinary = RecommendQuery(user, now, K, frozenset(ranked.item_ids[:K]))
    heavy = RecommendQuery(user, now, K, frozenset(ranked.item_ids[:EXCLUSION_CAP]))
    return ordinary, heavy


def medians(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Milliseconds per call of each variant, interleaved round by round, median over rounds."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, call in variants.items():
            started = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - started) * 1e3)
    return {name: round(statistics.median(values), 2) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS / "exclusion_cost")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        bundle = with_large_catalog(small_bundle(Path(root)), args.items)
    ordinary, heavy = queries(bundle)
    variants: dict[str, Callable[[], object]] = {
        "one ordinary request": lambda: compute_batch(bundle, [ordinary]),
        "one request with 10,000 exclusions": lambda: compute_batch(bundle, [heavy]),
        "64 ordinary requests": lambda: compute_batch(bundle, [ordinary] * BATCH),
        "63 ordinary + 1 with 10,000 exclusions": lambda: compute_batch(
            bundle, [ordinary] * (BATCH - 1) + [heavy]
        ),
        "exact search alone (1 query, k 10,050)": lambda: bundle.exact.search(
            bundle.vectors[:1], EXCLUSION_CAP + K
        ),
    }
    result = {
        "items": args.items,
        "index": "hnsw",
        "rounds": args.rounds,
        "ms": medians(variants, args.rounds),
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"compute_batch on an HNSW index of {args.items:,} items, 1 thread, median of {args.rounds} "
        "interleaved rounds (`python bench/exclusion_cost.py`).",
        "",
        "| call | ms |",
        "|---|---|",
        *(f"| {name} | {ms:.2f} |" for name, ms in result["ms"].items()),
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
