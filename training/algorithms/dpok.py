"""DPOK (Fan et al., 2023): KL-regularized policy gradient over the denoising chain.

Objective (maximized):  rho * E[r(x_0)] - beta * sum_t E[KL(p_theta(.|x_t) || p_ref(.|x_t))]
which, divided by rho, is reward maximization with KL weight ``alpha_ref = beta / rho``: the
number the blend needs.  Per sampled transition the loss is

    rho * max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))  +  beta * KL_t

with ``ratio = exp(log p_theta(x_{t-1}|x_t) - log p_old(x_{t-1}|x_t))`` (samples may be reused
for several inner updates) and ``KL_t = ||mean_theta - mean_ref||^2 / (2 sigma_t^2)``.
"""

from __future__ import annotations

import torch

__all__ = ["dpok_loss", "clipped_policy_loss"]


def clipped_policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate ``mean(max(-A r, -A clip(r)))`` and its diagnostics."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "approx_kl_old": 0.5 * ((log_prob - old_log_prob) ** 2).mean().detach(),
        "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean().detach(),
    }
    return loss, stats


def dpok_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    kl: torch.Tensor,
    *,
    reward_weight: float,
    kl_weight: float,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPOK loss for one timestep of a batch (all tensors shaped ``(B,)``)."""
    policy, stats = clipped_policy_loss(log_prob, old_log_prob, advantages, clip_range)
    kl_mean = kl.mean()
    loss = reward_weight * policy + kl_weight * kl_mean
    stats.update(policy_loss=policy.detach(), kl=kl_mean.detach())
    return loss, stats
