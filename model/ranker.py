"""Evaluation points → model inputs → full-catalog scores, for any model with a ``score_all``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from model.evaluation.protocol import EvalPoint
from model.features import EncodedUsers, FeatureEncoder, profile_arrays, raw_users_from_histories


def encode_points(points: Sequence[EvalPoint], users: pd.DataFrame, encoder: FeatureEncoder) -> EncodedUsers:
    """Each point's user as known at its request time: profile, first h items, state at that moment."""
    user_ids = np.array([p.user_id for p in points], dtype=np.int64)
    raw = raw_users_from_histories(
        profile_arrays(users, user_ids),
        [p.history_item_ids for p in points],
        [p.history_timestamps for p in points],
        np.array([p.request_time for p in points], dtype=np.int64),
        encoder.config.max_history,
    )
    return encoder.encode_users(raw)


class ModelRanker:
    """Adapts a trained torch model (``score_all(profile, history, state)``) to the protocol's Ranker.

    The model's catalog is the encoder's; scores are mapped onto the protocol's catalog, items the
    model does not know scoring -inf.
    """

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        encoder: FeatureEncoder,
        users: pd.DataFrame,
        catalog_item_ids: np.ndarray,
    ) -> None:
        self.name = name
        self.model = model
        self.encoder = encoder
        self.users = users
        self.columns = encoder.catalog_positions(np.asarray(catalog_item_ids, dtype=np.int64))

    @torch.no_grad()
    def score(self, points: Sequence[EvalPoint]) -> np.ndarray:
        encoded = encode_points(points, self.users, self.encoder)
        was_training = self.model.training
        self.model.eval()
        scores = self.model.score_all(
            torch.as_tensor(encoded.profile), torch.as_tensor(encoded.history), torch.as_tensor(encoded.state)
        ).numpy()
        self.model.train(was_training)
        out = np.full((len(points), len(self.columns)), -np.inf, dtype=np.float32)
        known = self.columns >= 0
        out[:, known] = scores[:, self.columns[known]]
        return out
