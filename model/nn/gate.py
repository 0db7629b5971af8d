"""f_weight: the gate that mixes the experts from the user's state features (count, recency)."""

from __future__ import annotations

import torch
from torch import nn

from model.nn.layers import CategoricalEmbeddings, mlp


class StateGate(nn.Module):
    """Softmax weights (w_cold, w_warm) from the state columns; fixed when one expert is switched off."""

    def __init__(
        self,
        state_cardinalities: tuple[int, ...],
        feature_dim: int,
        hidden_dim: int,
        use_cold: bool,
        use_warm: bool,
    ) -> None:
        super().__init__()
        self.embeddings = CategoricalEmbeddings(state_cardinalities, feature_dim)
        self.scores = mlp(self.embeddings.out_dim, hidden_dim, 2)
        self.use_cold = use_cold
        self.use_warm = use_warm

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        if self.use_cold and self.use_warm:
            return torch.softmax(self.scores(self.embeddings(state)), dim=1)
        weights = torch.zeros(state.shape[0], 2, dtype=torch.float32, device=state.device)
        weights[:, 0 if self.use_cold else 1] = 1.0
        return weights
