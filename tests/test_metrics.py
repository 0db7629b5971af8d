"""Metrics against values computed by hand on a constructed ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.evaluation.metrics import (
    EMPTY_SLOT,
    compute_metrics,
    hit_matrix,
    hit_rate_at_k,
    ndcg_at_k,
    recall_at_k,
)

TARGETS = np.array([list(range(1, 11)), list(range(1, 11))])
# Row 0 hits at 1-based ranks 1, 3 and 5; row 1 never hits.
RANKED = np.array([[1, 20, 2, 21, 3], [30, 31, 32, 33, 34]])


def disc(rank: int) -> float:
    return 1.0 / math.log2(rank + 1)


def test_hit_matrix_marks_targets() -> None:
    expected = np.array([[True, False, True, False, True], [False] * 5])
    np.testing.assert_array_equal(hit_matrix(RANKED, TARGETS), expected)


def test_recall_counts_hits_over_ten_targets() -> None:
    hits = hit_matrix(RANKED, TARGETS)
    np.testing.assert_allclose(recall_at_k(hits, 10, 5), [0.3, 0.0])
    np.testing.assert_allclose(recall_at_k(hits, 10, 2), [0.1, 0.0])


def test_ndcg_normalises_by_min_targets_k() -> None:
    hits = hit_matrix(RANKED, TARGETS)
    idcg5 = sum(disc(r) for r in range(1, 6))
    np.testing.assert_allclose(ndcg_at_k(hits, 10, 5), [(disc(1) + disc(3) + disc(5)) / idcg5, 0.0])
    # K < number of targets: the ideal ranking is K hits, so K = 3 with hits at ranks 1 and 3 gives
    # (1 + 1/2) / (1 + 1/log2(3) + 1/2).
    idcg3 = disc(1) + disc(2) + disc(3)
    np.testing.assert_allclose(ndcg_at_k(hits, 10, 3), [(disc(1) + disc(3)) / idcg3, 0.0])
    assert ndcg_at_k(hits, 10, 3)[0] == pytest.approx(0.703918, abs=1e-6)


def test_ndcg_is_one_for_a_perfect_ranking() -> None:
    targets = np.arange(10)[None, :]
    ranked = np.arange(20)[None, :]
    hits = hit_matrix(ranked, targets)
    for k in (1, 5, 10, 20):  # K > 10: the ideal holds only 10 hits, so 10 hits on top is still perfect
        assert ndcg_at_k(hits, 10, k)[0] == pytest.approx(1.0)


def test_hit_rate_is_any_hit() -> None:
    hits = hit_matrix(RANKED, TARGETS)
    np.testing.assert_array_equal(hit_rate_at_k(hits, 5), [1.0, 0.0])
    np.testing.assert_array_equal(hit_rate_at_k(hits, 1), [1.0, 0.0])
    late = hit_matrix(np.array([[20, 21, 5]]), TARGETS[:1])
    np.testing.assert_array_equal(hit_rate_at_k(late, 2), [0.0])


def test_empty_slots_never_hit() -> None:
    ranked = np.array([[1, EMPTY_SLOT, EMPTY_SLOT]])
    targets = np.array([[EMPTY_SLOT, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(hit_matrix(ranked, targets), [[True, False, False]])


def test_compute_metrics_keys_and_values() -> None:
    out = compute_metrics(RANKED, TARGETS, (3, 5))
    assert set(out) == {"recall@3", "ndcg@3", "hr@3", "recall@5", "ndcg@5", "hr@5"}
    np.testing.assert_allclose(out["recall@3"], [0.2, 0.0])
    np.testing.assert_allclose(out["hr@5"], [1.0, 0.0])


def test_k_beyond_ranking_is_an_error() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        recall_at_k(hit_matrix(RANKED, TARGETS), 10, 6)
