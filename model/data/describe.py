"""What a data set holds, for choosing how to train on it: its sizes, its history lengths, and how
often a user's first actions share a timestamp.

The last decides the training recipe (``COLDWARM_RECIPE``, ``model/recipe.py``). Where the first actions
come in batches rated in one second (MovieLens's sign-up pages: 54% of consecutive pairs among a user's
first ten tie), their order is the protocol's tie-break by item id, "the next action" is an arbitrary
pick from the batch, and training a short prefix towards its next ten actions measured better on
validation users. Where they never tie (the synthetic data) the next action is the better target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.data.schema import InteractionData
from model.settings import BATCHED_STARTS_RECIPE, TrainConfig

# Positions counted by ``early_tie_share``: the pairs among a user's first this-many actions, the
# prefixes a target window reshapes by default.
EARLY_ACTIONS: int = TrainConfig.model_fields["target_window_until"].default
# At or above this share of tied early pairs a data set's first actions are taken to be unordered
# batches. MovieLens (0.54) and the synthetic data (0.00) sit far on either side: the threshold only
# has to separate them, and no data set between has been measured.
BATCHED_START_SHARE = 0.25


def recipe_environment(recipe: dict[str, dict[str, object]]) -> str:
    """A recipe's fields as the environment variables that set them: COLDWARM_TRAIN__TARGET_WINDOW=10 ..."""
    return " ".join(
        f"COLDWARM_{section.upper()}__{field.upper()}={_environment_value(value)}"
        for section, fields in recipe.items()
        for field, value in fields.items()
    )


def _environment_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# What COLDWARM_RECIPE=batched_starts sets (model/recipe.py), as environment variables.
BATCHED_START_SETTINGS = recipe_environment(BATCHED_STARTS_RECIPE)


@dataclass(frozen=True)
class DataSummary:
    name: str
    users: int
    items: int
    interactions: int
    history_quantiles: dict[str, float]  # actions per user at the 10th, 50th and 90th percentile
    early_tie_share: float  # of consecutive pairs among users' first EARLY_ACTIONS, those tied in time

    @property
    def batched_start(self) -> bool:
        """Whether users' first actions come in unordered batches (the case for a target window)."""
        return is_batched_start(self.early_tie_share)


def is_batched_start(share: float) -> bool:
    """Whether an ``early_tie_share`` says first actions come in unordered batches: the one threshold
    ``describe`` reports and ``COLDWARM_RECIPE=auto`` (model/recipe.py) decides by."""
    return share >= BATCHED_START_SHARE


def early_tie_share(user_ids: np.ndarray, timestamps: np.ndarray, first: int = EARLY_ACTIONS) -> float:
    """Of the consecutive pairs (position p-1, p) with 1 <= p < ``first`` of each user's actions, the
    share whose timestamps are equal; rows sorted by (user, timestamp). 0 when there is no such pair."""
    if len(user_ids) < 2:
        return 0.0
    starts, lengths = user_runs(user_ids)
    position = np.arange(len(user_ids)) - np.repeat(starts, lengths)
    counted = (position >= 1) & (position < first)
    if not counted.any():
        return 0.0
    tied = np.r_[False, timestamps[1:] == timestamps[:-1]]
    return float(tied[counted].mean())


def user_runs(user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first row, rows) of each user's run in rows sorted by user."""
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]]) if len(user_ids) else np.zeros(0, int)
    return starts, np.diff(np.r_[starts, len(user_ids)])


def describe(data: InteractionData) -> DataSummary:
    table = data.interactions
    user_ids = table["user_id"].to_numpy(np.int64)
    per_user = user_runs(user_ids)[1]
    quantiles = np.percentile(per_user, [10, 50, 90]) if len(per_user) else np.zeros(3)
    return DataSummary(
        name=data.name,
        users=len(per_user),
        items=len(data.catalog_item_ids()),
        interactions=len(table),
        history_quantiles={f"p{q}": float(v) for q, v in zip((10, 50, 90), quantiles, strict=True)},
        early_tie_share=early_tie_share(user_ids, table["timestamp"].to_numpy(np.int64)),
    )


def training_advice(summary: DataSummary) -> str:
    """One line: which training recipe suits the data, and why."""
    share = (
        f"{summary.early_tie_share:.0%} of the pairs among users' first {EARLY_ACTIONS} actions tied in time"
    )
    if summary.batched_start:
        return (
            f"first actions come in unordered batches ({share}, at least {BATCHED_START_SHARE:.0%}): "
            f"the batched_starts recipe, {BATCHED_START_SETTINGS}, measured better on such data "
            "(MovieLens); COLDWARM_RECIPE=auto, the default, chooses it when the train users' share is "
            "as high"
        )
    return (
        f"first actions are ordered in time ({share}, under {BATCHED_START_SHARE:.0%}): the next_action "
        "recipe, each prefix's next action as its target; COLDWARM_RECIPE=auto, the default, chooses it "
        "when the train users' share is as low"
    )
