"""The two experts of the user tower.

Cold expert: e_up = f(profile); e_cold = MLP([e_up ; attention(e_up)]).
Warm expert: e_ut = f(profile, actions); e_warm = MLP([e_ut ; attention(e_ut)]).
With group attention switched off the attention part is zeros, keeping the shapes (ablation).

With ``ModelConfig.warm_expert="sequence"`` the warm expert is instead ``SequenceWarmExpert``: SASRec's
encoder over the history is e_warm itself, plus a profile term.

The actions are read by one of two poolings (``ModelConfig.warm_pooling``): ``ActionPooling``, the
mean and a learnt recency-weighted mean of the history embeddings, or ``AttentionPooling``, the mean
and the newest position's output of causal self-attention over the history (README "Model and
training choices" has the measurements that chose between them).
"""

from __future__ import annotations

import torch
from torch import nn

from model.nn.group_attention import GroupAttention
from model.nn.layers import mlp
from model.nn.sequence import SequenceEncoder


def masked_mean(embedded: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """Mean of the (B, L, d) history embeddings over the present entries (zeros for an empty history)."""
    mask = (history > 0).to(embedded.dtype).unsqueeze(-1)
    return (embedded * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class ActionPooling(nn.Module):
    """Mean of the history embeddings plus a learnt recency-weighted mean (newest first)."""

    def __init__(self, max_history: int) -> None:
        super().__init__()
        self.position_logits = nn.Parameter(torch.linspace(1.0, -1.0, max_history))

    def forward(self, embedded: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        present = history > 0
        mean = masked_mean(embedded, history)
        logits = self.position_logits[: history.shape[1]].unsqueeze(0).expand(history.shape[0], -1)
        logits = logits.masked_fill(~present, -1e9)
        weights = torch.softmax(logits, dim=1) * present.to(embedded.dtype)
        recent = (weights.unsqueeze(-1) * embedded).sum(dim=1)
        return torch.cat([mean, recent], dim=1)


class AttentionPooling(nn.Module):
    """Mean of the history embeddings plus the newest position's output of causal self-attention blocks
    over the history (``SequenceEncoder``, SASRec's reading of a sequence): what the user did last,
    read in the light of what came before."""

    def __init__(self, dim: int, hidden_dim: int, max_history: int, n_blocks: int, dropout: float) -> None:
        super().__init__()
        self.encoder = SequenceEncoder(dim, hidden_dim, max_history, n_blocks, 1, dropout)

    def forward(self, embedded: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        newest, has_history = self.encoder.read_history(embedded, history)
        return torch.cat([masked_mean(embedded, history), newest * has_history.to(embedded.dtype)], dim=1)


class ColdExpert(nn.Module):
    def __init__(
        self, profile_dim: int, dim: int, hidden_dim: int, attention: GroupAttention, use_attention: bool
    ) -> None:
        super().__init__()
        self.profile = mlp(profile_dim, hidden_dim, dim)
        self.attention = attention
        self.use_attention = use_attention
        self.head = mlp(2 * dim, hidden_dim, dim)

    def forward(self, profile_features: torch.Tensor) -> torch.Tensor:
        e_up = self.profile(profile_features)
        attended = self.attention(e_up) if self.use_attention else torch.zeros_like(e_up)
        return self.head(torch.cat([e_up, attended], dim=1))


class WarmExpert(nn.Module):
    def __init__(
        self,
        profile_dim: int,
        action_dim: int,
        dim: int,
        hidden_dim: int,
        attention: GroupAttention,
        use_attention: bool,
        action_skip: bool = False,
    ) -> None:
        super().__init__()
        self.trunk = mlp(profile_dim + action_dim, hidden_dim, dim)
        self.dim = dim
        self.action_skip = action_skip
        self.attention = attention
        self.use_attention = use_attention
        self.head = mlp(2 * dim, hidden_dim, dim)

    def forward(self, profile_features: torch.Tensor, action_features: torch.Tensor) -> torch.Tensor:
        e_ut = self.trunk(torch.cat([profile_features, action_features], dim=1))
        attended = self.attention(e_ut) if self.use_attention else torch.zeros_like(e_ut)
        e_warm = self.head(torch.cat([e_ut, attended], dim=1))
        if self.action_skip:
            # The pooling's last d features are its newest reading of the history (attention output or
            # recency-weighted mean): added past the MLPs, they are not squeezed through the profile's trunk.
            e_warm = e_warm + action_features[:, -self.dim :]
        return e_warm


class NewestReading(nn.Module):
    """The newest position's output of causal self-attention blocks over the history, alone: the
    reading SASRec scores with. A user without history gets a learnt "empty history" vector."""

    def __init__(
        self, dim: int, hidden_dim: int, max_history: int, n_blocks: int, n_heads: int, dropout: float
    ) -> None:
        super().__init__()
        self.encoder = SequenceEncoder(dim, hidden_dim, max_history, n_blocks, n_heads, dropout)
        self.empty_history = nn.Parameter(torch.randn(dim) * 0.05)

    def forward(self, embedded: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        newest, has_history = self.encoder.read_history(embedded, history)
        return torch.where(has_history, newest, self.empty_history.unsqueeze(0).expand_as(newest))


class SequenceWarmExpert(nn.Module):
    """e_warm = the history's newest reading (``NewestReading``) + MLP(profile): the sequence signal
    reaches e_u directly, as in SASRec, and the profile adds what the history does not say."""

    def __init__(self, profile_dim: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.profile = mlp(profile_dim, hidden_dim, dim)

    def forward(self, profile_features: torch.Tensor, action_features: torch.Tensor) -> torch.Tensor:
        return action_features + self.profile(profile_features)
