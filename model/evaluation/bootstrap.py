"""Paired bootstrap over test users: is one model's group mean really above another's?

The points of one user (one per history length) are not independent: a user whose taste the models
miss pulls all of them down together. So the resampling unit is the user, with all their points:
resampling points instead would treat a user's 10 points as 10 independent draws and give intervals
too narrow. Both models are scored on the same points, so the test works on per-point differences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.evaluation.protocol import GROUP_NAMES, EvaluationResult, groups_of

# Fixed with the report's method rather than settings, like the protocol's constants: intervals from
# different runs are only comparable when drawn the same way. The functions take them as parameters.
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
# Largest (resamples x users) index block drawn at once: bounds memory on large test sets.
MAX_DRAWS_PER_CHUNK = 4_000_000


@dataclass(frozen=True)
class Interval:
    """Observed difference of group means and its bootstrap percentile interval."""

    difference: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """The whole interval lies above 0: the first model is ahead at this confidence."""
        return self.low > 0.0


def user_totals(values: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per user (in sorted id order): the sum of their points' values and their number of points."""
    _, inverse = np.unique(users, return_inverse=True)
    sums = np.bincount(inverse, weights=values.astype(np.float64))
    counts = np.bincount(inverse).astype(np.float64)
    return sums, counts


def resampled_means(
    sums: np.ndarray, counts: np.ndarray, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Point-weighted means of ``resamples`` samples of users drawn with replacement (as many users as
    there are): a group's mean is over its points, so a resampled user brings all of theirs."""
    n_users = len(sums)
    chunk = max(1, MAX_DRAWS_PER_CHUNK // n_users)
    means = np.empty(resamples, np.float64)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        drawn = rng.integers(0, n_users, size=(stop - start, n_users))
        means[start:stop] = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    return means


def paired_bootstrap(
    differences: np.ndarray,
    users: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """Percentile interval of the mean of per-point ``differences`` (model − baseline), resampling users.

    ``users[i]`` is the user of point i. Seeded: the same inputs give the same interval.
    """
    differences = np.asarray(differences, dtype=np.float64)
    users = np.asarray(users)
    if differences.shape != users.shape or differences.ndim != 1:
        raise ValueError(f"differences {differences.shape} and users {users.shape}: not aligned 1-d arrays")
    if len(differences) == 0:
        raise ValueError("no points to resample")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    sums, counts = user_totals(differences, users)
    means = resampled_means(sums, counts, resamples, np.random.default_rng(seed))
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(differences.mean()), float(low), float(high))


@dataclass(frozen=True)
class Comparison:
    """The model against the best baseline of one group on one metric."""

    baseline: str
    model_mean: float
    baseline_mean: float
    interval: Interval

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "model_mean": self.model_mean,
            "baseline_mean": self.baseline_mean,
            "difference": self.interval.difference,
            "low": self.interval.low,
            "high": self.interval.high,
            "significant": self.interval.significant,
        }


@dataclass(frozen=True)
class Significance:
    """Every comparison of one model with the best baselines, and how the intervals were drawn."""

    model: str
    comparisons: dict[str, dict[str, Comparison]] = field(default_factory=dict)  # group -> metric -> ...
    confidence: float = CONFIDENCE
    resamples: int = BOOTSTRAP_RESAMPLES
    seed: int = BOOTSTRAP_SEED

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "confidence": self.confidence,
            "resamples": self.resamples,
            "seed": self.seed,
            "resampled": "test users, each with all their points",
            "groups": {g: {m: c.to_dict() for m, c in ms.items()} for g, ms in self.comparisons.items()},
        }


def best_baseline(
    results: Mapping[str, EvaluationResult], baselines: Sequence[str], group: str, metric: str
) -> str | None:
    """The baseline with the highest group mean on ``metric``; the first listed among equals."""
    candidates = [b for b in baselines if b in results and metric in results[b].groups.get(group, {})]
    return max(candidates, key=lambda b: results[b].groups[group][metric], default=None)


def check_paired(first: EvaluationResult, second: EvaluationResult) -> None:
    """Per-point differences only mean something when both models were scored on the same points."""
    if not (
        np.array_equal(first.point_user, second.point_user) and np.array_equal(first.point_h, second.point_h)
    ):
        raise ValueError(f"{first.name} and {second.name} were evaluated on different points")


def compare_with_best_baselines(
    results: Mapping[str, EvaluationResult],
    model: str,
    baselines: Sequence[str],
    metrics: Sequence[str],
    groups: Sequence[str] = GROUP_NAMES,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> Significance:
    """Per group and metric: ``model`` against the baseline with the best mean there, by paired
    bootstrap over users. Groups without points, or without a baseline, are left out."""
    significance = Significance(model, {}, confidence, resamples, seed)
    if model not in results:
        return significance
    ours = results[model]
    for group in groups:
        in_group = np.array([group in groups_of(int(h)) for h in ours.point_h], dtype=bool)
        if not in_group.any():
            continue
        for metric in metrics:
            baseline = best_baseline(results, baselines, group, metric)
            if baseline is None or metric not in ours.per_point:
                continue
            theirs = results[baseline]
            check_paired(ours, theirs)
            differences = ours.per_point[metric][in_group] - theirs.per_point[metric][in_group]
            interval = paired_bootstrap(differences, ours.point_user[in_group], resamples, confidence, seed)
            significance.comparisons.setdefault(group, {})[metric] = Comparison(
                baseline, ours.groups[group][metric], theirs.groups[group][metric], interval
            )
    return significance
