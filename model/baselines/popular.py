"""Popularity baselines of the evaluation protocol: global most-popular and (gender, age)-segment popular.

Both rank with counts over *train* users only, so test users' own targets never leak into the scores.
Ties on the count are left as equal scores on purpose: ``evaluate`` breaks them by lower catalog index,
which is the item id order the protocol asks for ("ties by item id").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from model.data.schema import InteractionData
from model.evaluation.protocol import EvalPoint, catalog_indices

SEGMENT_FIELDS: tuple[str, ...] = ("gender", "age")

Segment = tuple[str, ...]


def item_counts(data: InteractionData, user_ids: np.ndarray, catalog_item_ids: np.ndarray) -> np.ndarray:
    """int64 (n_catalog,): interactions of ``user_ids`` per catalog item."""
    inter = data.interactions
    mask = inter["user_id"].isin(np.asarray(user_ids, dtype=np.int64)).to_numpy()
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
