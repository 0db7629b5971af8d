"""Paired bootstrap over users, on hand-made per-point values."""

from __future__ import annotations

import time

import numpy as np
import pytest

from model.evaluation.bootstrap import compare_with_best_baselines, paired_bootstrap
from model.evaluation.protocol import EvaluationResult, summarise

N_USERS, POINTS_PER_USER = 300, 10
USERS = np.repeat(np.arange(N_USERS), POINTS_PER_USER)  # the protocol's layout: a user's points together
Z_975 = 1.959964


def test_identical_models_give_zero() -> None:
    values = np.random.default_rng(1).random(len(USERS))
    interval = paired_bootstrap(values - values, USERS)
    assert (interval.difference, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert not interval.significant


def test_models_equal_on_average_give_an_interval_around_zero() -> None:
    # Each user's advantage for one model is mirrored by another user's for the other model: the
    # observed difference is exactly 0 and the resampled means spread evenly around it.
    rng = np.random.default_rng(2)
    user_part = rng.normal(0.0, 0.1, size=(N_USERS // 2, 1))
    half = user_part + rng.normal(0.0, 0.05, size=(N_USERS // 2, POINTS_PER_USER))
    differences = np.concatenate([half, -half]).ravel()
    interval = paired_bootstrap(differences, USERS)
    assert interval.difference == pytest.approx(0.0, abs=1e-12)
    assert interval.low < 0.0 < interval.high
    assert not interval.significant
    # Symmetric-ish: neither side of the interval more than 25% longer than the other.
    assert -interval.low / interval.high == pytest.approx(1.0, rel=0.25)


def test_a_constant_gain_is_the_whole_interval() -> None:
    interval = paired_bootstrap(np.full(len(USERS), 0.1), USERS)
    assert interval.difference == pytest.approx(0.1, abs=1e-12)
    assert interval.low == pytest.approx(0.1, abs=1e-12)
    assert interval.high == pytest.approx(0.1, abs=1e-12)
    assert interval.significant


def test_interval_is_the_95_percent_one() -> None:
    # Many users, one point each: the resampled means are close to normal with the standard error
    # sd / sqrt(n), so each bound lies 1.96 standard errors from the observed difference (to within the
    # few percent that 20,000 resamples leave).
    differences = np.random.default_rng(5).normal(0.05, 0.3, 1000)
    interval = paired_bootstrap(differences, np.arange(1000), resamples=20_000)
    half_width = Z_975 * differences.std() / np.sqrt(1000)
    assert interval.difference - interval.low == pytest.approx(half_width, rel=0.04)
    assert interval.high - interval.difference == pytest.approx(half_width, rel=0.04)


def test_users_are_resampled_as_blocks() -> None:
    # All of a user's points share one difference (a user the model suits, or not): the user, not the
    # point, is the independent unit. The mean of 300 user values has a standard error of sd/sqrt(300);
    # treating the 3,000 points as independent would claim sd/sqrt(3000), an interval ~3.2 times
    # narrower.
    user_effect = np.random.default_rng(3).normal(0.02, 0.2, N_USERS)
    differences = user_effect[USERS]
    by_user = paired_bootstrap(differences, USERS)
    by_point = paired_bootstrap(differences, np.arange(len(USERS)))  # every point its own "user"
    expected_width = 2 * Z_975 * user_effect.std() / np.sqrt(N_USERS)
    assert by_user.high - by_user.low == pytest.approx(expected_width, rel=0.15)
    assert by_point.high - by_point.low < 0.5 * (by_user.high - by_user.low)


def test_users_with_more_points_weigh_more_in_a_group_mean() -> None:
    # The group mean is over points: one user with 9 points at +1, one with 1 point at -1 -> +0.8.
    users = np.array([0] * 9 + [1])
    differences = np.array([1.0] * 9 + [-1.0])
    interval = paired_bootstrap(differences, users, resamples=4000)
    assert interval.difference == pytest.approx(0.8)
    # Resamples: {0,0} -> 1, {1,1} -> -1, {0,1} twice as often -> 0.8: quantiles -1 and 1.
    assert (interval.low, interval.high) == (pytest.approx(-1.0), pytest.approx(1.0))


def test_seeded_and_fast() -> None:
    rng = np.random.default_rng(4)
    differences = rng.normal(0.01, 0.2, len(USERS))
    started = time.perf_counter()
    first = paired_bootstrap(differences, USERS, resamples=2000, seed=7)
    seconds = time.perf_counter() - started
    assert paired_bootstrap(differences, USERS, resamples=2000, seed=7) == first
    assert paired_bootstrap(differences, USERS, resamples=2000, seed=8) != first
    assert seconds < 3.0, seconds  # vectorised: ~0.05 s here, even on a busy machine well under 3


def test_misaligned_or_empty_input_is_refused() -> None:
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros(0), np.zeros(0))


# ----- the model against the best baseline of each group ----------------------------------------------

H = np.array([0, 1, 10, 20, 50, 100] * 4)  # 4 users x 6 points: cold_start, warm_up, active, 2 each
POINT_USERS = np.repeat(np.arange(4), 6)


def result(name: str, recall: list[float], ndcg: list[float]) -> EvaluationResult:
    """One value per group (cold_start, warm_up, active), the same for every user."""
    per_point = {"recall@50": np.tile(np.repeat(recall, 2), 4), "ndcg@50": np.tile(np.repeat(ndcg, 2), 4)}
    return summarise(name, per_point, H, POINT_USERS)


def test_best_baseline_is_chosen_per_group_and_metric_among_baselines_only() -> None:
    results = {
        "ours": result("ours", [0.5, 0.5, 0.5], [0.3, 0.3, 0.3]),
        "pop": result("pop", [0.4, 0.1, 0.1], [0.1, 0.1, 0.1]),
        "item": result("item", [0.1, 0.3, 0.1], [0.2, 0.1, 0.2]),
        "ablation": result("ablation", [0.9, 0.9, 0.9], [0.9, 0.9, 0.9]),  # not a baseline
    }
    significance = compare_with_best_baselines(results, "ours", ["pop", "item"], ["recall@50", "ndcg@50"])
    chosen = {(g, m): c.baseline for g, ms in significance.comparisons.items() for m, c in ms.items()}
    assert chosen == {
        ("cold_start", "recall@50"): "pop",
        ("cold_start", "ndcg@50"): "item",
        ("warm_up", "recall@50"): "item",
        ("warm_up", "ndcg@50"): "pop",  # tied at 0.1: the first listed
        ("active", "recall@50"): "pop",
        ("active", "ndcg@50"): "item",
        ("all", "recall@50"): "pop",  # 0.2 against item's 0.1667
        ("all", "ndcg@50"): "item",
    }
    cold = significance.comparisons["cold_start"]["recall@50"]
    assert (cold.model_mean, cold.baseline_mean) == (pytest.approx(0.5), pytest.approx(0.4))
    assert cold.interval.difference == pytest.approx(0.1)
    assert cold.interval.significant
    record = significance.to_dict()["groups"]["cold_start"]["recall@50"]
    assert set(record) == {
        "baseline",
        "model_mean",
        "baseline_mean",
        "difference",
        "low",
        "high",
        "significant",
    }


def test_comparisons_need_the_same_points() -> None:
    ours = result("ours", [0.5, 0.5, 0.5], [0.3, 0.3, 0.3])
    other = summarise("pop", ours.per_point, ours.point_h, ours.point_user[::-1].copy())
    with pytest.raises(ValueError, match="different points"):
        compare_with_best_baselines({"ours": ours, "pop": other}, "ours", ["pop"], ["recall@50"])
    assert compare_with_best_baselines({"pop": other}, "ours", ["pop"], ["recall@50"]).comparisons == {}
