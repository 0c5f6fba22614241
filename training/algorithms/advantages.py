"""Advantage estimates for a batch of final rewards."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["normalize_per_prompt"]


def normalize_per_prompt(rewards: torch.Tensor, prompts: Sequence[str], eps: float = 1e-6) -> torch.Tensor:
    """``(r - mean_p) / (std_p + eps)`` within each prompt's group; groups of one use the batch."""
    rewards = rewards.float()
    out = torch.empty_like(rewards)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
    for idx in groups.values():
        r = rewards[idx]
        if len(idx) > 1:
            out[idx] = (r - r.mean()) / (r.std(unbiased=False) + eps)
        else:
            out[idx] = (r - batch_mean) / (batch_std + eps)
    return out
