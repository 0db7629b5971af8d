"""The training samples as they were built before they gathered their histories per batch (issue 12):
every sample's encoded history stored in one (samples x max_history) matrix, profiles per sample.

Kept, unchanged but for names, as the baseline that ``bench/train_scale.py --eager`` measures against
and as the reference that tests/test_samples_lazy.py compares ``model.samples`` with, batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from model.data.schema import InteractionData
from model.data.split import UserSplit
from model.evaluation.protocol import build_eval_points
from model.features import EncodedUsers, FeatureEncoder, RawUsers, profile_arrays
from model.samples import UserSequences, session_start_times
from model.settings import TrainConfig
from model.train import TrainingContext


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
class EagerSamples:
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


def build_eager_training_samples(
    data_users: pd.DataFrame,
    sequences: UserSequences,
    encoder: FeatureEncoder,
    config: TrainConfig | None = None,
    chunk_size: int = 65_536,
) -> EagerSamples:
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
    return EagerSamples(
        profile=torch.as_tensor(
            np.concatenate([p.profile for p in parts]) if parts else np.zeros((0, 4))
        ).long(),
        history=torch.as_tensor(history.astype(np.int32)),
        state=torch.as_tensor(np.concatenate([p.state for p in parts]) if parts else np.zeros((0, 3))).long(),
        target=torch.as_tensor(targets, dtype=torch.long),
        user_row=user_rows,
    )


def eager_training_context(
    data: InteractionData, split: UserSplit, encoder: FeatureEncoder, config: TrainConfig
) -> TrainingContext:
    """``TrainingContext.build`` as it was, with the eager samples (duck-typed: what ``run_epochs`` and
    ``training_step`` read of the samples, ``len``, ``batch`` and ``target``, they have)."""
    sequences = UserSequences.from_interactions(data.interactions, split.train)
    samples = build_eager_training_samples(data.users, sequences, encoder, config)
    encoder.fit_state_coverage(samples.state.numpy())
    samples.state = torch.as_tensor(encoder.serve_state_buckets(samples.state.numpy()))
    points = build_eval_points(data, split.validation)
    return TrainingContext(data, split, encoder, samples, points, config)  # type: ignore[arg-type]
