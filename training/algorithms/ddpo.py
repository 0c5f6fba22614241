"""DDPO (Black et al., 2023), the PPO-clip variant: the same surrogate as DPOK with no KL term."""

from __future__ import annotations

import torch

from .dpok import clipped_policy_loss

__all__ = ["ddpo_loss"]


def ddpo_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, *, clip_range: float, num_dims: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, stats = clipped_policy_loss(log_prob, old_log_prob, advantages, clip_range, num_dims)
    stats["policy_loss"] = loss.detach() / num_dims
    return loss, stats
