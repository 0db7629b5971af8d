"""Stage popularity: the items' counted popularity per interaction-count bucket, against hand counts,
and the one-form rule of the state term."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from model.features import COUNT_COLUMN, STATE_COLUMNS
from model.samples import TrainingSamples
from model.settings import ModelConfig
from model.stage_popularity import stage_popularity_columns


def samples_with(stages: list[int], targets: list[int]) -> TrainingSamples:
    """Samples whose count bucket and target are given; the rest is what the table does not read."""
    n = len(targets)
    state = torch.zeros(n, len(STATE_COLUMNS), dtype=torch.int16)
    state[:, COUNT_COLUMN] = torch.tensor(stages, dtype=torch.int16)
    state[:, COUNT_COLUMN - 1] = 7  # another state column: must not be read as the stage
    return TrainingSamples(
        user_profile=torch.zeros(1, 4, dtype=torch.long),
        sequence_codes=torch.zeros(0, dtype=torch.int32),
        sequence_offsets=torch.zeros(2, dtype=torch.long),
        user_row=np.zeros(n, dtype=np.int64),
        position=torch.zeros(n, dtype=torch.int32),
        state=state,
        target=torch.tensor(targets, dtype=torch.long),
        max_history=5,
    )


def standardised(values: list[float]) -> np.ndarray:
    array = np.asarray(values)
    return (array - array.mean()) / array.std()


def test_each_column_is_the_standardised_log_count_of_the_targets_up_to_its_stage() -> None:
    # Stage 1: item 0 chosen twice, item 1 once; stage 2: item 2 once; stage 0 never reached.
    columns = stage_popularity_columns(samples_with([1, 1, 1, 2], [0, 0, 1, 2]), stages=range(4), n_items=3)
    table = columns.counted
    assert table.shape == (3, 4) and table.dtype == np.float32
    np.testing.assert_array_equal(table[:, 0], np.zeros(3))
    np.testing.assert_allclose(table[:, 1], standardised([math.log(3), math.log(2), 0.0]), atol=1e-6)
    # Stage 2 and later count stage 1's samples too.
    for stage in (2, 3):
        np.testing.assert_allclose(
            table[:, stage], standardised([math.log(3), math.log(2), math.log(2)]), atol=1e-6
        )


def test_without_own_is_one_count_less_on_the_table_s_scale() -> None:
    """What a sample that chose an item finds in its columns: the counts less its own, standardised
    as the table is, so the difference to the table is the sample's own count alone."""
    columns = stage_popularity_columns(samples_with([1, 1, 1, 2], [0, 0, 1, 2]), stages=range(4), n_items=3)
    logs = np.log([3.0, 2.0, 1.0])  # stage 1: log(1 + count) of items 0, 1, 2
    mean, std = logs.mean(), logs.std()
    less_one = np.log([2.0, 1.0, 1.0])  # log(1 + max(count - 1, 0))
    np.testing.assert_allclose(columns.without_own[:, 1], (less_one - mean) / std, atol=1e-6)
    assert np.all(columns.without_own[:, 1:] < columns.counted[:, 1:] + 1e-7)
    np.testing.assert_array_equal(columns.without_own[:, 0], np.zeros(3))


def test_columns_start_at_the_first_stage_asked_for() -> None:
    """Narrow columns left out (ModelConfig.stage_popularity_from): the rest are as they were, still
    counting the earlier stages' samples."""
    samples = samples_with([1, 1, 1, 2, 3], [0, 0, 1, 2, 2])
    every = stage_popularity_columns(samples, stages=range(4), n_items=3)
    later = stage_popularity_columns(samples, stages=range(2, 4), n_items=3)
    np.testing.assert_array_equal(later.counted, every.counted[:, 2:])
    np.testing.assert_array_equal(later.without_own, every.without_own[:, 2:])


def test_a_stage_whose_targets_are_all_alike_carries_nothing() -> None:
    """Every item chosen equally often up to a stage: no preference to add, and no division by a zero
    std."""
    columns = stage_popularity_columns(samples_with([2, 2, 2], [0, 1, 2]), stages=range(3), n_items=3)
    np.testing.assert_array_equal(columns.counted, np.zeros((3, 3), dtype=np.float32))
    np.testing.assert_array_equal(columns.without_own, np.zeros((3, 3), dtype=np.float32))


def test_the_state_term_has_one_form_at_a_time() -> None:
    with pytest.raises(ValidationError, match="one term"):
        ModelConfig(stage_popularity=True, state_item_dims=4)
    assert ModelConfig(stage_popularity=True).state_item_dims == 0
