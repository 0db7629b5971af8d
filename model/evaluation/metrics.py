"""Ranking metrics of the evaluation protocol (shared/DESIGN.md), vectorised over evaluation points.

Every function takes ``ranked``, an (n_points, K_max) int array of catalog indices, best first, and
``targets``, an (n_points, n_targets) int array of catalog indices. A ranked slot holding -1 is empty
(fewer than K_max rankable items) and never counts as a hit.
"""

from __future__ import annotations

import numpy as np

EMPTY_SLOT = -1


def hit_matrix(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(n_points, K_max) bool: whether the item at each rank is one of the point's targets."""
    ranked = np.asarray(ranked)
    targets = np.asarray(targets)
    if ranked.ndim != 2 or targets.ndim != 2 or ranked.shape[0] != targets.shape[0]:
        raise ValueError(f"ranked {ranked.shape} and targets {targets.shape} must be 2-D with equal rows")
    # K_max x n_targets per point is tiny (100 x 10), so a broadcast compare beats any set logic.
    hits = (ranked[:, :, None] == targets[:, None, :]).any(axis=2)
    return hits & (ranked != EMPTY_SLOT)


def _check_k(hits: np.ndarray, k: int) -> None:
    if k <= 0:
        raise ValueError(f"K must be positive, got {k}")
    if k > hits.shape[1]:
        raise ValueError(f"K={k} exceeds the {hits.shape[1]} ranked positions given")


def recall_at_k(hits: np.ndarray, n_targets: int, k: int) -> np.ndarray:
    """Targets found in the top K over the number of targets, per point."""
    _check_k(hits, k)
    return hits[:, :k].sum(axis=1) / float(n_targets)


def hit_rate_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """1.0 where any target is in the top K, per point."""
    _check_k(hits, k)
    return hits[:, :k].any(axis=1).astype(np.float64)


def _discounts(k: int) -> np.ndarray:
    """1 / log2(r + 1) for 1-based ranks r = 1..k."""
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def ndcg_at_k(hits: np.ndarray, n_targets: int, k: int) -> np.ndarray:
    """Binary-relevance NDCG@K; the ideal ranking puts min(n_targets, K) hits on top."""
    _check_k(hits, k)
    discounts = _discounts(k)
    dcg = hits[:, :k].astype(np.float64) @ discounts
    ideal = discounts[: min(n_targets, k)].sum()
    return dcg / ideal


def metric_name(metric: str, k: int) -> str:
    return f"{metric}@{k}"


def compute_metrics(ranked: np.ndarray, targets: np.ndarray, ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per-point recall/ndcg/hr at every K, keyed like "recall@50"."""
    hits = hit_matrix(ranked, targets)
    n_targets = targets.shape[1]
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[metric_name("recall", k)] = recall_at_k(hits, n_targets, k)
        out[metric_name("ndcg", k)] = ndcg_at_k(hits, n_targets, k)
        out[metric_name("hr", k)] = hit_rate_at_k(hits, k)
    return out
