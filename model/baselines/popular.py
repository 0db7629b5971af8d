"""Popularity baselines of the evaluation protocol: global most-popular, (gender, age)-segment popular,
and onboarding-popular (what train users chose among their first actions).

Both rank with counts over *train* users only, so test users' own targets never leak into the scores.
Ties on the count are left as equal scores on purpose: ``evaluate`` breaks them by lower catalog index,
which is the item id order the protocol asks for ("ties by item id").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from model.baselines.tuning import GridTuning, tune_on_validation
from model.data.schema import InteractionData
from model.data.split import UserSplit
from model.evaluation.protocol import EvalPoint, catalog_indices

SEGMENT_FIELDS: tuple[str, ...] = ("gender", "age")
# How many of each train user's first actions onboarding-popular may count, and what picks among them
# on the validation users (the group it is built for, and the figure Cold & Warm Net stops on).
ONBOARDING_FIRST_N_GRID: tuple[int, ...] = (5, 10, 20, 50, 100)
ONBOARDING_TUNING = ("cold_start", "recall@50")

Segment = tuple[str, ...]


def item_counts(
    data: InteractionData, user_ids: np.ndarray, catalog_item_ids: np.ndarray, first_n: int | None = None
) -> np.ndarray:
    """int64 (n_catalog,): interactions of ``user_ids`` per catalog item; with ``first_n``, only each
    user's first ``first_n``, in the protocol's order (time, then item id)."""
    inter = data.interactions
    users = inter["user_id"]
    mask = users.isin(np.asarray(user_ids, dtype=np.int64)).to_numpy()
    if first_n is not None:  # rows are in the protocol's order, so a user's k-th row is their k-th action
        mask = mask & (users.groupby(users, sort=False).cumcount().to_numpy() < first_n)
    cols = catalog_indices(catalog_item_ids, inter["item_id"].to_numpy(np.int64)[mask])
    cols = cols[cols >= 0]
    return np.bincount(cols, minlength=len(catalog_item_ids)).astype(np.int64)


def lexicographic_scores(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """float32 scores ordering items by (primary, secondary), equal pairs left tied.

    Dense ranks rather than primary * scale + secondary: ranks stay below the catalog size, so float32
    holds them exactly however large the counts grow.
    """
    order = np.lexsort((secondary, primary))
    pairs = np.stack([primary[order], secondary[order]], axis=1)
    new_value = np.ones(len(order), dtype=bool)
    new_value[1:] = np.any(pairs[1:] != pairs[:-1], axis=1)
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.cumsum(new_value) - 1
    return ranks.astype(np.float32)


def _repeat(row: np.ndarray, n: int) -> np.ndarray:
    return np.repeat(row[None, :], n, axis=0)


@dataclass
class MostPopular:
    """Scores every point with train users' interaction counts."""

    counts: np.ndarray  # int64 (n_catalog,)
    name: str = "most-popular"

    @classmethod
    def fit(
        cls, data: InteractionData, train_user_ids: np.ndarray, catalog_item_ids: np.ndarray
    ) -> MostPopular:
        return cls(counts=item_counts(data, train_user_ids, catalog_item_ids))

    def score(self, points: Sequence[EvalPoint]) -> np.ndarray:
        return _repeat(self.counts.astype(np.float32), len(points))


def user_segments(data: InteractionData, fields: Sequence[str] = SEGMENT_FIELDS) -> dict[int, Segment]:
    """Every known user's segment: the profile is available at request time, test users included."""
    users = data.users
    keys = zip(*(users[f].astype(str).tolist() for f in fields), strict=True)
    return {int(u): tuple(k) for u, k in zip(users["user_id"].tolist(), keys, strict=True)}


@dataclass
class SegmentPopular:
    """Most popular among train users of the point's (gender, age) segment; global popularity otherwise."""

    global_scores: np.ndarray  # float32 (n_catalog,), used for segments never seen in training
    segment_scores: dict[Segment, np.ndarray]  # float32 (n_catalog,) per segment seen in training
    segment_of_user: dict[int, Segment] = field(repr=False)
    name: str = "segment-popular"

    @classmethod
    def fit(
        cls,
        data: InteractionData,
        train_user_ids: np.ndarray,
        catalog_item_ids: np.ndarray,
        fields: Sequence[str] = SEGMENT_FIELDS,
    ) -> SegmentPopular:
        segment_of_user = user_segments(data, fields)
        global_counts = item_counts(data, train_user_ids, catalog_item_ids)
        members: dict[Segment, list[int]] = {}
        for user in np.asarray(train_user_ids, dtype=np.int64).tolist():
            if user in segment_of_user:
                members.setdefault(segment_of_user[user], []).append(user)
        segment_scores = {
            segment: lexicographic_scores(
                item_counts(data, np.array(users, dtype=np.int64), catalog_item_ids), global_counts
            )
            for segment, users in members.items()
        }
        return cls(
            global_scores=global_counts.astype(np.float32),
            segment_scores=segment_scores,
            segment_of_user=segment_of_user,
        )

    def scores_for_user(self, user_id: int) -> np.ndarray:
        segment = self.segment_of_user.get(int(user_id))
        if segment is None:
            return self.global_scores
        return self.segment_scores.get(segment, self.global_scores)

    def score(self, points: Sequence[EvalPoint]) -> np.ndarray:
        if not points:
            return np.zeros((0, len(self.global_scores)), np.float32)
        return np.stack([self.scores_for_user(p.user_id) for p in points]).astype(np.float32)


@dataclass
class OnboardingPopular:
    """Most popular among train users' first ``first_n`` actions, ties by overall popularity: what new
    users choose first is not what everyone chooses (on MovieLens, the titles of the sign-up pages)."""

    scores: np.ndarray  # float32 (n_catalog,)
    first_n: int
    name: str = "onboarding-popular"

    @classmethod
    def fit(
        cls, data: InteractionData, train_user_ids: np.ndarray, catalog_item_ids: np.ndarray, first_n: int
    ) -> OnboardingPopular:
        if first_n < 1:
            raise ValueError(f"first_n must be at least 1, got {first_n}")
        first = item_counts(data, train_user_ids, catalog_item_ids, first_n)
        overall = item_counts(data, train_user_ids, catalog_item_ids)
        return cls(scores=lexicographic_scores(first, overall), first_n=first_n)

    def score(self, points: Sequence[EvalPoint]) -> np.ndarray:
        return _repeat(self.scores, len(points))


def tune_first_n(
    data: InteractionData,
    split: UserSplit,
    catalog_item_ids: np.ndarray,
    grid: Sequence[int] = ONBOARDING_FIRST_N_GRID,
) -> GridTuning[OnboardingPopular]:
    """Onboarding-popular with the ``grid`` value of first_n that is best on the validation users
    (``ONBOARDING_TUNING``); ties go to the smaller one."""
    return tune_on_validation(
        lambda first_n: OnboardingPopular.fit(data, split.train, catalog_item_ids, int(first_n)),
        grid, data, split, catalog_item_ids, *ONBOARDING_TUNING,
    )  # fmt: skip
