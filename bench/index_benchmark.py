"""Recall and latency of flat / IVF / HNSW on synthetic bias-folded vectors.

    python bench/index_benchmark.py --items 100000 --dim 64 --queries 1000

Single-query latency is what one /recommend call pays; batch throughput is what an offline job or a
batching server gets. Both depend on the machine and its load: quote them with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import faiss
import numpy as np

from index_builder.faiss_index import build_index, exact_search, index_params, search
from index_builder.recall import recall_at_k, synthetic_queries
from index_builder.settings import IndexSettings
from index_builder.vectors import fold_bias, query_vectors


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_catalog(
    n: int, d: int, n_queries: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items and users around shared centres (cos ≈ 0.7 to their centre); scale 10, biases N(0, 0.5)."""
    rng = np.random.default_rng(seed)
    clusters = max(1, n // 100)
    centres = _unit(rng.standard_normal((clusters, d)))
    items = _unit(centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)) / np.sqrt(d))
    users = _unit(
        centres[rng.integers(0, clusters, n_queries)] + rng.standard_normal((n_queries, d)) / np.sqrt(d)
    )
    return fold_bias(items, rng.normal(0.0, 0.5, n), 10.0), np.arange(n, dtype=np.int64), query_vectors(users)


def uniform_catalog(
    n: int, d: int, n_queries: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items and users uniform on the sphere: no structure for an index to exploit (the worst case)."""
    rng = np.random.default_rng(seed)
    items = _unit(rng.standard_normal((n, d)))
    users = _unit(rng.standard_normal((n_queries, d)))
    return fold_bias(items, rng.normal(0.0, 0.5, n), 10.0), np.arange(n, dtype=np.int64), query_vectors(users)


def _query_stats(
    index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, single: int
) -> dict[str, Any]:
    _, exact = exact_search(vectors, ids, queries, k)
    started = time.perf_counter()
    _, approx = search(index, queries, k)
    batch_seconds = time.perf_counter() - started
    latencies = []
    for row in queries[:single]:
        started = time.perf_counter()
        search(index, row[None, :], k)
        latencies.append(time.perf_counter() - started)
    return {
        f"recall@{k}": round(recall_at_k(approx, exact, k), 4),
        "single_p50_ms": round(1e3 * float(np.percentile(latencies, 50)), 3),
        "single_p99_ms": round(1e3 * float(np.percentile(latencies, 99)), 3),
        "batch_qps": round(len(queries) / batch_seconds),
    }


def measure(
    settings: IndexSettings,
    vectors: np.ndarray,
    ids: np.ndarray,
    query_sets: dict[str, np.ndarray],
    k: int,
    single: int,
) -> list[dict[str, Any]]:
    """One build, then recall and latency for each query set."""
    started = time.perf_counter()
    index = build_index(vectors, ids, settings)
    build_seconds = time.perf_counter() - started
    head = {
        "type": settings.type,
        "params": index_params(settings, len(vectors)),
        "build_s": round(build_seconds, 2),
    }
    return [
        {"queries": name, **head, **_query_stats(index, vectors, ids, queries, k, single)}
        for name, queries in query_sets.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64, help="embedding dim; the index has one more")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=300, help="queries timed one at a time")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--types", default="flat,ivf,hnsw")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads; 0 keeps the default")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(json.dumps({"faiss": faiss.__version__, "omp_threads": faiss.omp_get_max_threads()}))
    for name, make in (("clustered", clustered_catalog), ("uniform", uniform_catalog)):
        vectors, ids, queries = make(args.items, args.dim, args.queries)
        query_sets = {"users": queries, "synthetic_queries": synthetic_queries(vectors, args.queries, seed=1)}
        for kind in args.types.split(","):
            for result in measure(IndexSettings(type=kind), vectors, ids, query_sets, args.k, args.single):
                print(json.dumps({"items": name, **result}), flush=True)


if __name__ == "__main__":
    main()
