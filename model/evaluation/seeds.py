"""One model trained with several seeds: its figures as the mean over the seeds, and their spread.

Every seed is evaluated on the same points, so the mean of the seeds' group means is the group mean of
the per-point values averaged over seeds; ``mean_over_seeds`` builds that one result (per-point values
included, which the paired bootstrap then compares). ``spread_over_seeds`` gives the standard deviation
across seeds of each group's and each history length's mean: how much a figure moves with the seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.evaluation.protocol import EvaluationResult, summarise


@dataclass(frozen=True)
class SeedSpread:
    """Standard deviation across seeds of a model's group and per-h means (0.0 for a single run)."""

    runs: int
    groups: dict[str, dict[str, float]]  # group -> metric -> std of the seeds' group means
    curve: dict[int, dict[str, float]]  # h -> metric -> std of the seeds' per-h means

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "groups": {g: {m: float(v) for m, v in ms.items()} for g, ms in self.groups.items()},
            "curve": {str(h): {m: float(v) for m, v in ms.items()} for h, ms in self.curve.items()},
        }


def check_same_points(runs: Sequence[EvaluationResult]) -> None:
    """Seeds of one model can only be averaged point by point when they were evaluated on one point set."""
    if not runs:
        raise ValueError("no runs to aggregate")
    first = runs[0]
    for run in runs[1:]:
        if not (
            np.array_equal(run.point_user, first.point_user) and np.array_equal(run.point_h, first.point_h)
        ):
            raise ValueError(f"runs of {first.name} were evaluated on different points")
        if set(run.per_point) != set(first.per_point):
            raise ValueError(f"runs of {first.name} have different metrics")


def mean_over_seeds(runs: Sequence[EvaluationResult]) -> EvaluationResult:
    """The result whose per-point values are the seeds' per-point means; a single run is returned as is."""
    check_same_points(runs)
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    per_point = {
        metric: np.stack([run.per_point[metric] for run in runs]).mean(axis=0) for metric in first.per_point
    }
    return summarise(first.name, per_point, first.point_h, first.point_user)


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1): the seeds are a sample of the training randomness. 0.0 for
    one value, where there is no spread to estimate."""
    if len(values) < 2:
        return 0.0
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1))


def _std_per_key(
    tables: Sequence[Mapping[Any, Mapping[str, float]]],
) -> dict[Any, dict[str, float]]:
    """key -> metric -> std across the tables, for the keys every table has (groups or history lengths)."""
    keys = [k for k in tables[0] if all(k in t for t in tables)]
    return {k: {m: sample_std([t[k][m] for t in tables]) for m in tables[0][k]} for k in keys}


def spread_over_seeds(runs: Sequence[EvaluationResult]) -> SeedSpread:
    check_same_points(runs)
    return SeedSpread(
        runs=len(runs),
        groups=_std_per_key([run.groups for run in runs]),
        curve=_std_per_key([run.curve for run in runs]),
    )
