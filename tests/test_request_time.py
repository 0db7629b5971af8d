"""Request times in training and state coverage: a returning user is not mistaken for a new one.

Training asks a share of its samples at the start of a later session (the last action + a pause of
hours to years), and every state bucket that training did not reach is served as the nearest one that
it did. Checked here: the drawn request times, the bucket map, and, on a real training run, that every
state value the service can compute lands on a gate embedding row that training updated.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.data.split import split_users
from model.data.synthetic import generate_synthetic
from model.features import SECONDS_PER_DAY, STATE_COLUMNS, FeatureEncoder, RawUsers, nearest_trained_bucket
from model.nn.cold_warm_net import ColdWarmNet
from model.samples import UserSequences, build_training_samples, session_start_gaps, session_start_times
from model.settings import FeatureConfig, ModelConfig, TrainConfig
from model.train import TrainingContext, run_epochs

NOW = 1_700_000_000
TINY_MODEL = ModelConfig(
    embedding_dim=8, hidden_dim=16, feature_dim=4, n_user_groups=2, use_group_attention=False
)


# ----- the bucket map --------------------------------------------------------------------------------


def test_rare_buckets_are_served_as_the_nearest_trained_one() -> None:
    # bucket:            0   1    2   3    4  5   6
    counts = np.array([500, 300, 20, 0, 150, 0, 0])
    served = nearest_trained_bucket(counts, min_samples=100)
    # 2 is nearer to 1 than to 4; 3 is as near to 4 as to ... 4 only (2 is not trained): 4; 5, 6 → 4.
    np.testing.assert_array_equal(served, [0, 1, 1, 4, 4, 4, 4])


def test_a_tie_goes_to_the_lower_bucket_and_missing_stays_apart() -> None:
    counts = np.array([0, 200, 0, 200])
    # Bucket 0 (no action yet) has no samples but is never served as an on-scale bucket, nor the reverse.
    np.testing.assert_array_equal(nearest_trained_bucket(counts, 100), [0, 1, 1, 3])
    np.testing.assert_array_equal(nearest_trained_bucket(np.array([900, 0, 0]), 100), [0, 1, 2])


def test_min_samples_zero_serves_every_bucket_as_itself() -> None:
    np.testing.assert_array_equal(nearest_trained_bucket(np.array([0, 0, 5, 0]), 0), [0, 1, 2, 3])


def test_the_map_survives_saving_and_an_old_encoder_serves_buckets_as_themselves() -> None:
    data = generate_synthetic(n_users=120, n_items=50, seed=3)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig(min_state_samples=2))
    encoder.fit_state_coverage(np.array([[1, 1, 1], [5, 2, 2], [5, 2, 2]]))
    # Only count bucket 5 and days bucket 2 have two samples: every other on-scale bucket is served so.
    assert encoder.remapped_state_buckets()["interaction_count"] == {b: 5 for b in range(1, 14) if b != 5}
    np.testing.assert_array_equal(encoder.state_buckets[1], [0] + [2] * 11)
    loaded = FeatureEncoder.from_dict(encoder.to_dict())
    for ours, theirs in zip(encoder.state_buckets, loaded.state_buckets, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    old = encoder.to_dict()
    del old["state_buckets"]
    assert FeatureEncoder.from_dict(old).remapped_state_buckets() == {}


# ----- request times of training samples ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sequences() -> UserSequences:
    data = generate_synthetic(n_users=200, n_items=80, seed=7)
    return UserSequences.from_interactions(data.interactions, split_users(data).train)


def sample_rows(sequences: UserSequences) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = sequences.lengths()
    user_rows = np.repeat(np.arange(len(lengths)), lengths)
    positions = np.arange(len(user_rows)) - sequences.offsets[user_rows]
    targets_time = sequences.timestamps[sequences.offsets[user_rows] + positions]
    return user_rows, positions, targets_time


def test_without_session_starts_every_sample_is_asked_at_its_target_time(sequences: UserSequences) -> None:
    user_rows, positions, target_time = sample_rows(sequences)
    config = TrainConfig(session_start_share=0.0)
    now = session_start_times(sequences, user_rows, positions, config, np.random.default_rng(0))
    np.testing.assert_array_equal(now, target_time)


def test_session_starts_come_after_a_pause_from_the_data_or_the_long_tail(sequences: UserSequences) -> None:
    user_rows, positions, target_time = sample_rows(sequences)
    last_time = sequences.timestamps[np.maximum(sequences.offsets[user_rows] + positions - 1, 0)]
    config = TrainConfig(session_start_share=0.5, long_gap_share=0.5, session_gap_s=1800, max_gap_days=3650)
    now = session_start_times(sequences, user_rows, positions, config, np.random.default_rng(0))
    moved = now != target_time
    # A user's first sample has no last action to pause after: always asked at its target's time.
    assert not moved[positions == 0].any()
    share = moved[positions > 0].mean()
    assert 0.45 < share < 0.55, share
    pauses = now[moved] - last_time[moved]
    assert pauses.min() >= 1800 and pauses.max() <= 3650 * SECONDS_PER_DAY
    # The tail reaches pauses far longer than any in this data (whose pauses stop at a year) ...
    data_gaps = session_start_gaps(sequences, 1800)
    assert data_gaps.max() <= 366 * SECONDS_PER_DAY
    # log-uniform over 30 min..10 years: ln(10)/ln(175,200) = 19% of the tail is over a year
    assert (pauses > data_gaps.max()).mean() > 0.05
    # ... and the other half are pauses the data itself holds.
    from_data = np.isin(pauses, data_gaps.round().astype(np.int64))
    assert 0.4 < from_data.mean() < 0.6, from_data.mean()


def test_only_data_gaps_when_the_tail_is_off(sequences: UserSequences) -> None:
    user_rows, positions, _ = sample_rows(sequences)
    last_time = sequences.timestamps[np.maximum(sequences.offsets[user_rows] + positions - 1, 0)]
    config = TrainConfig(session_start_share=1.0, long_gap_share=0.0)
    now = session_start_times(sequences, user_rows, positions, config, np.random.default_rng(1))
    has_history = positions > 0
    pauses = now[has_history] - last_time[has_history]
    data_gaps = session_start_gaps(sequences, config.session_gap_s).round().astype(np.int64)
    assert np.isin(pauses, data_gaps).all()


def test_short_histories_stay_at_their_target_time_below_session_start_from(sequences: UserSequences) -> None:
    user_rows, positions, target_time = sample_rows(sequences)
    config = TrainConfig(session_start_share=1.0, session_start_from=10)
    now = session_start_times(sequences, user_rows, positions, config, np.random.default_rng(2))
    np.testing.assert_array_equal(now[positions < 10], target_time[positions < 10])
    assert (now[positions >= 10] != target_time[positions >= 10]).mean() > 0.99


def test_samples_are_reproducible_per_seed(sequences: UserSequences) -> None:
    data = generate_synthetic(n_users=200, n_items=80, seed=7)
    encoder = FeatureEncoder.fit(data, split_users(data).train, FeatureConfig())
    one = build_training_samples(data.users, sequences, encoder, TrainConfig(seed=3))
    two = build_training_samples(data.users, sequences, encoder, TrainConfig(seed=3))
    other = build_training_samples(data.users, sequences, encoder, TrainConfig(seed=4))
    assert torch.equal(one.state, two.state)
    assert not torch.equal(one.state, other.state)


# ----- every reachable state value lands on a trained embedding -----------------------------------------


def reachable_state_users(config: FeatureConfig) -> RawUsers:
    """Users whose state features take every value the service can compute: each column swept over
    values on, just below and just above every bound, and far beyond the last, the others fixed."""
    count_values = sorted({0, 1, 10**7} | {max(b + d, 0) for b in config.count_bounds for d in (-1, 0, 1)})
    day_values = sorted(
        {-1.0, 0.0, 40 * 365.0} | {max(b * f, 0.0) for b in config.days_bounds for f in (0.999, 1.0, 1.001)}
    )
    counts, firsts, lasts = [], [], []
    for count in count_values:  # the account as old as its last action: 2 days
        counts.append(count)
        firsts.append(NOW - 2 * SECONDS_PER_DAY)
        lasts.append(NOW - 2 * SECONDS_PER_DAY)
    for days in day_values:  # sweep days since first, last action an hour ago
        counts.append(20)
        firsts.append(NOW - days * SECONDS_PER_DAY)
        lasts.append(NOW - min(days, 1 / 24) * SECONDS_PER_DAY)
    for days in day_values:  # sweep days since last (a negative one: an event stamped after now)
        counts.append(20)
        firsts.append(NOW - (days + 1) * SECONDS_PER_DAY)
        lasts.append(NOW - days * SECONDS_PER_DAY)
    n = len(counts)
    return RawUsers(
        profiles={},
        history=np.full((n, 1), -1, dtype=np.int64),
        interaction_count=np.array(counts, dtype=np.int64),
        first_timestamp=np.array(firsts, dtype=np.int64),
        last_timestamp=np.array(lasts, dtype=np.int64),
        now=np.full(n, NOW, dtype=np.int64),
    )


def gate_tables(net: ColdWarmNet) -> list[torch.Tensor]:
    return [table.weight.detach().clone() for table in net.user_tower.gate.embeddings.tables]


def untrained_reachable_values(
    features: FeatureConfig, train: TrainConfig
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Per state column, the reachable buckets whose gate embedding row one epoch of training left
    untouched, and those with fewer than ``min_state_samples`` training samples."""
    data = generate_synthetic(n_users=300, n_items=100, seed=5)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, features)
    context = TrainingContext.build(data, split, encoder, train)
    torch.manual_seed(0)
    net = ColdWarmNet(encoder, TINY_MODEL)
    before = gate_tables(net)
    run_epochs(net, context, train, TINY_MODEL, 1, "coverage", validate=False, progress=False)
    after = gate_tables(net)
    reachable = encoder.encode_state(reachable_state_users(features))
    sample_counts = context.samples.state.numpy()
    untouched, rare = {}, {}
    for column, name in enumerate(STATE_COLUMNS):
        buckets = np.unique(reachable[:, column])
        untouched[name] = [int(b) for b in buckets if torch.equal(before[column][b], after[column][b])]
        counts = np.bincount(sample_counts[:, column], minlength=len(before[column]))
        rare[name] = [int(b) for b in buckets if counts[b] < max(features.min_state_samples, 1)]
    return untouched, rare


# weight_decay 0: Adam's decay would move every row, used or not, and hide an untrained one.
TRAIN = TrainConfig(batch_size=256, shared_negatives=64, weight_decay=0.0, seed=0)


def test_every_state_value_the_service_can_compute_lands_on_a_trained_embedding() -> None:
    untouched, rare = untrained_reachable_values(FeatureConfig(), TRAIN)
    assert untouched == {name: [] for name in STATE_COLUMNS}
    assert rare == {name: [] for name in STATE_COLUMNS}


def test_without_session_starts_and_coverage_long_pauses_land_on_untrained_embeddings() -> None:
    """The check above can fail: the former training (request time = next interaction, every bucket
    served as itself) leaves the rows of long pauses and of very active users untrained."""
    untouched, _ = untrained_reachable_values(
        FeatureConfig(min_state_samples=0), TRAIN.model_copy(update={"session_start_share": 0.0})
    )
    assert untouched["interaction_count"]  # more actions than any synthetic user has
    assert untouched["days_since_last"]  # synthetic sessions are minutes apart: no pause of a year
