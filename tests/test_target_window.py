"""Target windows (``TrainConfig.target_window``): a short prefix is trained towards each of its next
few actions, as the protocol asks for the next ten, with copies of its sample beside it."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from model.data.split import split_users
from model.data.synthetic import generate_synthetic
from model.features import FeatureEncoder
from model.mutual_info import behaviour_rows
from model.samples import UserSequences, build_training_samples, sample_weights
from model.settings import FeatureConfig, ModelConfig, TrainConfig
from model.train import TrainingContext, fit_cold_warm_net

# Every sample at its target's moment, each prefix towards its next action unless a test asks otherwise.
NEXT_ACTION_ONLY = TrainConfig(session_start_share=0.0, target_window=1)


@pytest.fixture(scope="module")
def setup() -> tuple[UserSequences, FeatureEncoder, object]:
    data = generate_synthetic(n_users=60, n_items=90, seed=4)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig(max_history=8))
    return UserSequences.from_interactions(data.interactions, split.train), encoder, data.users


def build(setup: tuple, **update: object):
    sequences, encoder, users = setup
    return build_training_samples(users, sequences, encoder, NEXT_ACTION_ONLY.model_copy(update=update))


def targets_by_prefix(samples) -> dict[tuple[int, int], list[int]]:
    found: dict[tuple[int, int], list[int]] = defaultdict(list)
    for row, position, target in zip(
        samples.user_row, samples.position.tolist(), samples.target.tolist(), strict=True
    ):
        found[(int(row), position)].append(target)
    return found


def test_a_short_prefix_gets_a_sample_for_each_of_its_next_actions(setup: tuple) -> None:
    sequences, encoder, _ = setup
    one = build(setup)
    window = build(setup, target_window=3, target_window_until=4)
    catalog = encoder.catalog_positions(sequences.items)
    expected_extra = 0
    found = targets_by_prefix(window)
    for (row, position), targets in targets_by_prefix(one).items():
        start = sequences.offsets[row] + position
        if position < 4:
            end = min(start + 3, sequences.offsets[row + 1])
            ahead = [int(c) for c in catalog[start:end] if c >= 0]
            assert sorted(found[(row, position)]) == sorted(ahead)
            expected_extra += len(ahead) - 1
        else:
            assert found[(row, position)] == targets == [int(catalog[start])]
    assert len(window) == len(one) + expected_extra > len(one)
    # The samples stay grouped by user, in position order; copies carry their prefix's state and history.
    keys = window.user_row * 10**6 + window.position.numpy()
    assert (np.diff(keys) >= 0).all()
    histories = window.histories(torch.arange(len(window)))
    starts = np.flatnonzero(np.r_[True, np.diff(keys) > 0])
    first_of = starts[np.searchsorted(starts, np.arange(len(window)), side="right") - 1]
    assert (first_of != np.arange(len(window))).sum() == expected_extra
    assert torch.equal(window.state, window.state[first_of])
    assert torch.equal(histories, histories[first_of])


def test_a_window_of_one_is_the_next_action_only(setup: tuple) -> None:
    one, same = build(setup), build(setup, target_window=1, target_window_until=50)
    assert torch.equal(one.target, same.target) and torch.equal(one.state, same.state)
    assert one.window_weight is None and same.window_weight is None


def test_prefix_weighting_gives_each_prefix_one_sample_s_weight(setup: tuple) -> None:
    samples = build(setup, target_window=4, target_window_until=3)
    weights = sample_weights(samples, history_balance=0.0)
    assert weights is not None
    assert weights.mean().item() == pytest.approx(1.0)
    per_prefix: dict[tuple[int, int], float] = defaultdict(float)
    for row, position, weight in zip(
        samples.user_row, samples.position.tolist(), weights.tolist(), strict=True
    ):
        per_prefix[(int(row), position)] += weight
    assert np.allclose(list(per_prefix.values()), next(iter(per_prefix.values())), rtol=1e-5)
    # Under "target" every sample weighs alike.
    assert sample_weights(build(setup, target_window=4, target_window_mode="target"), 0.0) is None


def test_history_balance_multiplies_the_window_weights(setup: tuple) -> None:
    samples = build(setup, target_window=4, target_window_until=3)
    combined = sample_weights(samples, history_balance=0.5)
    assert combined is not None and combined.mean().item() == pytest.approx(1.0)
    samples_plain = build(setup, target_window=4, target_window_until=3, target_window_mode="target")
    balance = sample_weights(samples_plain, history_balance=0.5)
    assert balance is not None
    expected = samples.window_weight * balance
    torch.testing.assert_close(combined, expected / expected.mean())


def test_draw_mode_keeps_one_sample_per_prefix_with_a_target_from_its_window(setup: tuple) -> None:
    sequences, encoder, _ = setup
    one = build(setup)
    drawn = build(setup, target_window=5, target_window_until=1000, target_window_mode="draw", seed=2)
    catalog = encoder.catalog_positions(sequences.items)
    assert len(drawn) == len(one) and drawn.window_weight is None
    assert np.array_equal(drawn.user_row, one.user_row) and torch.equal(drawn.position, one.position)
    ahead = []
    for row, position, target in zip(
        drawn.user_row, drawn.position.tolist(), drawn.target.tolist(), strict=True
    ):
        start = sequences.offsets[row] + position
        window = catalog[start : min(start + 5, sequences.offsets[row + 1])].tolist()
        assert target in window
        ahead.append(window.index(target))
    # Uniform over the window: each of the next five actions is drawn about as often (the prefixes
    # near a sequence's end have fewer).
    counts = np.bincount(ahead, minlength=5)
    assert counts.min() > 0.6 * len(drawn) / 5 and counts.max() < 1.6 * len(drawn) / 5
    again = build(setup, target_window=5, target_window_until=1000, target_window_mode="draw", seed=2)
    other = build(setup, target_window=5, target_window_until=1000, target_window_mode="draw", seed=3)
    assert torch.equal(again.target, drawn.target) and not torch.equal(other.target, drawn.target)


def test_a_training_that_asks_for_other_samples_than_its_context_holds_stops() -> None:
    """A target window asked of the training but not of the context's samples would train on samples
    without it, silently (bench/model_choices.py once did): training refuses instead."""
    data = generate_synthetic(n_users=40, n_items=50, seed=5)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig(max_history=8))
    built_with = TrainConfig(epochs=1, batch_size=64, target_window=1)
    context = TrainingContext.build(data, split, encoder, built_with)
    windowed = built_with.model_copy(update={"target_window": 10})
    with pytest.raises(ValueError, match=r"target_window 1 \(asked: 10\)"):
        fit_cold_warm_net(context, ModelConfig(), windowed, progress=False)
    # Another seed, another epoch count: the same samples; a training that asks for them runs.
    context.check_samples_for(built_with.model_copy(update={"seed": 3, "epochs": 2}))


def test_the_mutual_information_sample_draws_a_prefix_s_copies_as_one_sample(setup: tuple) -> None:
    """Under prefix weights the copies of a prefix share one sample's chance of being a positive, and
    a negative is a user's prefix drawn uniformly, copies or not: the bias features are chosen on what
    the loss weighs, not on how many targets a window holds."""
    window = build(setup, target_window=6, target_window_until=6)
    prefixes = targets_by_prefix(window)
    short_share_of_prefixes = sum(position < 6 for _, position in prefixes) / len(prefixes)
    short_share_of_samples = float((window.position < 6).float().mean())
    assert short_share_of_samples > short_share_of_prefixes + 0.1  # the copies would tilt a plain draw
    positives, negatives = behaviour_rows(window, len(window) // 5, np.random.default_rng(0))
    for rows in (positives, negatives):
        share = float((window.position[rows] < 6).float().mean())
        assert abs(share - short_share_of_prefixes) < 0.04, (share, short_share_of_prefixes)
    # A negative is the first of its prefix's copies.
    previous = np.maximum(negatives - 1, 0)
    assert np.all(
        (negatives == 0)
        | (window.user_row[previous] != window.user_row[negatives])
        | (window.position[previous] != window.position[negatives]).numpy()
    )
