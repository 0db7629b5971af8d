"""Attention over the k-means user-group embeddings E_ug (m × d): softmax(q·E_ugᵀ/√d)·E_ug."""

from __future__ import annotations

import math

import torch
from torch import nn


class GroupAttention(nn.Module):
    def __init__(self, n_groups: int, dim: int) -> None:
        super().__init__()
        # Fixed, not learnt: each group embedding is the mean of its members' pre-trained embeddings.
        self.register_buffer("group_embeddings", torch.zeros(n_groups, dim))
        self.inverse_sqrt_dim = 1.0 / math.sqrt(dim)

    def set_groups(self, group_embeddings: torch.Tensor) -> None:
        self.group_embeddings.copy_(group_embeddings.to(self.group_embeddings.dtype))

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(query @ self.group_embeddings.t() * self.inverse_sqrt_dim, dim=1)
        return weights @ self.group_embeddings
