"""Which training recipe a data set gets (``COLDWARM_RECIPE``), decided from the data before training.

- ``next_action``: the settings as they are; each prefix is trained towards its next action.
- ``batched_starts``: ``BATCHED_STARTS_RECIPE`` (the experts read the interaction count, and the first
  actions' prefixes are trained towards their next ten), for each of its fields the settings leave
  unset: a field set in the environment or in code always wins.
- ``auto`` (the default): ``batched_starts`` where the train users' first actions come in same-second
  batches (``model.data.describe``: at least ``BATCHED_START_SHARE`` of the pairs among their first
  ten actions tied in time, as in MovieLens's sign-up pages), else ``next_action``.

Only the train users' interactions decide, so the choice never reads a validation or test user. The
choice is logged and recorded in evaluation reports; what is trained is the resolved settings, so
stored runs are keyed by what the recipe set, not by its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from model.data.describe import BATCHED_START_SHARE, EARLY_ACTIONS, early_tie_share, is_batched_start
from model.data.schema import InteractionData
from model.data.split import split_users
from model.settings import BATCHED_STARTS_RECIPE, Settings


@dataclass(frozen=True)
class RecipeChoice:
    """What ``COLDWARM_RECIPE`` asked for, what was chosen, on what evidence, and which fields it set."""

    asked: str
    chosen: str
    early_tie_share: float | None  # of the train users' early pairs; None when not measured
    applied: dict[str, Any]  # "section.field" → value the recipe set

    def describe(self) -> str:
        evidence = (
            ""
            if self.early_tie_share is None
            else f"; {self.early_tie_share:.0%} of the pairs among train users' first {EARLY_ACTIONS} "
            f"actions tied in time (batched at {BATCHED_START_SHARE:.0%})"
        )
        applied = ", ".join(f"{name}={value}" for name, value in self.applied.items()) or "nothing"
        return f"recipe {self.chosen} (asked: {self.asked}{evidence}); it set {applied}"

    def to_record(self) -> dict[str, Any]:
        return {
            "asked": self.asked,
            "chosen": self.chosen,
            "early_tie_share": None if self.early_tie_share is None else round(self.early_tie_share, 4),
            "applied": dict(self.applied),
        }


def train_tie_share(data: InteractionData) -> float:
    """``early_tie_share`` over the protocol's train users only."""
    train = split_users(data).train
    table = data.interactions
    user_ids = table["user_id"].to_numpy(np.int64)
    rows = np.isin(user_ids, train)
    return early_tie_share(user_ids[rows], table["timestamp"].to_numpy(np.int64)[rows])


def choose_recipe(settings: Settings, data: InteractionData) -> RecipeChoice:
    """The recipe ``settings.recipe`` comes to on ``data``, and the fields it sets there."""
    share: float | None = None
    chosen: str = settings.recipe
    if settings.recipe == "auto":
        share = train_tie_share(data)
        chosen = "batched_starts" if is_batched_start(share) else "next_action"
    applied: dict[str, Any] = {}
    if chosen == "batched_starts":
        for section, fields in BATCHED_STARTS_RECIPE.items():
            given = getattr(settings, section).model_fields_set
            applied |= {f"{section}.{name}": value for name, value in fields.items() if name not in given}
    return RecipeChoice(settings.recipe, chosen, share, applied)


def apply_recipe(settings: Settings, choice: RecipeChoice) -> Settings:
    """``settings`` with the fields ``choice`` applied; other fields, and what was set, untouched."""
    updates: dict[str, Any] = {}
    for name, value in choice.applied.items():
        section, field = name.split(".", 1)
        updates.setdefault(section, {})[field] = value
    sections = {}
    for section, fields in updates.items():
        current = getattr(settings, section)
        # Validated again, with what was set kept as set: model_copy would skip the section's checks.
        sections[section] = type(current).model_validate(current.model_dump(exclude_unset=True) | fields)
    return settings.model_copy(update=sections)


def settings_for_data(settings: Settings, data: InteractionData) -> tuple[Settings, RecipeChoice]:
    """The settings to train on ``data`` with, once the recipe is resolved, and the choice made."""
    choice = choose_recipe(settings, data)
    return apply_recipe(settings, choice), choice
