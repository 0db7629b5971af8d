"""The bias net: y_bias from the beta features chosen by mutual information.

Split into a user part b_u (profile/state columns) and an item part b_i (item columns), so that
retrieval stays exact: b_i is folded into the FAISS index, b_u is added to the returned scores.
"""

from __future__ import annotations

import torch
from torch import nn

from model.nn.layers import CategoricalEmbeddings, mlp


class SideBias(nn.Module):
    """Scalar bias from a chosen subset of the columns of a categorical feature matrix."""

    def __init__(
        self, columns: list[int], cardinalities: list[int], feature_dim: int, hidden_dim: int
    ) -> None:
        super().__init__()
        self.register_buffer("columns", torch.as_tensor(columns if columns else [0], dtype=torch.long))
        self.enabled = len(columns) > 0
        self.embeddings = CategoricalEmbeddings([cardinalities[c] for c in columns] or [2], feature_dim)
        self.net = mlp(self.embeddings.out_dim, hidden_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return torch.zeros(features.shape[0], dtype=torch.float32, device=features.device)
        return self.net(self.embeddings(features.index_select(1, self.columns))).squeeze(1)
