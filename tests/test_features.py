"""FeatureEncoder and prefix samples: vocabularies, cold users, history compaction, state buckets,
point-in-time correctness (nothing after t), persistence, and train-only fitting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from model.data.schema import InteractionData, make_interaction_data
from model.data.split import split_users
from model.data.synthetic import generate_synthetic
from model.evaluation.protocol import build_eval_points
from model.features import (
    MISSING,
    OOV,
    FeatureEncoder,
    RawUsers,
    Vocabulary,
    profile_arrays,
    raw_users_from_histories,
    zip_prefixes,
)
from model.ranker import encode_points
from model.samples import UserSequences, build_training_samples
from model.settings import FeatureConfig

DAY = 86_400
T0 = 1_000_000_000
# User 1's interactions (item, seconds after T0); catalog = items 10..60 (60 never interacted with).
USER1 = [(10, 0), (20, 1800), (30, 2 * DAY), (40, 2 * DAY + 7200), (50, 20 * DAY)]
USER2 = [(20, 5 * DAY), (10, 6 * DAY)]
CATALOG = [10, 20, 30, 40, 50, 60]  # history code = catalog position + 1, so item 10k → k
PROFILES = pd.DataFrame(
    {
        "user_id": [1, 2, 3],
        "gender": ["F", "M", "X"],
        "age": ["25", "35", "99"],
        "occupation": ["3", "7", "42"],
        "zip_code": ["12345", "98765", "55555"],
    }
)


def tiny_data(
    user1: list[tuple[int, int]] = USER1, user3: list[tuple[int, int]] | None = None
) -> InteractionData:
    rows = [(1, item, T0 + t) for item, t in user1] + [(2, item, T0 + t) for item, t in USER2]
    rows += [(3, item, T0 + t) for item, t in (user3 or [])]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame(
        {"item_id": CATALOG, "genres": ["Drama"] * len(CATALOG), "year": [1995] * len(CATALOG)}
    )
    return make_interaction_data(frame, PROFILES, items, name="tiny")


def tiny_encoder(data: InteractionData, max_history: int = 3) -> FeatureEncoder:
    return FeatureEncoder.fit(data, np.array([1, 2]), FeatureConfig(max_history=max_history))


def raw(
    history: list[list[int]], count: list[int], first: list[int], last: list[int], now: list[int]
) -> RawUsers:
    return RawUsers(
        profiles={},
        history=np.array(history, dtype=np.int64),
        interaction_count=np.array(count),
        first_timestamp=np.array(first),
        last_timestamp=np.array(last),
        now=np.array(now),
    )


# ----- vocabularies ----------------------------------------------------------------------------------


def test_vocabulary_known_values_start_at_two_unseen_is_oov_and_empty_is_missing() -> None:
    vocab = Vocabulary.fit(["b", "a", "a", "", "c"])
    assert vocab.values == ["a", "b", "c"]
    assert len(vocab) == 5  # missing and OOV included
    np.testing.assert_array_equal(vocab.encode(["a", "b", "c", "zzz", ""]), [2, 3, 4, OOV, MISSING])
    assert (OOV, MISSING) == (1, 0)


def test_profile_encoding_of_unseen_and_missing_values() -> None:
    encoder = tiny_encoder(tiny_data())
    profiles = {
        "gender": np.array(["F", "M", "X", ""], dtype=object),
        "age": np.array(["25", "35", "99", ""], dtype=object),
        "occupation": np.array(["3", "7", "42", ""], dtype=object),
        "zip_code": np.array(["12999", "98000", "55555", ""], dtype=object),
    }
    encoded = encoder.encode_profiles(profiles, 4)
    # Vocabularies are sorted values of the train users 1 (F/25/3/12) and 2 (M/35/7/98).
    np.testing.assert_array_equal(encoded, [[2, 2, 2, 2], [3, 3, 3, 3], [1, 1, 1, 1], [0, 0, 0, 0]])
    # A field absent altogether is missing for everyone.
    np.testing.assert_array_equal(encoder.encode_profiles({}, 2), np.zeros((2, 4), dtype=np.int64))


def test_unknown_user_gets_an_empty_profile() -> None:
    data = tiny_data()
    profiles = profile_arrays(data.users, np.array([1, 999]))
    assert [profiles[f][1] for f in ("gender", "age", "occupation", "zip_code")] == ["", "", "", ""]
    assert profiles["gender"][0] == "F"
    encoded = tiny_encoder(data).encode_profiles(profiles, 2)
    np.testing.assert_array_equal(encoded, [[2, 2, 2, 2], [0, 0, 0, 0]])


# ----- cold users, history ---------------------------------------------------------------------------


def test_empty_history_is_a_cold_user() -> None:
    encoder = tiny_encoder(tiny_data())
    users = raw_users_from_histories(
        profile_arrays(tiny_data().users, np.array([1, 1])),
        [np.array([], dtype=np.int64), np.array([10])],
        [np.array([], dtype=np.int64), np.array([T0])],
        np.array([T0 + 10 * DAY, T0 + 10 * DAY]),
        max_history=3,
    )
    np.testing.assert_array_equal(users.history[0], [-1, -1, -1])
    assert users.interaction_count[0] == 0
    encoded = encoder.encode_users(users)
    np.testing.assert_array_equal(encoded.history[0], [0, 0, 0])
    # Count 0 is the first bucket [0, 1); days since first/last are missing (0) without interactions,
    # whatever the (zero) timestamps say.
    np.testing.assert_array_equal(encoded.state[0], [1, MISSING, MISSING])
    # One interaction 10 days ago, for contrast: count bucket [1, 2) and 10 days in [7, 14).
    np.testing.assert_array_equal(encoded.history[1], [1, 0, 0])
    np.testing.assert_array_equal(encoded.state[1], [2, 5, 5])


def test_unknown_items_are_dropped_and_the_rest_compacted_newest_first() -> None:
    encoder = tiny_encoder(tiny_data(), max_history=5)
    # Newest first: 30, unknown 99, padding, 10, unknown 77; 60 is in the catalog (item table) only.
    history = np.array([[30, 99, -1, 10, 77], [99, 98, 97, 60, -1], [-1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(
        encoder.encode_history(history), [[3, 1, 0, 0, 0], [6, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    )


def test_history_is_capped_at_max_history_keeping_the_newest() -> None:
    encoder = tiny_encoder(tiny_data(), max_history=3)
    # Wider raw history than max_history: only the 3 newest (leftmost) survive.
    np.testing.assert_array_equal(encoder.encode_history(np.array([[50, 40, 30, 20, 10]])), [[5, 4, 3]])
    # Narrower raw history than max_history is padded to max_history.
    np.testing.assert_array_equal(encoder.encode_history(np.array([[20]])), [[2, 0, 0]])
    # raw_users_from_histories keeps the newest max_history items but counts every interaction.
    users = raw_users_from_histories(
        {}, [np.array([10, 20, 30, 40, 50])], [np.arange(5) + T0], np.array([T0 + 9]), max_history=3
    )
    np.testing.assert_array_equal(users.history, [[50, 40, 30]])
    assert users.interaction_count[0] == 5
    assert (users.first_timestamp[0], users.last_timestamp[0]) == (T0, T0 + 4)


def test_state_buckets_at_hand_computed_values() -> None:
    encoder = tiny_encoder(tiny_data())
    now = T0 + 400 * DAY
    # count_bounds (0, 1, 2, 3, 5, 10, ..., 1000) and days_bounds (0, 1/24, 1, 3, 7, 14, 30, 90, 180,
    # 365, 730): bucket 1 + i for bounds[i] <= v < bounds[i + 1], a value on a bound goes up.
    users = raw(
        history=[[-1], [-1], [-1], [-1], [-1]],
        count=[4, 5, 1000, 5000, 2],
        first=[now - DAY, now - 3 * DAY + 1, now - 800 * DAY, now, now - 400 * DAY],
        last=[now - 1800, now - 3600, now - 7 * DAY, now + 60, now - 100 * DAY],
        now=[now] * 5,
    )
    state = encoder.encode_state(users)
    expected = [
        [4, 3, 1],  # 3<=4<5; exactly 1 day → [1, 3); 30 min → [0, 1/24)
        [5, 3, 2],  # 5 on a bound → [5, 10); just under 3 days → [1, 3); exactly 1 hour → [1/24, 1)
        [13, 11, 5],  # 1000 → last bucket; 800 days ≥ 730 → last bucket; 7 days → [7, 14)
        [13, 1, 1],  # beyond the last bound; "now" = first → 0 days; a last event after now clips to 0
        [3, 10, 8],  # 2 → [2, 3); 400 days in [365, 730); 100 days in [90, 180)
    ]
    np.testing.assert_array_equal(state, expected)
    assert encoder.state_cardinalities() == (14, 12, 12)
    assert state[:, 0].max() < 14 and state[:, 1:].max() < 12


# ----- prefix samples: point-in-time correctness ------------------------------------------------------


def samples_of(data: InteractionData, encoder: FeatureEncoder, users: list[int]):
    sequences = UserSequences.from_interactions(data.interactions, np.array(users))
    return sequences, build_training_samples(data.users, sequences, encoder)


def test_prefix_sample_t_sees_only_items_before_t() -> None:
    data = tiny_data()
    encoder = tiny_encoder(data, max_history=3)
    _, samples = samples_of(data, encoder, [1, 2])
    assert len(samples) == 7
    np.testing.assert_array_equal(samples.user_row, [0, 0, 0, 0, 0, 1, 1])
    # User 1, by hand (history codes: item 10k → k, newest first, 3 at most).
    np.testing.assert_array_equal(
        samples.history[:5].numpy(), [[0, 0, 0], [1, 0, 0], [2, 1, 0], [3, 2, 1], [4, 3, 2]]
    )
    np.testing.assert_array_equal(
        samples.state[:5].numpy(),
        [
            [1, 0, 0],  # t=0: no interactions yet
            [2, 1, 1],  # t=1: 1 item; 30 min since first and last
            [3, 3, 3],  # t=2: 2 items; 2 days since first, 1.98 days since last
            [4, 3, 2],  # t=3: 3 items; 2.08 days since first, 2 hours since last
            [4, 6, 6],  # t=4: 4 items in [3, 5); 20 days since first, 17.9 since last: [14, 30)
        ],
    )
    np.testing.assert_array_equal(samples.target[:5].numpy(), [0, 1, 2, 3, 4])  # catalog positions
    np.testing.assert_array_equal(samples.profile[:5].numpy(), np.tile([2, 2, 2, 2], (5, 1)))
    # User 2: items 20 then 10, one day apart.
    np.testing.assert_array_equal(samples.history[5:].numpy(), [[0, 0, 0], [2, 0, 0]])
    np.testing.assert_array_equal(samples.state[5:].numpy(), [[1, 0, 0], [2, 3, 3]])
    np.testing.assert_array_equal(samples.target[5:].numpy(), [1, 0])


def test_changing_interactions_after_t_does_not_change_sample_t() -> None:
    data = tiny_data()
    encoder = tiny_encoder(data)
    _, before = samples_of(data, encoder, [1, 2])
    # Same first three interactions of user 1, then different items, times and an extra interaction.
    changed = tiny_data(user1=[*USER1[:3], (60, 2 * DAY + 5), (10, 3 * DAY), (20, 900 * DAY)])
    _, after = samples_of(changed, encoder, [1, 2])
    assert len(after) == 8
    for name in ("profile", "history", "state", "target"):
        np.testing.assert_array_equal(getattr(after, name)[:3].numpy(), getattr(before, name)[:3].numpy())
        # User 2's samples are untouched too.
        np.testing.assert_array_equal(getattr(after, name)[-2:].numpy(), getattr(before, name)[-2:].numpy())
    # ... while sample 3 itself sees the changed interaction 3 only as its target, not in its features.
    np.testing.assert_array_equal(after.history[3].numpy(), before.history[3].numpy())
    assert after.target[3] == 5 and before.target[3] == 3
    # Its state is as of its own (changed) timestamp: 2 days + 5 s since first, 5 s since last.
    np.testing.assert_array_equal(after.state[3].numpy(), [4, 3, 1])


def test_training_prefix_equals_evaluation_encoding_of_the_same_moment() -> None:
    """Train/serve skew guard: sample t of a user = that user's eval point with h = t."""
    data = generate_synthetic(n_users=40, n_items=60, seed=11)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig(max_history=8))
    users = split.train[:6]
    sequences, samples = samples_of(data, encoder, list(users))
    points = build_eval_points(data, sequences.user_ids, history_lengths=(0, 1, 3, 5, 10, 20), n_targets=1)
    assert len(points) > 20
    encoded = encode_points(points, data.users, encoder)
    row_of_user = {int(u): i for i, u in enumerate(sequences.user_ids)}
    for i, point in enumerate(points):
        index = int(sequences.offsets[row_of_user[point.user_id]]) + point.h
        np.testing.assert_array_equal(samples.history[index].numpy(), encoded.history[i])
        np.testing.assert_array_equal(samples.state[index].numpy(), encoded.state[i])
        np.testing.assert_array_equal(samples.profile[index].numpy(), encoded.profile[i])


# ----- persistence and train-only fitting -----------------------------------------------------------


def test_encoder_save_load_round_trip(tmp_path) -> None:
    data = generate_synthetic(n_users=80, n_items=50, seed=2)
    split = split_users(data)
    config = FeatureConfig(max_history=7, zip_prefix_length=3)
    encoder = FeatureEncoder.fit(data, split.train, config)
    encoder.save(tmp_path / "features.json")
    loaded = FeatureEncoder.load(tmp_path / "features.json")
    assert loaded.config == config
    assert loaded.to_dict() == encoder.to_dict()

    # Every user, including non-train ones (OOV values) and an unknown user (empty profile).
    user_ids = np.append(data.users["user_id"].to_numpy(), 10_000)
    histories = [
        data.interactions.loc[data.interactions.user_id == u, "item_id"].to_numpy()[:9] for u in user_ids
    ]
    stamps = [
        data.interactions.loc[data.interactions.user_id == u, "timestamp"].to_numpy()[:9] for u in user_ids
    ]
    users = raw_users_from_histories(
        profile_arrays(data.users, user_ids), histories, stamps, np.full(len(user_ids), 2_000_000_000), 7
    )
    a, b = encoder.encode_users(users), loaded.encode_users(users)
    for name in ("profile", "history", "state"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.profile[-1].tolist() == [0, 0, 0, 0]
    fa, fb = encoder.item_features(), loaded.item_features()
    for name in ("id_index", "genres", "year", "popularity"):
        np.testing.assert_array_equal(getattr(fa, name), getattr(fb, name))


def test_vocabularies_hold_train_users_values_only() -> None:
    # User 3 (gender X, age 99, occupation 42, zip 55..., item 60) is not a train user.
    data = tiny_data(user3=[(60, 0), (10, 60)])
    encoder = tiny_encoder(data)
    vocab = encoder.vocabularies
    assert vocab["gender"].values == ["F", "M"]
    assert vocab["age"].values == ["25", "35"]
    assert vocab["occupation"].values == ["3", "7"]
    assert vocab["zip_prefix"].values == ["12", "98"]
    assert vocab["item_id"].values == ["10", "20", "30", "40", "50"]
    # Item 60 stays in the catalog (servable) but with the OOV id and zero train popularity.
    np.testing.assert_array_equal(encoder.catalog_item_ids, CATALOG)
    np.testing.assert_array_equal(encoder.item_popularity, [2, 2, 1, 1, 1, 0])
    features = encoder.item_features()
    assert features.id_index[-1] == OOV
    assert features.popularity[-1] == 1  # 0 interactions: first bucket [0, 1)
    profile = encoder.encode_profiles(profile_arrays(data.users, np.array([3])), 1)
    np.testing.assert_array_equal(profile, [[OOV, OOV, OOV, OOV]])


def test_vocabularies_on_synthetic_split_exclude_non_train_values() -> None:
    data = generate_synthetic(n_users=120, n_items=80, seed=4)
    split = split_users(data)
    encoder = FeatureEncoder.fit(data, split.train, FeatureConfig())
    train_users = data.users[data.users.user_id.isin(split.train)]
    other_users = data.users[~data.users.user_id.isin(split.train)]
    train_zips = set(zip_prefixes(train_users.zip_code.to_numpy(), 2))
    assert set(encoder.vocabularies["zip_prefix"].values) == train_zips
    only_other = set(zip_prefixes(other_users.zip_code.to_numpy(), 2)) - train_zips
    assert only_other, "the split should leave some zip prefixes to non-train users"
    assert not only_other & set(encoder.vocabularies["zip_prefix"].values)
    inter = data.interactions
    train_items = set(inter.loc[inter.user_id.isin(split.train), "item_id"].astype(str))
    assert set(encoder.vocabularies["item_id"].values) == train_items
    counts = inter[inter.user_id.isin(split.train)].item_id.value_counts()
    np.testing.assert_array_equal(
        encoder.item_popularity, counts.reindex(encoder.catalog_item_ids).fillna(0).to_numpy()
    )


@pytest.mark.parametrize("length", [0, 1, 5])
def test_zip_prefix_length(length: int) -> None:
    assert zip_prefixes(np.array(["12345", "9"], dtype=object), length).tolist() == [
        "12345"[:length] if length else "",
        "9"[:length] if length else "",
    ]
