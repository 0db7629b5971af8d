"""Training objectives: per-sample losses, so distillation can compare the experts sample by sample.

- ``bce``: the paper's loss, sigmoid(score) against the positive and N uniform random negatives.
- ``sampled_softmax``: softmax over in-batch targets plus shared uniform negatives, each corrected by
  log Q (its sampling probability) so the model estimates the full-catalog softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class Candidates:
    """The items each sample is scored against: column 0 of ``per_sample`` is the positive (bce), or
    a shared list with a log-Q correction and a mask of accidental hits (sampled softmax)."""

    positions: torch.Tensor
    log_q: torch.Tensor | None
    positive_column: torch.Tensor | None
    accidental_hits: torch.Tensor | None


def bce_candidates(
    targets: torch.Tensor, n_negatives: int, n_items: int, generator: torch.Generator
) -> Candidates:
    negatives = torch.randint(0, n_items, (targets.shape[0], n_negatives), generator=generator)
    return Candidates(torch.cat([targets.unsqueeze(1), negatives], dim=1), None, None, None)


def softmax_candidates(
    targets: torch.Tensor, n_shared: int, n_items: int, item_log_q: torch.Tensor, generator: torch.Generator
) -> Candidates:
    """In-batch targets + shared uniform negatives; in-batch log Q from training frequencies."""
    shared = torch.randint(0, n_items, (n_shared,), generator=generator)
    positions = torch.cat([targets, shared])
    batch = targets.shape[0]
    # A shared item drawn uniformly has q = n_shared / n_items of being in the list.
    uniform_log_q = torch.full((n_shared,), float(torch.log(torch.tensor(n_shared / n_items))))
    log_q = torch.cat([item_log_q[targets] + torch.log(torch.tensor(float(batch))), uniform_log_q])
    hits = positions.unsqueeze(0) == targets.unsqueeze(1)
    positive_column = torch.arange(batch)
    hits[positive_column, positive_column] = False
    return Candidates(positions, log_q, positive_column, hits)


def positive_columns(candidates: Candidates) -> torch.Tensor:
    """(B,) the column of each sample's positive among its candidates' logits."""
    if candidates.positive_column is not None:
        return candidates.positive_column
    return torch.zeros(candidates.positions.shape[0], dtype=torch.long, device=candidates.positions.device)


def per_sample_loss(logits: torch.Tensor, candidates: Candidates) -> torch.Tensor:
    """Loss of each sample (B,), from logits (B, C) over ``candidates``."""
    if candidates.log_q is None:
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=1)
    corrected = logits - candidates.log_q.unsqueeze(0)
    corrected = corrected.masked_fill(candidates.accidental_hits, -1e9)
    return F.cross_entropy(corrected, candidates.positive_column, reduction="none")
