"""Prefix training samples: for user u and position t, history = items before t, target = item t,
state as of item t's timestamp. Encoded once, through the same FeatureEncoder the service uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from model.features import EncodedUsers, FeatureEncoder, RawUsers, profile_arrays


@dataclass
class UserSequences:
    """Chronological interactions of some users, flattened with per-user offsets."""

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray

    @classmethod
    def from_interactions(cls, interactions: pd.DataFrame, user_ids: np.ndarray) -> UserSequences:
        rows = interactions[interactions["user_id"].isin(user_ids)]  # already (user, time, item) sorted
        users, counts = np.unique(rows["user_id"].to_numpy(np.int64), return_counts=True)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(users, offsets, rows["item_id"].to_numpy(np.int64), rows["timestamp"].to_numpy(np.int64))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def raw_prefixes(
    sequences: UserSequences,
    profiles: dict[str, np.ndarray],
    user_rows: np.ndarray,
    positions: np.ndarray,
    max_history: int,
) -> RawUsers:
    """Users ``user_rows`` as of their ``positions``-th interaction (that interaction not included)."""
    base = sequences.offsets[user_rows]
    back = np.arange(max_history)[None, :]
    flat = base[:, None] + positions[:, None] - 1 - back
    valid = back < positions[:, None]
    history = np.where(valid, sequences.items[np.clip(flat, 0, len(sequences.items) - 1)], -1)
    seen = positions > 0
    first = np.where(seen, sequences.timestamps[base], 0)
    last = np.where(seen, sequences.timestamps[np.maximum(base + positions - 1, 0)], 0)
    now = sequences.timestamps[base + positions]
    user_profiles = {field: values[user_rows] for field, values in profiles.items()}
    return RawUsers(user_profiles, history, positions.astype(np.int64), first, last, now)


@dataclass
class TrainingSamples:
    """Encoded user inputs and the catalog position of each sample's target item."""

    profile: torch.Tensor
    history: torch.Tensor
    state: torch.Tensor
    target: torch.Tensor
    user_row: np.ndarray

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.profile[index], self.history[index].long(), self.state[index], self.target[index])


def build_training_samples(
    data_users: pd.DataFrame, sequences: UserSequences, encoder: FeatureEncoder, chunk_size: int = 65_536
) -> TrainingSamples:
    lengths = sequences.lengths()
    user_rows = np.repeat(np.arange(len(lengths)), lengths)
    positions = np.arange(len(user_rows)) - sequences.offsets[user_rows]
    targets = encoder.catalog_positions(sequences.items)
    keep = targets >= 0
    user_rows, positions, targets = user_rows[keep], positions[keep], targets[keep]
    profiles = profile_arrays(data_users, sequences.user_ids)
    parts: list[EncodedUsers] = []
    for start in range(0, len(user_rows), chunk_size):
        chunk = slice(start, start + chunk_size)
        raw = raw_prefixes(
            sequences, profiles, user_rows[chunk], positions[chunk], encoder.config.max_history
        )
        parts.append(encoder.encode_users(raw))
    history = (
        np.concatenate([p.history for p in parts]) if parts else np.zeros((0, encoder.config.max_history))
    )
    return TrainingSamples(
        profile=torch.as_tensor(
            np.concatenate([p.profile for p in parts]) if parts else np.zeros((0, 4))
        ).long(),
        history=torch.as_tensor(history.astype(np.int32)),
        state=torch.as_tensor(np.concatenate([p.state for p in parts]) if parts else np.zeros((0, 3))).long(),
        target=torch.as_tensor(targets, dtype=torch.long),
        user_row=user_rows,
    )
