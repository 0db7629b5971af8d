"""What every two-tower model here shares: score = scale · <e_u, e_i> + b_u + b_i over a catalog.

A subclass provides ``user_tower(profile, history, state) -> (e_u, b_u, gate)`` and
``item_scorer(positions) -> (e_i, b_i)``; training, evaluation and export only rely on this.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TwoTowerNet(nn.Module):
    user_tower: nn.Module
    item_scorer: nn.Module

    def __init__(self, n_items: int, initial_scale: float, learn_scale: bool) -> None:
        super().__init__()
        self.n_items = n_items
        log_scale = torch.tensor(math.log(initial_scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def all_items(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.item_scorer(torch.arange(self.n_items, device=self.log_scale.device))

    def score_all(self, profile: torch.Tensor, history: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """(B, n_items) scores over the whole catalog, exactly as the index computes them."""
        e_u, b_u, _ = self.user_tower(profile, history, state)
        e_i, b_i = self.all_items()
        return self.scale * (e_u @ e_i.t()) + b_u.unsqueeze(1) + b_i.unsqueeze(0)
