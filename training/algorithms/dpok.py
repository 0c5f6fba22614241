"""DPOK (Fan et al., 2023): KL-regularized policy gradient over the denoising chain.

Per sampled transition ``x_i -> x_{i+1}`` (``d`` = its number of dimensions) the loss is

    d * max(-A * rbar, -A * clip(rbar, 1 - eps, 1 + eps))  +  kl_weight * KL_i

* ``A`` is the advantage of the transition in units of the frozen reward scale (see
  :mod:`~diffusion_blend.training.objective`: the return includes the KL still to come);
* ``rbar = exp((log p_theta - log p_old) / d)`` is the importance ratio *per dimension*: the
  log-probability is a sum over ``d`` (~16k for a 64x64x4 latent), so a clip range such as DPOK's
  1e-4 only means something per dimension.  The factor ``d`` makes the on-policy gradient exactly
  ``-A * grad log p_theta`` (the policy gradient of the summed log-probability);
* ``KL_i = ||mean_theta - mean_ref||^2 / (2 sigma_i^2)`` at the sampled state, differentiated
  directly; ``kl_weight = alpha_ref / reward_scale``.

With ``rho`` and ``beta`` of the paper, ``alpha_ref = beta / rho`` (the config converts).
"""

from __future__ import annotations

import torch

__all__ = ["dpok_loss", "clipped_policy_loss"]


def clipped_policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float, num_dims: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate on the per-dimension ratio, scaled by ``num_dims``, and its diagnostics
    (``clip_fraction``: the share of samples whose per-dimension ratio left ``1 +- clip_range``)."""
    log_ratio = (log_prob - old_log_prob) / num_dims
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = num_dims * torch.maximum(unclipped, clipped).mean()
    stats = {
        "approx_kl_old": (0.5 * (log_prob - old_log_prob) ** 2).mean().detach(),
        "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean().detach(),
    }
    return loss, stats


def dpok_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    kl: torch.Tensor,
    *,
    kl_weight: float,
    clip_range: float,
    num_dims: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPOK loss for one timestep of a batch (all tensors shaped ``(B,)``)."""
    policy, stats = clipped_policy_loss(log_prob, old_log_prob, advantages, clip_range, num_dims)
    kl_mean = kl.mean()
    loss = policy + kl_weight * kl_mean
    stats.update(policy_loss=policy.detach() / num_dims, kl=kl_mean.detach())
    return loss, stats
