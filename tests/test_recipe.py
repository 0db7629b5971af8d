"""model/recipe.py: COLDWARM_RECIPE resolved on the data, the train users' first actions deciding, and
every field the settings set left as set."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from model.data.schema import InteractionData, normalise_interactions
from model.data.split import split_users
from model.data.synthetic import generate_synthetic
from model.recipe import choose_recipe, settings_for_data
from model.settings import BATCHED_STARTS_RECIPE, ModelConfig, Settings, TrainConfig

DAY = 86_400
RECIPE_FIELDS = {"model.expert_state_input", "model.expert_state_columns", "train.target_window"}


def interactions(batched_users: set[int] | None = None, n_users: int = 20) -> InteractionData:
    """Eight actions per user, one a day; the users in ``batched_users`` (default: all) rate their first
    four in one second."""
    chosen = set(range(1, n_users + 1)) if batched_users is None else batched_users
    rows = [
        (user, item, 1_000 + DAY * max(position, 3 if user in chosen else position))
        for user in range(1, n_users + 1)
        for position, item in enumerate(range(user, user + 8))
    ]
    table = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    return InteractionData(
        normalise_interactions(table), pd.DataFrame(), pd.DataFrame({"item_id": []}), "test"
    )


@pytest.fixture(autouse=True)
def no_coldwarm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings() reads the environment: none of the surrounding shell's COLDWARM_ variables."""
    for name in [n for n in os.environ if n.startswith("COLDWARM_")]:
        monkeypatch.delenv(name)


def test_auto_trains_batched_starts_with_the_count_and_a_window() -> None:
    settings, choice = settings_for_data(Settings(), interactions())
    assert (choice.asked, choice.chosen) == ("auto", "batched_starts")
    assert choice.early_tie_share == 3 / 7  # (0,1), (1,2), (2,3) of the seven pairs among eight actions
    assert set(choice.applied) == RECIPE_FIELDS
    assert settings.model.expert_state_input is True
    assert settings.model.expert_state_columns == "count"
    assert settings.train.target_window == BATCHED_STARTS_RECIPE["train"]["target_window"] == 10
    # Nothing else moves.
    untouched = Settings()
    assert settings.model.model_dump(exclude={"expert_state_input", "expert_state_columns"}) == (
        untouched.model.model_dump(exclude={"expert_state_input", "expert_state_columns"})
    )
    assert settings.train.model_dump(exclude={"target_window"}) == untouched.train.model_dump(
        exclude={"target_window"}
    )
    assert settings.features == untouched.features
    assert "batched_starts" in choice.describe() and "43%" in choice.describe()


def test_auto_keeps_the_defaults_where_first_actions_are_ordered() -> None:
    data = generate_synthetic(n_users=60, n_items=100)
    settings, choice = settings_for_data(Settings(), data)
    assert (choice.chosen, choice.early_tie_share, choice.applied) == ("next_action", 0.0, {})
    assert settings == Settings()


def test_only_the_train_users_decide() -> None:
    n_users = 20
    split = split_users(interactions(n_users=n_users))
    held_out = {int(u) for u in (*split.validation, *split.test)}
    # Validation and test users start in batches, train users in order: auto must not see the batches.
    choice = choose_recipe(Settings(), interactions(batched_users=held_out, n_users=n_users))
    assert (choice.chosen, choice.early_tie_share) == ("next_action", 0.0)
    # And the other way round: only the train users' batches count.
    train = {int(u) for u in split.train}
    choice = choose_recipe(Settings(), interactions(batched_users=train, n_users=n_users))
    assert choice.chosen == "batched_starts" and choice.early_tie_share == 3 / 7


def test_fields_the_settings_set_win_over_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLDWARM_TRAIN__TARGET_WINDOW", "1")
    settings, choice = settings_for_data(
        Settings(model=ModelConfig(expert_state_columns="all")), interactions()
    )
    assert choice.chosen == "batched_starts"
    assert set(choice.applied) == {"model.expert_state_input"}
    assert settings.train.target_window == 1  # from the environment
    assert settings.model.expert_state_columns == "all"  # from code
    assert settings.model.expert_state_input is True  # the recipe's


def test_a_named_recipe_is_not_measured_and_applies_as_named() -> None:
    settings, choice = settings_for_data(Settings(recipe="next_action"), interactions())
    assert (choice.chosen, choice.early_tie_share, choice.applied) == ("next_action", None, {})
    assert settings.train.target_window == 1

    synthetic = generate_synthetic(n_users=60, n_items=100)
    settings, choice = settings_for_data(Settings(recipe="batched_starts"), synthetic)
    assert (choice.chosen, choice.early_tie_share) == ("batched_starts", None)
    assert settings.train.target_window == 10 and settings.model.expert_state_input is True


def test_the_recipe_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLDWARM_RECIPE", "next_action")
    assert choose_recipe(Settings(), interactions()).chosen == "next_action"
    monkeypatch.setenv("COLDWARM_RECIPE", "sometimes")
    with pytest.raises(ValueError, match="recipe"):
        Settings()


def test_resolved_settings_are_validated_and_record_what_was_set() -> None:
    settings, _ = settings_for_data(Settings(train=TrainConfig(seed=3)), interactions())
    assert settings.train.seed == 3
    assert {"seed", "target_window"} <= settings.train.model_fields_set
    # Resolving again sets nothing more: the recipe's fields now count as set.
    again, choice = settings_for_data(settings, interactions())
    assert choice.applied == {} and again == settings


def test_auto_on_batched_data_trains_what_the_recipe_written_out_trains(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run-store keys are the resolved settings' dumps: auto and the recipe's variables share them."""
    resolved, _ = settings_for_data(Settings(), interactions())
    for name, value in (
        ("COLDWARM_MODEL__EXPERT_STATE_INPUT", "true"),
        ("COLDWARM_MODEL__EXPERT_STATE_COLUMNS", "count"),
        ("COLDWARM_TRAIN__TARGET_WINDOW", "10"),
    ):
        monkeypatch.setenv(name, value)
    written_out = Settings()
    assert resolved.model.model_dump(mode="json") == written_out.model.model_dump(mode="json")
    assert resolved.train.model_dump(mode="json") == written_out.train.model_dump(mode="json")
