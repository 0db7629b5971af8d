"""Training samples that gather their histories per batch (model/samples.py) give exactly the batches
of the eager builder that stored every history (bench/_eager_samples.py, the code before issue 12)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.data.schema import InteractionData
from model.data.split import split_users
from model.data.synthetic import generate_synthetic
from model.features import FeatureEncoder
from model.samples import (
    TrainingSamples,
    UserSequences,
    build_training_samples,
    history_balance_weights,
    history_lengths,
)
from model.settings import FeatureConfig, TrainConfig
from model.train import TrainingContext

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/ is not a package
from _eager_samples import (  # noqa: E402
    EagerSamples,
    build_eager_training_samples,
    eager_training_context,
)

# Next action only: the eager reference (bench/_eager_samples.py) predates target windows.
SESSION_STARTS = TrainConfig(seed=3, session_start_share=0.5, target_window=1)


def both_ways(
    data: InteractionData, encoder: FeatureEncoder, users: np.ndarray, config: TrainConfig | None
) -> tuple[TrainingSamples, EagerSamples]:
    sequences = UserSequences.from_interactions(data.interactions, users)
    return (
        build_training_samples(data.users, sequences, encoder, config, chunk_size=300),
        build_eager_training_samples(data.users, sequences, encoder, config, chunk_size=300),
    )


def assert_same_batches(lazy: TrainingSamples | EagerSamples, eager: EagerSamples, seed: int) -> None:
    assert len(lazy) == len(eager) > 0
    np.testing.assert_array_equal(lazy.user_row, eager.user_row)
    generator = torch.Generator().manual_seed(seed)
    indices = [torch.randint(0, len(eager), (size,), generator=generator) for size in (1, 7, 64, 513)]
    for index in [*indices, torch.arange(len(eager))]:
        for got, expected in zip(lazy.batch(index), eager.batch(index), strict=True):
            assert got.dtype == expected.dtype == torch.long
            assert torch.equal(got, expected)


@pytest.mark.parametrize("max_history", [1, 5, 50, 200])
def test_lazy_batches_equal_the_eager_ones(max_history: int) -> None:
    data = generate_synthetic(n_users=60, n_items=90, seed=4)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig(max_history=max_history))
    lazy, eager = both_ways(data, encoder, split.train, SESSION_STARTS)
    assert_same_batches(lazy, eager, seed=max_history)
    assert torch.equal(lazy.history_lengths(), history_lengths(eager.history))
    assert torch.equal(lazy.history, eager.history.long())
    assert torch.equal(lazy.profile, eager.profile)


def test_items_outside_the_catalog_are_dropped_from_the_gathered_histories_as_encoding_drops_them() -> None:
    """Sequences with items the encoder does not know (fitted on a smaller catalog): holes in the
    history windows, and samples whose target is unknown, are handled as the encoder does."""
    known = generate_synthetic(n_users=40, n_items=50, seed=1)
    data = generate_synthetic(n_users=40, n_items=80, seed=2)
    encoder = FeatureEncoder.fit(known, split_users(known).train, FeatureConfig(max_history=8))
    users = np.unique(data.interactions["user_id"].to_numpy())
    lazy, eager = both_ways(data, encoder, users, None)
    assert len(lazy) < len(data.interactions)  # unknown targets are no samples
    # Some windows have an unknown item before (newer than) a known one: the compaction has work.
    sequences = UserSequences.from_interactions(data.interactions, users)
    codes = encoder.history_codes(sequences.items)
    position = lazy.position.numpy()[:, None]
    back = np.arange(8)[None, :]
    flat = np.clip(sequences.offsets[lazy.user_row][:, None] + position - 1 - back, 0, None)
    window = np.where(back < position, codes[flat], -1)
    assert ((window[:, :-1] == 0) & (window[:, 1:] > 0)).any()
    assert_same_batches(lazy, eager, seed=0)
    assert torch.equal(lazy.history_lengths(), history_lengths(eager.history))


def test_history_balance_weights_are_the_eager_ones() -> None:
    data = generate_synthetic(n_users=50, n_items=70, seed=6)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig(max_history=6))
    lazy, eager = both_ways(data, encoder, split.train, SESSION_STARTS)
    lengths = history_lengths(eager.history)
    counts = torch.bincount(lengths).double()
    expected = (counts[lengths] / len(lengths)).pow(-0.5)
    torch.testing.assert_close(history_balance_weights(lazy, 0.5), (expected / expected.mean()).float())


def test_training_context_samples_equal_the_eager_context() -> None:
    """Through ``TrainingContext.build``: state coverage fitted and served on the compact codes gives
    the eager context's int64 codes."""
    data = generate_synthetic(n_users=80, n_items=60, seed=9)
    split = split_users(data)
    features = FeatureConfig(max_history=12, min_state_samples=40)  # some buckets served as others
    lazy = TrainingContext.build(data, split, FeatureEncoder.fit(data, split.train, features), SESSION_STARTS)
    eager = eager_training_context(
        data, split, FeatureEncoder.fit(data, split.train, features), SESSION_STARTS
    )
    assert lazy.encoder.remapped_state_buckets() == eager.encoder.remapped_state_buckets() != {}
    assert lazy.samples.state.dtype == torch.int8
    assert_same_batches(lazy.samples, eager.samples, seed=1)


def test_samples_store_no_per_sample_history() -> None:
    """What the samples hold grows with the interactions, not with samples x max_history."""
    data = generate_synthetic(n_users=100, n_items=200, seed=3)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig(max_history=50))
    sequences = UserSequences.from_interactions(data.interactions, split.train)
    samples = build_training_samples(data.users, sequences, encoder)
    stored = sum(
        value.nbytes for value in vars(samples).values() if isinstance(value, (torch.Tensor, np.ndarray))
    )
    assert stored / len(samples) < 40  # bytes per sample; a stored history alone is 4 * 50
