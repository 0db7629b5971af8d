"""The user split of the evaluation protocol (shared/DESIGN.md), exactly: test users are never trained on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.data.schema import InteractionData


@dataclass(frozen=True)
class UserSplit:
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def split_users(
    data: InteractionData, seed: int = 0, train_fraction: float = 0.8, validation_fraction: float = 0.1
) -> UserSplit:
    """Sorted unique user ids shuffled by default_rng(seed): first 80% train, next 10% validation, rest test.

    Boundaries are rounded, not truncated: with 2,999 users truncation gives 2399/299/301, while the
    reference figures in DESIGN.md (test points per group) come from 2399/300/300.
    """
    users = np.unique(data.interactions["user_id"].to_numpy(np.int64))
    np.random.default_rng(seed).shuffle(users)
    train_end = round(len(users) * train_fraction)
    validation_end = round(len(users) * (train_fraction + validation_fraction))
    return UserSplit(
        train=users[:train_end],
        validation=users[train_end:validation_end],
        test=users[validation_end:],
    )
