"""Prefix training samples: for user u and position t, history = items before t, target = item t,
state as of the sample's request time. Encoded once, through the same FeatureEncoder the service uses.

The request time of most samples is item t's own timestamp, as in the evaluation protocol; there,
the previous action was mostly seconds earlier. A feed request instead usually opens a session after a
pause of hours to years, so a share of the samples is asked for at the start of a later session:
the last action's time plus a gap (``session_start_times``). Without them the state features of a
returning user fall into buckets training never saw, and the gate treats them as new.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from model.features import SECONDS_PER_DAY, EncodedUsers, FeatureEncoder, RawUsers, profile_arrays
from model.settings import TrainConfig


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

    def gaps(self) -> np.ndarray:
        """Seconds between consecutive interactions of the same user."""
        same_user = np.ones(len(self.items), dtype=bool)
        same_user[self.offsets[:-1]] = False
        return np.diff(self.timestamps)[same_user[1:]] if len(self.items) else np.zeros(0, np.int64)


def session_start_gaps(sequences: UserSequences, session_gap_s: float) -> np.ndarray:
    """The pauses after which users of the data came back: gaps of at least ``session_gap_s``."""
    gaps = sequences.gaps()
    return gaps[gaps >= session_gap_s].astype(np.float64)


def draw_gaps(rng: np.random.Generator, n: int, data_gaps: np.ndarray, config: TrainConfig) -> np.ndarray:
    """``n`` pauses in seconds: the data's own session-start gaps, and a log-uniform share up to
    ``max_gap_days``, so that returns after longer pauses than the data holds are seen too."""
    longest = max(config.max_gap_days * SECONDS_PER_DAY, config.session_gap_s)
    long_tail = rng.random(n) < (config.long_gap_share if len(data_gaps) else 1.0)
    gaps = np.exp(rng.uniform(np.log(config.session_gap_s), np.log(longest), size=n))
    if len(data_gaps):
        gaps[~long_tail] = rng.choice(data_gaps, size=int((~long_tail).sum()))
    return gaps


def session_start_times(
    sequences: UserSequences,
    user_rows: np.ndarray,
    positions: np.ndarray,
    config: TrainConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Request time of each sample: its target's timestamp, or for a ``session_start_share`` of the
    samples with at least ``session_start_from`` actions, the last action's time plus a drawn pause."""
    flat = sequences.offsets[user_rows] + positions
    now = sequences.timestamps[flat].astype(np.int64)
    moved = (positions >= config.session_start_from) & (
        rng.random(len(positions)) < config.session_start_share
    )
    if moved.any():
        data_gaps = session_start_gaps(sequences, config.session_gap_s)
        gaps = draw_gaps(rng, int(moved.sum()), data_gaps, config)
        now[moved] = sequences.timestamps[flat[moved] - 1] + np.round(gaps).astype(np.int64)
    return now


def raw_prefixes(
    sequences: UserSequences,
    profiles: dict[str, np.ndarray],
    user_rows: np.ndarray,
    positions: np.ndarray,
    max_history: int,
    now: np.ndarray,
) -> RawUsers:
    """Users ``user_rows`` as of their ``positions``-th interaction (that interaction not included),
    asked at ``now``."""
    base = sequences.offsets[user_rows]
    back = np.arange(max_history)[None, :]
    flat = base[:, None] + positions[:, None] - 1 - back
    valid = back < positions[:, None]
    history = np.where(valid, sequences.items[np.clip(flat, 0, len(sequences.items) - 1)], -1)
    seen = positions > 0
    first = np.where(seen, sequences.timestamps[base], 0)
    last = np.where(seen, sequences.timestamps[np.maximum(base + positions - 1, 0)], 0)
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


def history_lengths(history: torch.Tensor) -> torch.Tensor:
    """Items in each row of encoded histories (0 = padding), capped at the encoder's max_history."""
    return (history > 0).sum(dim=1)


def history_balance_weights(samples: TrainingSamples, balance: float) -> torch.Tensor:
    """Per-sample loss weights (mean 1): (share of samples with the same capped history length) ^
    -balance. Prefix samples are mostly long histories, so without it the first few actions, where
    a new user is judged, are a few percent of the loss."""
    lengths = history_lengths(samples.history)
    counts = torch.bincount(lengths).double()
    weights = (counts[lengths] / len(lengths)).pow(-balance)
    return (weights / weights.mean()).float()


def build_training_samples(
    data_users: pd.DataFrame,
    sequences: UserSequences,
    encoder: FeatureEncoder,
    config: TrainConfig | None = None,
    chunk_size: int = 65_536,
) -> TrainingSamples:
    """Every prefix of every sequence, at the request times of ``session_start_times`` (seeded by
    ``config.seed``); ``config`` None asks every sample at its target's time."""
    lengths = sequences.lengths()
    user_rows = np.repeat(np.arange(len(lengths)), lengths)
    positions = np.arange(len(user_rows)) - sequences.offsets[user_rows]
    targets = encoder.catalog_positions(sequences.items)
    keep = targets >= 0
    user_rows, positions, targets = user_rows[keep], positions[keep], targets[keep]
    config = config or TrainConfig(session_start_share=0.0)
    now = session_start_times(sequences, user_rows, positions, config, np.random.default_rng(config.seed))
    profiles = profile_arrays(data_users, sequences.user_ids)
    parts: list[EncodedUsers] = []
    for start in range(0, len(user_rows), chunk_size):
        chunk = slice(start, start + chunk_size)
        raw = raw_prefixes(
            sequences, profiles, user_rows[chunk], positions[chunk], encoder.config.max_history, now[chunk]
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
