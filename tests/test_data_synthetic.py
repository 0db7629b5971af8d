"""Synthetic data: MovieLens schema, determinism, speed, and each part of the generative story of
model/data/synthetic.py with values: profile -> taste, sessions and returns, drift, item lifecycles."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from model.data.loading import load_dataset
from model.data.synthetic import (
    AGES,
    DAY_S,
    FIRST_TIMESTAMP,
    GENRES,
    ONBOARDING_ACTIONS,
    TIME_SPAN_S,
    generate_synthetic,
)


@pytest.fixture(scope="module")
def data():
    return generate_synthetic()


def test_schema_matches_movielens(data) -> None:
    inter, users, items = data.interactions, data.users, data.items
    assert [str(t) for t in inter.dtypes] == ["int64", "int64", "int64", "float32"]
    assert set(inter["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len(users) == 600 and len(items) == 1000
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
    assert lengths.min() >= 20 and lengths.max() <= 150


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
    """The onboarding page's picks are far more popular than what settled users choose."""
    inter = data.interactions
    popularity = inter["item_id"].map(inter["item_id"].value_counts())
    step = inter.groupby("user_id").cumcount()
    assert popularity[step < 3].mean() > 1.5 * popularity[step >= ONBOARDING_ACTIONS].mean()


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


def _gaps(inter: pd.DataFrame) -> np.ndarray:
    """Seconds between consecutive actions of the same user."""
    same_user = inter["user_id"].to_numpy()[1:] == inter["user_id"].to_numpy()[:-1]
    return np.diff(inter["timestamp"].to_numpy())[same_user]


def test_sessions_minutes_apart_and_pauses_of_hours_to_months(data) -> None:
    """Most consecutive actions are minutes apart (one sitting); a share are pauses of an hour to a
    year, with nothing in between: sessions are separated by real pauses."""
    gaps = _gaps(data.interactions)
    minute, hour = 60, 3_600
    assert np.median(gaps) < 15 * minute
    assert 0.7 < np.mean(gaps < 30 * minute) < 0.95
    assert 0.05 < np.mean(gaps >= hour) < 0.3
    assert np.mean((gaps >= 30 * minute) & (gaps < hour)) < 0.01
    assert np.mean(gaps >= DAY_S) > 0.03  # some come back the next day or later ...
    assert np.mean(gaps >= 30 * DAY_S) > 0.002  # ... a few after a month or more ...
    assert gaps.max() <= 366 * DAY_S  # ... nobody after more than a year


def test_users_arrive_across_the_span_and_their_state_varies(data) -> None:
    """Arrivals spread over the three years, so a user's account age and recency at an action range
    from minutes to months, as the state features of a feed do."""
    inter = data.interactions
    assert inter["timestamp"].min() >= FIRST_TIMESTAMP
    assert inter["timestamp"].max() <= FIRST_TIMESTAMP + TIME_SPAN_S
    arrivals = (inter.groupby("user_id")["timestamp"].min() - FIRST_TIMESTAMP) / TIME_SPAN_S
    assert arrivals.quantile(0.1) < 0.2 and arrivals.quantile(0.9) > 0.7
    first = inter.groupby("user_id")["timestamp"].transform("min")
    days_since_first = (inter["timestamp"] - first) / DAY_S
    assert days_since_first.quantile(0.25) < 7 and days_since_first.quantile(0.75) > 30


def _genre_histograms(data, items: np.ndarray) -> np.ndarray:
    """(n, G) genre histograms of the rows of item ids ``items`` (n, window)."""
    genres = data.items.set_index("item_id")["genres"].str.split("|")
    index = {g: i for i, g in enumerate(GENRES)}
    item_rows = np.zeros((int(data.items["item_id"].max()) + 1, len(GENRES)))
    for item, names in genres.items():
        item_rows[item, [index[g] for g in names]] = 1.0
    return item_rows[items].sum(axis=1)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_recent_actions_predict_the_next_ones_better_than_old_ones(data) -> None:
    """Taste drifts: the genres of a user's next 10 items resemble those of their last 10 more than
    those of 10 items further back, and the resemblance fades with the distance."""
    inter = data.interactions
    window, cut = 10, 50
    rows = [g["item_id"].to_numpy() for _, g in inter.groupby("user_id") if len(g) >= cut + window]
    assert len(rows) >= 50
    nxt = _genre_histograms(data, np.stack([r[cut : cut + window] for r in rows]))
    similarity = {
        back: float(
            np.mean(
                _cosine(
                    nxt,
                    _genre_histograms(data, np.stack([r[cut - back : cut - back + window] for r in rows])),
                )
            )
        )
        for back in (10, 20, 40)
    }
    assert similarity[10] > similarity[20] > similarity[40]
    assert similarity[10] > 1.1 * similarity[40]


def test_segments_have_their_own_hits(data) -> None:
    """The top items of one (gender, age) segment differ from another's far more than the top items of
    two random halves of one segment do."""
    rows = data.interactions.merge(data.users, on="user_id")
    k = 30
    segments = [g for _, g in rows.groupby(["gender", "age"]) if g["user_id"].nunique() >= 60]
    assert len(segments) >= 4

    def top(frame: pd.DataFrame) -> set:
        return set(frame["item_id"].value_counts().index[:k])

    rng = np.random.default_rng(0)
    within = []
    for group in segments:
        users = group["user_id"].unique()
        half = group["user_id"].isin(rng.choice(users, size=len(users) // 2, replace=False))
        within.append(len(top(group[half]) & top(group[~half])) / k)
    between = [len(top(a) & top(b)) / k for i, a in enumerate(segments) for b in segments[i + 1 :]]
    assert np.mean(between) < 0.8 * np.mean(within)


def test_what_is_popular_depends_on_when_you_ask(data) -> None:
    """Items are released while the data runs and their launch buzz fades: item popularity in the first
    and the last year agree far less than in two halves of the users of one year, and an item gets its
    actions faster in the two months after its first one than half a year to a year later."""
    inter = data.interactions
    catalog = data.catalog_item_ids()
    year = np.minimum((inter["timestamp"] - FIRST_TIMESTAMP) // (365 * DAY_S), 2)

    def log_counts(frame: pd.DataFrame) -> np.ndarray:
        return np.log1p(frame["item_id"].value_counts().reindex(catalog, fill_value=0).to_numpy())

    first, last = inter[year == 0], inter[year == 2]
    users = last["user_id"].unique()
    half = last["user_id"].isin(np.random.default_rng(0).choice(users, size=len(users) // 2, replace=False))
    across_time = np.corrcoef(log_counts(first), log_counts(last))[0, 1]
    same_time = np.corrcoef(log_counts(last[half]), log_counts(last[~half]))[0, 1]
    assert across_time < 0.8 * same_time

    first_seen = inter.groupby("item_id")["timestamp"].transform("min")
    launched = (first_seen > FIRST_TIMESTAMP + 60 * DAY_S) & (
        first_seen < FIRST_TIMESTAMP + TIME_SPAN_S - 365 * DAY_S
    )
    assert inter.loc[launched, "item_id"].nunique() >= 100
    age_days = ((inter["timestamp"] - first_seen) / DAY_S)[launched]
    early_rate = np.mean((age_days > 0) & (age_days <= 60)) / 60
    late_rate = np.mean((age_days > 180) & (age_days <= 360)) / 180
    assert early_rate > 1.35 * late_rate
