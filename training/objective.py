"""The objective every basis LoRA is trained on, in raw reward units.

Maximised over the policy's path measure ``P_theta`` (a chain of Gaussian transitions)::

    J(theta) = E[r(x_0)] - alpha_ref * KL(P_theta || P_base)
             = E[ r(x_0) - alpha_ref * sum_i KL_i(x_i) ],   KL_i(x) = KL(p_theta(.|x) || p_base(.|x))

Its optimum is ``P* ~ P_base exp(r / alpha_ref)``, whose final marginal is the tilt
``p_base(x_0) exp(r(x_0) / alpha_ref)`` that Diffusion Blend combines.  ``alpha_ref`` is the
number written into the LoRA's ``db.alpha_ref``: the same units as the reward, always.

The gradient of ``J`` (score function + the direct KL term) is

    grad J = E[ sum_i grad log p_theta(x_{i+1} | x_i) * (G_i - b_i) ] - alpha_ref * E[ sum_i grad KL_i(x_i) ]

with the return of transition ``i`` ``G_i = r - alpha_ref * sum_{j > i} KL_j`` (the KL still to
come: the states that transition ``i`` leads to) and any baseline ``b_i`` that does not depend on
that sample (:func:`leave_one_out_baseline`, a per-prompt version of it, or a value network fitted
on other batches).  Dividing the whole objective by a constant ``reward_scale`` (measured once on
the base model, then frozen) changes nothing but the step size: advantages ``(G_i - b_i) / s`` and
KL weight ``alpha_ref / s`` keep the same optimum.  A moving batch standard deviation would not.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["kl_to_go", "returns_to_go", "leave_one_out_baseline", "advantages", "measure_reward_scale",
           "ADVANTAGES"]

#: how the baseline ``b_i`` is formed
ADVANTAGES = ("batch", "per_prompt", "value")


def kl_to_go(kl: torch.Tensor) -> torch.Tensor:
    """``out[:, i] = sum_{j > i} kl[:, j]`` for per-step KLs ``kl`` of shape ``(B, N)``."""
    return kl.flip(1).cumsum(1).flip(1) - kl


def returns_to_go(reward: torch.Tensor, kl: torch.Tensor, alpha_ref: float) -> torch.Tensor:
    """``G[:, i] = r - alpha_ref * sum_{j > i} KL_j``, shape ``(B, N)`` (raw reward units)."""
    return reward[:, None].to(kl.dtype) - alpha_ref * kl_to_go(kl)


def leave_one_out_baseline(values: torch.Tensor, groups: Sequence[str] | None = None) -> torch.Tensor:
    """For each row, the mean of the *other* rows (of its group): a baseline independent of the
    row's own sample, so ``values - baseline`` is unbiased.  (Subtracting a mean that includes the
    row itself shrinks every advantage by ``1 - 1/n``, which silently raises the KL weight by
    ``n / (n - 1)``.)  ``values`` is ``(B, ...)``; groups of one fall back to the whole batch."""
    n = values.shape[0]
    if n < 2:
        return torch.zeros_like(values)
    total = values.sum(0, keepdim=True)
    batch = (total - values) / (n - 1)
    if groups is None:
        return batch
    out = batch.clone()
    index: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    for idx in index.values():
        if len(idx) > 1:
            v = values[idx]
            out[idx] = (v.sum(0, keepdim=True) - v) / (len(idx) - 1)
    return out


def advantages(returns: torch.Tensor, kind: str, prompts: Sequence[str], reward_scale: float) -> torch.Tensor:
    """``(G - b) / reward_scale`` for the ``batch`` and ``per_prompt`` baselines (``(B, N)``)."""
    if kind == "batch":
        baseline = leave_one_out_baseline(returns)
    elif kind == "per_prompt":
        baseline = leave_one_out_baseline(returns, prompts)
    else:
        raise ValueError(f"algorithm.advantage = {kind!r}: this function forms batch and per_prompt baselines")
    return (returns - baseline) / reward_scale


def measure_reward_scale(rewards: torch.Tensor) -> float:
    """The reward's standard deviation under the base model (the first batch, sampled before any
    update): the one constant the objective is divided by.  A constant reward gives 1.0."""
    s = float(rewards.double().std(unbiased=True)) if rewards.numel() > 1 else 0.0
    return s if math.isfinite(s) and s > 0 else 1.0
