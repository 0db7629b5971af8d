"""Training's order of actions logged at one moment: the data's, or shuffled once (seeded)."""

from __future__ import annotations

import dataclasses

import numpy as np

from model.data.split import split_users
from model.data.synthetic import generate_synthetic
from model.features import FeatureConfig, FeatureEncoder
from model.samples import UserSequences
from model.settings import TrainConfig
from model.train import TrainingContext

# User 10: items 5, 3, 9 at t=100 (ordered by item id in the data: 3, 5, 9), then 1 at t=200.
# User 20: items 7, 8 at t=50.
SEQUENCES = UserSequences(
    user_ids=np.array([10, 20]),
    offsets=np.array([0, 4, 6]),
    items=np.array([3, 5, 9, 1, 7, 8]),
    timestamps=np.array([100, 100, 100, 200, 50, 50]),
)


def test_each_moment_s_actions_are_permuted_within_it_and_nothing_else_moves() -> None:
    firsts = set()
    for seed in range(20):
        shuffled = SEQUENCES.same_moment_shuffled(np.random.default_rng(seed))
        np.testing.assert_array_equal(shuffled.offsets, SEQUENCES.offsets)
        np.testing.assert_array_equal(shuffled.timestamps, SEQUENCES.timestamps)
        assert sorted(shuffled.items[:3]) == [3, 5, 9] and shuffled.items[3] == 1
        assert sorted(shuffled.items[4:]) == [7, 8]
        firsts.add(int(shuffled.items[0]))
    assert firsts == {3, 5, 9}  # any of the moment's actions can come first
    again = SEQUENCES.same_moment_shuffled(np.random.default_rng(3))
    np.testing.assert_array_equal(again.items, SEQUENCES.same_moment_shuffled(np.random.default_rng(3)).items)


def test_the_training_context_reads_the_order_its_config_names() -> None:
    data = generate_synthetic(n_users=120, n_items=40, seed=2)
    # One moment per user's first three actions, so that the order has something to change.
    interactions = data.interactions.copy()
    rank = interactions.groupby("user_id").cumcount()
    first = interactions.groupby("user_id")["timestamp"].transform("min")
    interactions.loc[rank < 3, "timestamp"] = first[rank < 3]
    data = dataclasses.replace(
        data, interactions=interactions.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    )
    split = split_users(data)

    def first_targets(order: str) -> np.ndarray:
        encoder = FeatureEncoder.fit(data, split.train, FeatureConfig(max_history=10))
        context = TrainingContext.build(
            data, split, encoder, TrainConfig(same_moment_order=order, target_window=1)
        )
        at_start = context.samples.position.numpy() == 0
        return context.samples.target.numpy()[at_start]

    in_data_order = first_targets("data")
    shuffled = first_targets("shuffled")
    assert len(in_data_order) == len(shuffled) == len(split.train)
    assert (in_data_order != shuffled).mean() > 0.3
    assert np.array_equal(first_targets("shuffled"), shuffled)  # seeded
