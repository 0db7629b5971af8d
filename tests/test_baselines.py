"""Popularity baselines and EASE on tiny hand-made data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from model.baselines.ease import Ease, tune_lambda
from model.baselines.popular import (
    MostPopular,
    OnboardingPopular,
    SegmentPopular,
    item_counts,
    lexicographic_scores,
    tune_first_n,
)
from model.data.schema import InteractionData, make_interaction_data
from model.data.split import UserSplit
from model.evaluation.protocol import build_eval_points, evaluate, top_k

# Train users 1-3; test users 4 (F/25, same segment as user 1), 5 (M/56, a segment unseen in training).
TRAIN_ITEMS = {1: [3, 4, 6], 2: [1, 2, 5], 3: [1, 2, 3]}
TEST_SEQUENCE = [12, 2, 11, 10, 9, 8, 7, 6, 5, 4, 3]  # chronological
PROFILES = {1: ("F", "25"), 2: ("M", "25"), 3: ("M", "25"), 4: ("F", "25"), 5: ("M", "56")}
TRAIN = np.array([1, 2, 3], dtype=np.int64)


def make_data(
    sequences: dict[int, list[int]], profiles: dict[int, tuple[str, str]] | None = None, n_items: int = 12
) -> InteractionData:
    rows = [(u, item, t) for u, items in sequences.items() for t, item in enumerate(items)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    users = None
    if profiles is not None:
        users = pd.DataFrame(
            [(u, g, a, "0", "00000") for u, (g, a) in profiles.items()],
            columns=["user_id", "gender", "age", "occupation", "zip_code"],
        )
    items = pd.DataFrame({"item_id": np.arange(1, n_items + 1)})  # catalog 1..n, some never interacted with
    return make_interaction_data(frame, users, items, name="tiny")


@pytest.fixture()
def data() -> InteractionData:
    return make_data({**TRAIN_ITEMS, 4: TEST_SEQUENCE, 5: TEST_SEQUENCE}, PROFILES)


def ranking(scores: np.ndarray, catalog: np.ndarray, k: int = 12) -> list[int]:
    return catalog[top_k(scores[None, :].astype(np.float32), k)[0]].tolist()


def disc(rank: int) -> float:
    return 1.0 / math.log2(rank + 1)


def test_most_popular_counts_train_users_only(data: InteractionData) -> None:
    catalog = data.catalog_item_ids()
    model = MostPopular.fit(data, TRAIN, catalog)
    np.testing.assert_array_equal(model.counts, [2, 2, 2, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    # Ties (1, 2, 3 at two; 4, 5, 6 at one; the rest at zero) go to the lower item id.
    assert ranking(model.score(build_eval_points(data, [4], (0,)))[0], catalog) == list(range(1, 13))


def test_most_popular_reproduces_hand_computed_figures(data: InteractionData) -> None:
    catalog = data.catalog_item_ids()
    points = build_eval_points(data, [4])  # h = 0 and h = 1 (11 interactions)
    result = evaluate(MostPopular.fit(data, TRAIN, catalog), points, catalog, ks=(5,), progress=False)
    # Top 5 is 1, 2, 3, 4, 5 at both h. h=0 targets = 12, 2, 11, 10, 9, 8, 7, 6, 5, 4: hits 2, 4, 5 at
    # ranks 2, 4, 5. h=1 (history 12) targets = 2, 11, ..., 4, 3: hits 2, 3, 4, 5 at ranks 2..5.
    idcg = sum(disc(r) for r in range(1, 6))
    ndcg_h0 = (disc(2) + disc(4) + disc(5)) / idcg
    ndcg_h1 = (disc(2) + disc(3) + disc(4) + disc(5)) / idcg
    assert result.curve[0]["recall@5"] == pytest.approx(0.3)
    assert result.curve[1]["recall@5"] == pytest.approx(0.4)
    assert result.groups["cold_start"]["recall@5"] == pytest.approx(0.35)
    assert result.groups["cold_start"]["ndcg@5"] == pytest.approx((ndcg_h0 + ndcg_h1) / 2)
    assert result.groups["cold_start"]["hr@5"] == 1.0
    assert result.points["cold_start"] == 2


def test_segment_popular_ranks_within_segment(data: InteractionData) -> None:
    catalog = data.catalog_item_ids()
    model = SegmentPopular.fit(data, TRAIN, catalog)
    # F/25 (user 1 only): 3, 4, 6 once each; 3 is globally more popular, then 4 < 6 by id; then the
    # rest by global popularity: 1, 2 (two each), 5 (one), then zero-count items by id.
    assert ranking(model.scores_for_user(4), catalog) == [3, 4, 6, 1, 2, 5, 7, 8, 9, 10, 11, 12]
    # M/25 (users 2, 3): 1, 2 twice, then 3 (segment one, global two) before 5 (one, one), then 4, 6.
    assert ranking(model.scores_for_user(2), catalog) == [1, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11, 12]
    # M/56 never appears in training: global popularity.
    assert ranking(model.scores_for_user(5), catalog) == list(range(1, 13))


def test_segment_popular_scores_points_by_their_user(data: InteractionData) -> None:
    catalog = data.catalog_item_ids()
    model = SegmentPopular.fit(data, TRAIN, catalog)
    points = build_eval_points(data, [4, 5], (0,))
    scores = model.score(points)
    assert scores.shape == (2, len(catalog)) and scores.dtype == np.float32
    assert ranking(scores[0], catalog)[:3] == [3, 4, 6]
    assert ranking(scores[1], catalog)[:3] == [1, 2, 3]


def test_onboarding_popular_counts_each_train_users_first_actions(data: InteractionData) -> None:
    catalog = data.catalog_item_ids()
    # First actions: user 1 -> 3, users 2 and 3 -> 1; the test users' (4, 5) never count.
    np.testing.assert_array_equal(item_counts(data, TRAIN, catalog, first_n=1), [2, 0, 1] + [0] * 9)
    model = OnboardingPopular.fit(data, TRAIN, catalog, first_n=1)
    # 1 (first of two), 3 (first of one), then by overall popularity: 2 (two), 4, 5, 6 (one), the rest.
    assert ranking(model.score(build_eval_points(data, [4], (0,)))[0], catalog) == [
        1,
        3,
        2,
        4,
        5,
        6,
        *range(7, 13),
    ]
    # Over every action it is most-popular.
    everything = OnboardingPopular.fit(data, TRAIN, catalog, first_n=100).scores
    assert ranking(everything, catalog) == ranking(
        MostPopular.fit(data, TRAIN, catalog).counts.astype(np.float32), catalog
    )


def test_onboarding_popular_takes_the_first_n_with_the_best_validation_recall() -> None:
    onboarding, later = list(range(1, 6)), list(range(101, 161))
    # Users 1-3 start with the onboarding titles, then rate the later ones; users 4-9 only rate the
    # later ones, which are therefore the most popular overall (nine raters against three).
    sequences = {u: onboarding + later for u in (1, 2, 3)}
    sequences.update({u: list(later) for u in range(4, 10)})
    sequences[10] = onboarding + list(range(161, 171))  # the validation user starts like users 1-3
    data = make_data(sequences, n_items=200)
    split = UserSplit(train=np.arange(1, 10), validation=np.array([10]), test=np.array([], dtype=np.int64))
    catalog = data.catalog_item_ids()
    tuning = tune_first_n(data, split, catalog, grid=(100, 6, 5))
    # First 5 or 6 actions keep the onboarding titles in the top 50, first 100 pushes them out: the
    # validation user's h = 0 targets (5 onboarding titles of 10) are found by 5 and 6 alike, and the
    # tie goes to the smaller.
    assert tuning.best == tuning.model.first_n == 5
    assert tuning.validation[5] == tuning.validation[6] > tuning.validation[100]


def test_lexicographic_scores_keep_exact_ties() -> None:
    primary = np.array([1, 1, 0, 2, 1])
    secondary = np.array([5, 3, 9, 0, 5])
    np.testing.assert_array_equal(lexicographic_scores(primary, secondary), [2, 1, 0, 3, 2])


def ease_by_hand(x: np.ndarray, lam: float) -> np.ndarray:
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    b = np.eye(x.shape[1]) - p @ np.diag(1.0 / np.diag(p))
    np.fill_diagonal(b, 0.0)
    return b


def test_ease_matches_direct_computation(data: InteractionData) -> None:
    catalog = data.catalog_item_ids()
    model = Ease.fit(data, TRAIN, catalog, lam=2.0)
    x = np.zeros((3, 12))
    for row, items in enumerate(TRAIN_ITEMS.values()):
        x[row, np.array(items) - 1] = 1.0
    expected = ease_by_hand(x, 2.0)
    np.testing.assert_allclose(model.weights, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.diag(model.weights) == 0.0)

    point = next(p for p in build_eval_points(data, [4]) if p.h == 1)  # history: item 12
    history = np.zeros(12)
    history[np.array([12]) - 1] = 1.0
    np.testing.assert_allclose(model.score([point])[0], history @ expected, rtol=1e-5, atol=1e-6)


def test_ease_scores_multi_item_history() -> None:
    sequences = {1: [1, 2, 3], 2: [2, 3, 4], 3: [1, 4, 5], 4: list(range(1, 12)) + [3]}
    data = make_data(sequences)
    catalog = data.catalog_item_ids()
    model = Ease.fit(data, np.array([1, 2, 3]), catalog, lam=0.5)
    x = np.zeros((3, 12))
    for row, items in enumerate([sequences[1], sequences[2], sequences[3]]):
        x[row, np.array(items) - 1] = 1.0
    point = build_eval_points(data, [4], (2,))[0]  # history items 1, 2
    history = np.zeros(12)
    history[[0, 1]] = 1.0
    np.testing.assert_allclose(model.score([point])[0], history @ ease_by_hand(x, 0.5), rtol=1e-5, atol=1e-6)


def test_ease_falls_back_to_popularity_at_h_zero(data: InteractionData) -> None:
    catalog = data.catalog_item_ids()
    model = Ease.fit(data, TRAIN, catalog, lam=2.0)
    points = build_eval_points(data, [4])
    scores = model.score(points)
    np.testing.assert_array_equal(scores[0], MostPopular.fit(data, TRAIN, catalog).counts.astype(np.float32))
    assert not np.array_equal(scores[1], scores[0])


def test_tune_lambda_picks_the_best_validation_recall() -> None:
    # 100 items and skewed choices, so that the top 50 is a real cut and lambda changes the ranking.
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, 101)
    sequences = {
        u: rng.choice(np.arange(1, 101), size=30, replace=False, p=weights / weights.sum()).tolist()
        for u in range(1, 61)
    }
    data = make_data(sequences, n_items=100)
    split = UserSplit(train=np.arange(1, 41), validation=np.arange(41, 51), test=np.arange(51, 61))
    catalog = data.catalog_item_ids()
    grid = (0.1, 10.0, 1000.0)
    tuning = tune_lambda(data, split, catalog, grid=grid)
    assert set(tuning.validation) == set(grid)
    assert tuning.validation[tuning.best_lambda] == max(tuning.validation.values())
    assert tuning.model.lam == tuning.best_lambda
    assert len(set(tuning.validation.values())) > 1  # the grid actually mattered
    points = build_eval_points(data, split.validation)
    recall = evaluate(tuning.model, points, catalog, progress=False).groups["all"]["recall@50"]
    assert recall == pytest.approx(tuning.validation[tuning.best_lambda])
