"""The learnt baselines of the protocol, trained by the same loop as Cold & Warm Net.

- DSSM: one user tower (MLP over profile, mean-pooled history and state) and the same item tower,
  scaled cosine, BCE against uniform random negatives.
- YouTubeDNN (Covington et al. 2016): MLP over mean-pooled history and profile; items are free
  output embeddings; dot product; sampled softmax with log-Q correction.
Neither has a bias net, experts or a gate.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from model.features import FeatureEncoder
from model.nn.items import ItemInputEmbedding, ItemSideInputs, item_tower_for
from model.nn.layers import CategoricalEmbeddings, mlp
from model.nn.two_tower import TwoTowerNet
from model.settings import ModelConfig


def masked_mean(embedded: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    mask = (history > 0).to(embedded.dtype).unsqueeze(-1)
    return (embedded * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def fixed_gate(state: torch.Tensor) -> torch.Tensor:
    """Single-tower models report all weight on the warm side (no gate)."""
    gate = torch.zeros(state.shape[0], 2, dtype=torch.float32, device=state.device)
    gate[:, 1] = 1.0
    return gate


class PooledUserTower(nn.Module):
    def __init__(
        self,
        encoder: FeatureEncoder,
        items: ItemSideInputs,
        config: ModelConfig,
        use_state: bool,
        normalise: bool,
    ) -> None:
        super().__init__()
        dim = config.embedding_dim
        self.profile = CategoricalEmbeddings(encoder.profile_cardinalities(), config.feature_dim)
        self.state = CategoricalEmbeddings(encoder.state_cardinalities(), config.feature_dim)
        self.item_inputs = ItemInputEmbedding(items, dim, len(encoder.vocabularies["item_id"]))
        self.use_state = use_state
        self.normalise = normalise
        in_dim = self.profile.out_dim + dim + (self.state.out_dim if use_state else 0)
        self.net = mlp(in_dim, config.hidden_dim, dim)

    def forward(
        self, profile: torch.Tensor, history: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = [self.profile(profile), masked_mean(self.item_inputs(history), history)]
        if self.use_state:
            parts.append(self.state(state))
        e_u = self.net(torch.cat(parts, dim=1))
        if self.normalise:
            e_u = F.normalize(e_u, dim=1)
        return (
            e_u,
            torch.zeros(profile.shape[0], dtype=torch.float32, device=profile.device),
            fixed_gate(state),
        )


class NormalisedItemTower(nn.Module):
    def __init__(self, encoder: FeatureEncoder, items: ItemSideInputs, config: ModelConfig) -> None:
        super().__init__()
        self.tower = item_tower_for(encoder, items, config)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.tower(positions), dim=1), torch.zeros(
            positions.shape[0], device=positions.device
        )


class OutputItemEmbeddings(nn.Module):
    """YouTubeDNN's softmax weights: one free vector per catalog item."""

    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.vectors = nn.Embedding(n_items, dim)
        nn.init.normal_(self.vectors.weight, std=0.05)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vectors(positions), torch.zeros(positions.shape[0], device=positions.device)


class DSSM(TwoTowerNet):
    def __init__(self, encoder: FeatureEncoder, config: ModelConfig) -> None:
        items = ItemSideInputs(encoder.item_features())
        super().__init__(items.n_items, config.initial_scale, learn_scale=True)
        self.user_tower = PooledUserTower(encoder, items, config, use_state=True, normalise=True)
        self.item_scorer = NormalisedItemTower(encoder, items, config)


class YouTubeDNN(TwoTowerNet):
    def __init__(self, encoder: FeatureEncoder, config: ModelConfig) -> None:
        items = ItemSideInputs(encoder.item_features())
        super().__init__(items.n_items, 1.0, learn_scale=False)
        self.user_tower = PooledUserTower(encoder, items, config, use_state=False, normalise=False)
        self.item_scorer = OutputItemEmbeddings(items.n_items, config.embedding_dim)
