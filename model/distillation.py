"""Dynamic knowledge distillation: copy the warm expert into the cold one, per sample, only where the
cold expert's own loss is higher than the warm expert's (l_cold > l_warm)."""

from __future__ import annotations

import torch


def distillation_mask(
    cold_loss: torch.Tensor, warm_loss: torch.Tensor, scope: torch.Tensor | None = None
) -> torch.Tensor:
    """Where l_cold > l_warm, among the samples in ``scope`` (all of them when None)."""
    mask = cold_loss > warm_loss
    return mask if scope is None else mask & scope


def distillation_loss(
    cold_logits: torch.Tensor,
    warm_logits: torch.Tensor,
    cold_loss: torch.Tensor,
    warm_loss: torch.Tensor,
    scope: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the batch of the masked squared gap between cold and (detached) warm logits.

    Dividing by the batch size, not the number of masked samples, keeps alpha's meaning fixed
    however many samples the mask selects.
    """
    mask = distillation_mask(cold_loss.detach(), warm_loss.detach(), scope).to(cold_logits.dtype)
    gap = (cold_logits - warm_logits.detach()).pow(2).mean(dim=1)
    return (gap * mask).sum() / max(int(cold_logits.shape[0]), 1)
