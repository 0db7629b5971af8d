"""Small building blocks shared by the towers (TorchScript-compatible)."""

from __future__ import annotations

import torch
from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


class CategoricalEmbeddings(nn.Module):
    """One embedding table per column of a (B, C) int64 tensor, concatenated to (B, C * dim)."""

    def __init__(self, cardinalities: tuple[int, ...] | list[int], dim: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList([nn.Embedding(max(int(c), 2), dim) for c in cardinalities])
        self.out_dim = dim * len(cardinalities)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        for column, table in enumerate(self.tables):
            parts.append(table(codes[:, column]))
        return torch.cat(parts, dim=1)
