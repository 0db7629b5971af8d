"""A baseline's one setting chosen on the validation users: each value of a grid fitted on the train
users and evaluated on the validation points; the best by one group's metric is kept, ties going to
the smaller value."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from model.data.schema import InteractionData
from model.data.split import UserSplit
from model.evaluation.protocol import Ranker, build_eval_points, evaluate

RankerT = TypeVar("RankerT", bound=Ranker)


@dataclass
class GridTuning(Generic[RankerT]):
    best: float  # the grid value chosen
    validation: dict[float, float]  # value -> the validation figure it was chosen by
    seconds: dict[float, float]  # value -> fit + evaluation time
    model: RankerT = field(repr=False)  # fitted on the train users with ``best``


def tune_on_validation(
    fit: Callable[[float], RankerT],
    grid: Sequence[float],
    data: InteractionData,
    split: UserSplit,
    catalog: np.ndarray,
    group: str,
    metric: str,
) -> GridTuning[RankerT]:
    """``fit(value)`` for each grid value, scored by ``metric`` of ``group`` over the validation users."""
    points = build_eval_points(data, split.validation)
    if not points:
        raise ValueError("no validation points: every validation user has fewer than 10 interactions")
    validation: dict[float, float] = {}
    seconds: dict[float, float] = {}
    best: tuple[float, RankerT] | None = None
    for value in sorted(grid):
        start = time.perf_counter()
        model = fit(value)
        validation[value] = evaluate(model, points, catalog, progress=False).groups[group][metric]
        seconds[value] = time.perf_counter() - start
        if best is None or validation[value] > validation[best[0]]:
            best = (value, model)
    if best is None:
        raise ValueError("empty grid")
    return GridTuning(best=best[0], validation=validation, seconds=seconds, model=best[1])
