"""The fixed evaluation protocol of shared/DESIGN.md: (user, h) points, full-catalog ranking, group means.

A point is one user seen after their first h interactions; the next 10 are the targets. Every model is
a ``Ranker`` that scores the whole catalog for a batch of points; ``evaluate`` owns history exclusion,
top-K selection and its tie-breaking, so that no model can evaluate itself differently.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from model.catalog import catalog_indices
from model.data.schema import InteractionData
from model.evaluation.metrics import EMPTY_SLOT, compute_metrics

HISTORY_LENGTHS: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 20, 30, 50, 100)
KS: tuple[int, ...] = (10, 50, 100)
N_TARGETS = 10
GROUP_NAMES: tuple[str, ...] = ("cold_start", "warm_up", "active", "all")
# The user groups by interactions so far: cold_start below WARM_UP_FROM, warm_up below ACTIVE_FROM,
# active from there on. Fixed with the protocol (reported results compare groups across models and
# runs), hence constants, not settings. Over HISTORY_LENGTHS they are the protocol's groups:
# cold_start h <= 5, warm_up 10 <= h <= 30, active h >= 50.
WARM_UP_FROM = 10
ACTIVE_FROM = 50


def user_group(interaction_count: int) -> str:
    """The group of a user who has had ``interaction_count`` interactions: the one definition, used by
    the evaluation (a point's h) and by the service (the user's count)."""
    if interaction_count >= ACTIVE_FROM:
        return "active"
    if interaction_count >= WARM_UP_FROM:
        return "warm_up"
    return "cold_start"


def group_of(h: int) -> str:
    """The group of a point with history length h: its user has had h interactions."""
    return user_group(h)


def groups_of(h: int) -> tuple[str, ...]:
    """Every group a point counts in: its own group and "all"."""
    return (group_of(h), "all")


@dataclass(frozen=True)
class EvalPoint:
    user_id: int
    h: int
    history_item_ids: np.ndarray  # int64, chronological, length h
    history_timestamps: np.ndarray  # int64, aligned with history_item_ids
    target_item_ids: np.ndarray  # int64, length n_targets
    request_time: int  # timestamp of the first target: the moment the recommendation is asked for


def _user_slices(data: InteractionData) -> dict[int, tuple[int, int]]:
    """[start, stop) rows of each user in the (user, timestamp, item)-sorted interaction table."""
    users = data.interactions["user_id"].to_numpy(np.int64)
    if len(users) and np.any(np.diff(users) < 0):
        raise ValueError("interactions must be sorted by user_id (use make_interaction_data)")
    unique, starts = np.unique(users, return_index=True)
    stops = np.append(starts[1:], len(users))
    return {int(u): (int(a), int(b)) for u, a, b in zip(unique, starts, stops, strict=True)}


def build_eval_points(
    data: InteractionData,
    user_ids: Sequence[int] | np.ndarray,
    history_lengths: Sequence[int] = HISTORY_LENGTHS,
    n_targets: int = N_TARGETS,
) -> list[EvalPoint]:
    """Points per user (in the order given) and per h where the user has >= h + n_targets interactions."""
    slices = _user_slices(data)
    # The schema guarantees (user, timestamp, item) order, which is the protocol's chronological order.
    items = data.interactions["item_id"].to_numpy(np.int64)
    stamps = data.interactions["timestamp"].to_numpy(np.int64)
    points: list[EvalPoint] = []
    for user in user_ids:
        start, stop = slices.get(int(user), (0, 0))
        for h in history_lengths:
            if stop - start < h + n_targets:
                continue
            cut = start + h
            points.append(
                EvalPoint(
                    user_id=int(user),
                    h=int(h),
                    history_item_ids=items[start:cut].copy(),
                    history_timestamps=stamps[start:cut].copy(),
                    target_item_ids=items[cut : cut + n_targets].copy(),
                    request_time=int(stamps[cut]),
                )
            )
    return points


class Ranker(Protocol):
    """Anything that scores the whole catalog (sorted item ids) for a batch of points; higher is better."""

    name: str

    def score(self, points: Sequence[EvalPoint]) -> np.ndarray:
        """float32 (len(points), n_catalog), columns aligned with the sorted catalog item ids."""
        ...


@dataclass
class EvaluationResult:
    groups: dict[str, dict[str, float]]  # group -> metric ("recall@50") -> mean over the group's points
    curve: dict[int, dict[str, float]]  # h -> metric -> mean over that h's points
    points: dict[str, int]  # group -> number of points (0 where a group is empty)
    name: str = ""
    curve_points: dict[int, int] = field(default_factory=dict)  # h -> number of points
    # Per-point values, kept for paired comparisons and significance tests; not serialised.
    per_point: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    point_h: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    point_user: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "groups": {g: {m: float(v) for m, v in ms.items()} for g, ms in self.groups.items()},
            "curve": {str(h): {m: float(v) for m, v in ms.items()} for h, ms in self.curve.items()},
            "points": {g: int(n) for g, n in self.points.items()},
            "curve_points": {str(h): int(n) for h, n in self.curve_points.items()},
        }


def exclude_history(scores: np.ndarray, points: Sequence[EvalPoint], catalog_item_ids: np.ndarray) -> None:
    """Sets the score of every point's history items to -inf, in place."""
    rows = [np.full(len(p.history_item_ids), i, np.int64) for i, p in enumerate(points)]
    cols = [catalog_indices(catalog_item_ids, p.history_item_ids) for p in points]
    if not rows:
        return
    r, c = np.concatenate(rows), np.concatenate(cols)
    keep = c != EMPTY_SLOT
    scores[r[keep], c[keep]] = -np.inf


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(n, k) catalog indices by descending score, ties to the lower index; -inf items become EMPTY_SLOT.

    argpartition alone picks arbitrarily among items tied at the K-th score, so the cut is made
    explicitly: everything above the K-th score, then the tied items in index order until K are taken.
    """
    n, m = scores.shape
    k_eff = min(k, m)
    out = np.full((n, k), EMPTY_SLOT, np.int64)
    if n == 0 or k_eff == 0:
        return out
    scores = np.where(np.isnan(scores), -np.inf, scores)
    kth = np.partition(scores, m - k_eff, axis=1)[:, m - k_eff][:, None]
    above = scores > kth
    tied = scores == kth
    room = k_eff - above.sum(axis=1, keepdims=True)
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
    # np.nonzero walks rows in index order, so each row's picks arrive sorted by catalog index ...
    idx = np.nonzero(chosen)[1].reshape(n, k_eff)
    picked = np.take_along_axis(scores, idx, axis=1)
    # ... and a stable sort on the score keeps that index order among equal scores.
    order = np.argsort(-picked, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    picked = np.take_along_axis(picked, order, axis=1)
    out[:, :k_eff] = np.where(np.isneginf(picked), EMPTY_SLOT, idx)
    return out


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def rank_points(
    ranker: Ranker,
    points: Sequence[EvalPoint],
    catalog_item_ids: np.ndarray,
    k: int,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """(len(points), k) ranked catalog indices, history excluded."""
    ranked = np.full((len(points), k), EMPTY_SLOT, np.int64)
    batches = list(_batches(len(points), batch_size))
    iterator: Any = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=f"eval {ranker.name}", unit="batch", file=sys.stderr, leave=False)
    for part in iterator:
        batch = points[part]
        scores = np.array(ranker.score(batch), dtype=np.float32, copy=True)
        if scores.shape != (len(batch), len(catalog_item_ids)):
            raise ValueError(
                f"{ranker.name}.score returned {scores.shape}, expected {(len(batch), len(catalog_item_ids))}"
            )
        exclude_history(scores, batch, catalog_item_ids)
        ranked[part] = top_k(scores, k)
    return ranked


def _means(per_point: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, float]:
    return {metric: float(values[mask].mean()) for metric, values in per_point.items()}


def summarise(
    name: str, per_point: dict[str, np.ndarray], point_h: np.ndarray, point_user: np.ndarray
) -> EvaluationResult:
    """Group and per-h means of per-point metrics; empty groups get a count of 0 and no metrics."""
    groups: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for group in GROUP_NAMES:
        mask = np.array([group in groups_of(int(h)) for h in point_h], dtype=bool)
        counts[group] = int(mask.sum())
        if counts[group]:
            groups[group] = _means(per_point, mask)
    curve = {int(h): _means(per_point, point_h == h) for h in np.unique(point_h)}
    curve_points = {int(h): int((point_h == h).sum()) for h in np.unique(point_h)}
    return EvaluationResult(
        groups=groups,
        curve=curve,
        points=counts,
        name=name,
        curve_points=curve_points,
        per_point=per_point,
        point_h=point_h,
        point_user=point_user,
    )


def evaluate_rankings(
    name: str,
    points: Sequence[EvalPoint],
    ranked: np.ndarray,
    catalog_item_ids: np.ndarray,
    ks: Sequence[int] = KS,
) -> EvaluationResult:
    """Recall/NDCG/HR@K per group and per h of given top-K rankings ((n, K) catalog indices,
    EMPTY_SLOT padded): a ranker's, or what a service answered for the same points."""
    catalog_item_ids = np.asarray(catalog_item_ids, dtype=np.int64)
    if len(ranked) != len(points):
        raise ValueError(f"{len(ranked)} rankings for {len(points)} points")
    n_targets = len(points[0].target_item_ids) if points else N_TARGETS
    # A target outside the catalog maps to EMPTY_SLOT, which hit_matrix never counts as a hit.
    targets = (
        np.stack([catalog_indices(catalog_item_ids, p.target_item_ids) for p in points])
        if points
        else np.zeros((0, n_targets), np.int64)
    )
    per_point = compute_metrics(np.asarray(ranked, dtype=np.int64), targets, tuple(int(k) for k in ks))
    point_h, point_user = point_arrays(points)
    return summarise(name, per_point, point_h, point_user)


def point_arrays(points: Sequence[EvalPoint]) -> tuple[np.ndarray, np.ndarray]:
    """(history length, user id) of each point, as the int64 arrays ``summarise`` groups by."""
    return (
        np.array([p.h for p in points], dtype=np.int64),
        np.array([p.user_id for p in points], dtype=np.int64),
    )


def gate_cold_summary(points: Sequence[EvalPoint], gates: np.ndarray) -> EvaluationResult:
    """Mean cold-expert gate weight ("gate_cold") per group and per h ((n, 2) gates [cold, warm]):
    how "cold" the model takes each group's users, averaged by ``summarise`` like a metric."""
    point_h, point_user = point_arrays(points)
    cold = np.asarray(gates, dtype=np.float64).reshape(len(points), 2)[:, 0]
    return summarise("gate", {"gate_cold": cold}, point_h, point_user)


def gate_cold_means(points: Sequence[EvalPoint], gates: np.ndarray) -> dict[str, float]:
    """``gate_cold_summary``'s means per group."""
    return {group: values["gate_cold"] for group, values in gate_cold_summary(points, gates).groups.items()}


def evaluate(
    ranker: Ranker,
    points: Sequence[EvalPoint],
    catalog_item_ids: np.ndarray,
    ks: Sequence[int] = KS,
    batch_size: int = 256,
    progress: bool = True,
) -> EvaluationResult:
    """Ranks the whole catalog for every point and averages Recall/NDCG/HR@K per group and per h."""
    catalog_item_ids = np.asarray(catalog_item_ids, dtype=np.int64)
    if np.any(np.diff(catalog_item_ids) <= 0):
        raise ValueError("catalog_item_ids must be sorted and unique")
    ks = tuple(int(k) for k in ks)
    ranked = rank_points(ranker, points, catalog_item_ids, max(ks), batch_size, progress)
    return evaluate_rankings(ranker.name, points, ranked, catalog_item_ids, ks)
