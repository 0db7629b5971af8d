"""Synthetic data: MovieLens schema, determinism, speed, and a real profile -> taste signal."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from model.data.loading import load_dataset
from model.data.synthetic import AGES, GENRES, generate_synthetic


@pytest.fixture(scope="module")
def data():
    return generate_synthetic()


def test_schema_matches_movielens(data) -> None:
    inter, users, items = data.interactions, data.users, data.items
    assert [str(t) for t in inter.dtypes] == ["int64", "int64", "int64", "float32"]
    assert set(inter["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len(users) == 600 and len(items) == 300
    assert set(users["gender"]) == {"M", "F"}
    assert set(users["age"]) <= set(AGES)
    assert set(users["occupation"]) <= {str(i) for i in range(21)}
    assert users["zip_code"].str.fullmatch(r"\d{5}").all()
    assert all(set(g.split("|")) <= set(GENRES) for g in items["genres"])
    assert items["year"].between(1920, 2000).all() and str(items["year"].dtype) == "Int64"
    assert (items["title"].str.extract(r"\((\d{4})\)$", expand=False).astype(int) == items["year"]).all()


def test_sorted_and_strictly_increasing_per_user(data) -> None:
    inter = data.interactions
    expected = inter.sort_values(["user_id", "timestamp", "item_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(inter, expected)
    same_user = inter["user_id"].diff() == 0
    assert (inter["timestamp"].diff()[same_user] > 0).all()
    assert not inter.duplicated(["user_id", "item_id"]).any()
    lengths = inter.groupby("user_id").size()
    assert lengths.min() >= 5 and lengths.max() <= 120


def test_deterministic_for_a_seed(data) -> None:
    again = generate_synthetic()
    for a, b in zip(
        (data.interactions, data.users, data.items),
        (again.interactions, again.users, again.items),
        strict=True,
    ):
        pd.testing.assert_frame_equal(a, b)
    other = generate_synthetic(seed=1)
    assert not other.interactions.equals(data.interactions)


def test_fast_enough() -> None:
    start = time.perf_counter()
    generate_synthetic()
    assert time.perf_counter() - start < 2.0


def _genre_shares(frame: pd.DataFrame) -> pd.Series:
    genres = frame["genres"].str.split("|").explode()
    return genres.value_counts(normalize=True).reindex(list(GENRES), fill_value=0.0)


def test_profile_predicts_genre_taste(data) -> None:
    """Segments differ in genre mix far more than two random halves of the same users do."""
    rows = data.interactions.merge(data.users, on="user_id").merge(data.items, on="item_id")
    segments = [group for _, group in rows.groupby(["gender", "age"]) if group["user_id"].nunique() >= 15]
    assert len(segments) >= 5

    def total_variation(a: pd.DataFrame, b: pd.DataFrame) -> float:
        return 0.5 * float((_genre_shares(a) - _genre_shares(b)).abs().sum())

    between = [total_variation(a, b) for i, a in enumerate(segments) for b in segments[i + 1 :]]
    rng = np.random.default_rng(0)
    within = []
    for group in segments:
        users = group["user_id"].unique()
        half = set(rng.choice(users, size=len(users) // 2, replace=False))
        in_half = group["user_id"].isin(half)
        within.append(total_variation(group[in_half], group[~in_half]))
    assert np.mean(between) > 1.5 * np.mean(within)


def test_profile_helps_cold_start(data) -> None:
    """Top items of a new user's (gender, age) segment beat globally top items: the cold-start signal."""
    rows = data.interactions.merge(data.users, on="user_id")
    test_users = set(data.users["user_id"].sample(frac=0.25, random_state=0))
    train, test = rows[~rows["user_id"].isin(test_users)], rows[rows["user_id"].isin(test_users)]
    k = 20
    global_top = set(train["item_id"].value_counts().index[:k])
    segment_top = {
        key: set(g["item_id"].value_counts().index[:k]) for key, g in train.groupby(["gender", "age"])
    }
    global_hits = test["item_id"].isin(global_top).mean()
    segment_hits = np.mean(
        [
            item in segment_top.get((gender, age), global_top)
            for item, gender, age in zip(test["item_id"], test["gender"], test["age"], strict=True)
        ]
    )
    assert segment_hits > 1.1 * global_hits


def test_first_interactions_lean_popular(data) -> None:
    inter = data.interactions
    popularity = inter["item_id"].map(inter["item_id"].value_counts())
    step = inter.groupby("user_id").cumcount()
    assert popularity[step < 3].mean() > 1.5 * popularity[step >= 10].mean()


def test_sequential_locality(data) -> None:
    """Consecutive items share genres more often than the same items in shuffled order."""
    genres = data.items.set_index("item_id")["genres"].str.split("|").map(set)
    inter = data.interactions
    same_user = inter["user_id"].to_numpy()[1:] == inter["user_id"].to_numpy()[:-1]
    first = inter["item_id"].to_numpy()[:-1][same_user]
    second = inter["item_id"].to_numpy()[1:][same_user]

    def overlap(a: np.ndarray, b: np.ndarray) -> float:
        pairs = zip(a, b, strict=True)
        return float(np.mean([len(genres[x] & genres[y]) / len(genres[x] | genres[y]) for x, y in pairs]))

    shuffled = np.random.default_rng(0).permutation(second)
    assert overlap(first, second) > 1.2 * overlap(first, shuffled)


def test_arguments(data) -> None:
    small = generate_synthetic(n_users=20, n_items=8, interactions_per_user=(3, 50), seed=3)
    assert small.interactions.groupby("user_id").size().max() <= 8  # capped by the catalogue
    with pytest.raises(ValueError):
        generate_synthetic(interactions_per_user=(10, 5))


def test_load_dataset_dispatches_synthetic(data) -> None:
    assert load_dataset("synthetic").interactions.equals(data.interactions)
    assert len(load_dataset("synthetic:50").users) == 50
    with pytest.raises(ValueError, match="N_USERS"):
        load_dataset("synthetic:many")
