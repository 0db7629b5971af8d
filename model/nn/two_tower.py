"""What every two-tower model here shares: score = scale · <e_u, e_i> + b_u + b_i over a catalog.

A subclass provides ``user_tower(profile, history, state) -> (e_u, b_u, gate)`` and
``item_scorer(positions) -> (e_i, b_i)``; training, evaluation and export only rely on this.
Training scores its batches through ``forward`` (see there); evaluation and export call the towers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class CandidateLogits(NamedTuple):
    """Scores of a batch's users against their candidates, (B, C) each."""

    logits: torch.Tensor
    # With distillation (Cold & Warm Net's DKD): the cold expert's scores with the items, biases and
    # scale held fixed, and the warm expert's, without gradient.
    cold: torch.Tensor | None = None
    warm: torch.Tensor | None = None


def candidate_logits(
    e_user: torch.Tensor,
    b_user: torch.Tensor,
    e_items: torch.Tensor,
    b_items: torch.Tensor,
    scale: torch.Tensor,
    per_sample: bool,
) -> torch.Tensor:
    """Scores of each user against its own candidates (B, C) or a shared list (C)."""
    if per_sample:
        batch, columns = b_items.shape
        cosine = torch.einsum("bd,bcd->bc", e_user, e_items.view(batch, columns, -1))
        return scale * cosine + b_user.unsqueeze(1) + b_items
    return scale * (e_user @ e_items.t()) + b_user.unsqueeze(1) + b_items.unsqueeze(0)


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

    def forward(
        self,
        profile: torch.Tensor,
        history: torch.Tensor,
        state: torch.Tensor,
        positions: torch.Tensor,
        distil: bool = False,
        positives: torch.Tensor | None = None,
    ) -> CandidateLogits:
        """Training's scores of B users against candidate items: a list shared by the batch
        (``positions`` (C,), sampled softmax) or one list per user ((B, C), bce).

        Everything with a trained weight in it runs here, because DistributedDataParallel hooks only
        ``forward``: called on the wrapped net, the gradients of both towers, the bias net and the
        scale are averaged over the processes. ``positives`` (B,), the column of each sample's own
        target, lets a term whose item side was counted from the training targets score that target
        without the sample's own count (``own_target_change``). ``distil`` (the user tower must have
        ``experts``) adds the cold and warm experts' own scores for dynamic knowledge distillation:
        only the cold expert learns from the distillation, so the items, biases and scale are fixed
        in its scores, or the gap would also be closed by flattening every score (a smaller scale);
        the warm expert's scores are the target and carry no gradient.
        """
        if distil:
            e_u, b_u, _, e_cold, e_warm = self.user_tower.experts(profile, history, state)
        else:
            e_u, b_u, _ = self.user_tower(profile, history, state)
        per_sample = positions.dim() == 2
        e_i, b_i = self.item_scorer(positions.reshape(-1))
        if per_sample:
            b_i = b_i.view(positions.shape)
        scale = self.scale
        logits = candidate_logits(e_u, b_u, e_i, b_i, scale, per_sample)
        if positives is not None:
            logits = self._own_targets_left_out(logits, e_u, state, positions, positives)
        if not distil:
            return CandidateLogits(logits)
        fixed_items, fixed_bias, fixed_scale = e_i.detach(), b_i.detach(), scale.detach()
        cold = candidate_logits(e_cold, b_u.detach(), fixed_items, fixed_bias, fixed_scale, per_sample)
        with torch.no_grad():
            warm = candidate_logits(e_warm, b_u, fixed_items, fixed_bias, fixed_scale, per_sample)
        return CandidateLogits(logits, cold, warm)

    def own_target_change(
        self, e_u: torch.Tensor, state: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor | None:
        """(B,) change to each sample's score of its own target when the sample is left out of what
        the item side was counted from; None: nothing here was counted from the targets."""
        return None

    def _own_targets_left_out(
        self,
        logits: torch.Tensor,
        e_u: torch.Tensor,
        state: torch.Tensor,
        positions: torch.Tensor,
        positives: torch.Tensor,
    ) -> torch.Tensor:
        column = positives.unsqueeze(1)
        targets = positions[positives] if positions.dim() == 1 else positions.gather(1, column).squeeze(1)
        change = self.own_target_change(e_u, state, targets)
        return logits if change is None else logits.scatter_add(1, column, change.unsqueeze(1))
