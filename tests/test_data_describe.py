"""model/data/describe.py: the share of users' early action pairs tied in time, and the advice it gives."""

from __future__ import annotations

import numpy as np
import pandas as pd

from model.data.describe import BATCHED_START_SETTINGS, describe, early_tie_share, training_advice
from model.data.schema import InteractionData, normalise_interactions
from model.data.synthetic import generate_synthetic


def test_early_tie_share_counts_pairs_within_each_users_first_actions() -> None:
    users = np.array([1, 1, 1, 1, 2, 2, 2])
    times = np.array([5, 5, 6, 6, 5, 7, 7])
    # first=3: user 1 pairs (0,1) tied, (1,2) not; user 2 pairs (0,1) not, (1,2) tied -> 2 of 4.
    assert early_tie_share(users, times, first=3) == 0.5
    # first=10: user 1 adds (2,3) tied -> 3 of 5; a user's first action never pairs with the last user's.
    assert early_tie_share(users, times) == 0.6
    assert early_tie_share(np.array([1, 2]), np.array([3, 3])) == 0.0


def test_pairs_beyond_the_first_actions_are_not_counted() -> None:
    users = np.ones(15, dtype=np.int64)
    times = np.r_[np.arange(10), np.full(5, 99)]  # ordered start, then a tied batch at positions 10-14
    assert early_tie_share(users, times) == 0.0
    assert early_tie_share(users, times, first=15) == 4 / 14


def batched_start_data() -> InteractionData:
    """Every user rates their first four items in one second, then one a day."""
    rows = [
        (user, item, 1_000 if position < 4 else 1_000 + 86_400 * position)
        for user in range(1, 6)
        for position, item in enumerate(range(user, user + 8))
    ]
    table = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    no_items = pd.DataFrame({"item_id": []})
    return InteractionData(normalise_interactions(table), pd.DataFrame(), no_items, "batched")


def test_describe_tells_batched_starts_from_ordered_ones() -> None:
    batched = describe(batched_start_data())
    assert (batched.users, batched.interactions) == (5, 40)
    assert batched.early_tie_share == 3 / 7  # pairs (0,1), (1,2), (2,3) of the seven among eight actions
    assert batched.batched_start
    assert BATCHED_START_SETTINGS in training_advice(batched)

    ordered = describe(generate_synthetic(n_users=60, n_items=100))
    assert ordered.early_tie_share == 0.0
    assert not ordered.batched_start
    assert "COLDWARM_TRAIN__TARGET_WINDOW" not in training_advice(ordered)
    quantiles = ordered.history_quantiles
    assert quantiles["p10"] <= quantiles["p50"] <= quantiles["p90"]
