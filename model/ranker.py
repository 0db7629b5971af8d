"""Evaluation points → model inputs → full-catalog scores: a trained torch model with a ``score_all``
(``ModelRanker``), or the exported artifacts the service loads (``ArtifactsRanker``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from model.artifacts import Artifacts
from model.evaluation.protocol import EvalPoint, catalog_indices
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


def item_columns(model_item_ids: np.ndarray, catalog_item_ids: np.ndarray) -> np.ndarray:
    """For each protocol catalog item, its column among a model's items; -1 where the model lacks it.

    The model's item order need not be sorted (an artifacts item table is in whatever order it was
    written), so the lookup goes through a sort instead of assuming one.
    """
    model_item_ids = np.asarray(model_item_ids, dtype=np.int64)
    order = np.argsort(model_item_ids, kind="stable")
    ranks = catalog_indices(model_item_ids[order], np.asarray(catalog_item_ids, dtype=np.int64))
    if len(order) == 0:  # catalog_indices finds nothing in an empty list
        return ranks
    return np.where(ranks >= 0, order[np.maximum(ranks, 0)], -1)


def on_catalog(scores: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """float32 (n, len(columns)) scores in protocol catalog order; -inf where ``columns`` is -1.

    An item the model cannot score must never be recommended, but must still occupy its catalog
    column so that every ranker's output lines up with the protocol's targets.
    """
    out = np.full((len(scores), len(columns)), -np.inf, dtype=np.float32)
    known = columns >= 0
    out[:, known] = scores[:, columns[known]]
    return out


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
        return on_catalog(self._in_eval_mode(self.model.score_all, points).cpu().numpy(), self.columns)

    @torch.no_grad()
    def gates(self, points: Sequence[EvalPoint]) -> np.ndarray:
        """(n, 2) gate weights [cold, warm] of the points' users."""
        _, _, gate = self._in_eval_mode(self.model.user_tower, points)
        return gate.cpu().numpy()

    def _in_eval_mode(self, call: Any, points: Sequence[EvalPoint]) -> Any:
        """``call(profile, history, state)`` on the encoded points, the model in eval mode meanwhile."""
        encoded = encode_points(points, self.users, self.encoder)
        was_training = self.model.training
        # The model's device (a model being trained on a GPU is validated there).
        device = next(self.model.parameters()).device
        self.model.eval()
        try:
            return call(
                torch.as_tensor(encoded.profile, device=device),
                torch.as_tensor(encoded.history, device=device),
                torch.as_tensor(encoded.state, device=device),
            )
        finally:
            self.model.train(was_training)


class ArtifactsRanker:
    """Scores points with exported artifacts exactly as the service's model defines the score.

    score(u, i) = scale · e_u·e_i + b_i + b_u from the TorchScript user tower and the item table, i.e.
    what the service's folded FAISS index returns plus b_u, but over the whole catalog: the offline
    figure the served answers must reproduce. ``users`` is the user table the points' profiles come
    from (the data the artifacts were trained on).
    """

    def __init__(
        self, name: str, artifacts: Artifacts, users: pd.DataFrame, catalog_item_ids: np.ndarray
    ) -> None:
        self.name = name
        self.artifacts = artifacts
        self.users = users
        self.columns = item_columns(artifacts.items.item_ids, catalog_item_ids)
        # Float32 like the index: the service's scores come from float32 inner products as well.
        self._item_embeddings = torch.as_tensor(np.asarray(artifacts.items.embeddings, dtype=np.float32))
        self._item_bias = torch.as_tensor(np.asarray(artifacts.items.bias, dtype=np.float32))

    def user_side(self, points: Sequence[EvalPoint]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unit embedding (n, d), user bias b_u (n,), gate weights (n, 2) [cold, warm]) of the points."""
        return self.artifacts.embed_users(encode_points(points, self.users, self.artifacts.encoder))

    def score(self, points: Sequence[EvalPoint]) -> np.ndarray:
        embedding, user_bias, _ = self.user_side(points)
        with torch.inference_mode():
            scores = (
                self.artifacts.scale * (embedding @ self._item_embeddings.T)
                + self._item_bias[None, :]
                + user_bias[:, None]
            )
        return on_catalog(scores.numpy(), self.columns)

    def gates(self, points: Sequence[EvalPoint], batch_size: int = 1024) -> np.ndarray:
        """float64 (n, 2) gate weights [cold, warm] per point: how "cold" the model takes each user."""
        parts = [
            self.user_side(points[start : start + batch_size])[2].numpy().astype(np.float64)
            for start in range(0, len(points), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.float64)
