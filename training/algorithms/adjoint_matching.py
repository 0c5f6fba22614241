"""Adjoint Matching (Domingo-Enrich et al., ICLR 2025) on the sampling chain: pure functions.

The objective is the one DPOK maximises (:mod:`..objective`), ``J = E[r(x_0)] - alpha_ref KL(path)``,
in raw reward units.  On a *memoryless* chain (the start independent of the end under the base:
DDPM / DDIM at eta = 1 from pure noise, the flow chain's ancestral step at eta = 1 from sigma = 1)
its optimum at every noise level ``t`` is the tilted data ``p_base(x_0) exp(r(x_0) / alpha_ref)``
noised by the forward process, whose score is

    grad log p~_t(x) = grad log p_t(x) + grad log h_t(x),   h_t(x) = E_base[exp(r(x_0) / alpha_ref) | x_t = x]

so a network that predicts the tilted score serves **every** sampler (ODE included), not only the
chain it was fine-tuned on.  Adjoint Matching estimates ``-grad log h_t`` along chains sampled from
the current policy with the *lean adjoint*, solved backward from the reward's gradient through the
frozen **base** chain only::

    a_N = -grad r(x_N) / alpha_ref                   (terminal cost g = -r / alpha_ref)
    a_i = (d mean_base_i / d x_i)^T a_{i+1}         (a vector-Jacobian product, step i -> i+1)

and regresses the model's score shift onto it (the paper's ``|| u + sigma^T a ||^2``)::

    loss_i = || (mean_theta_i(x_i) - mean_base_i(x_i) - shift_i(a_i)) / std_i ||^2

with ``shift_i(a)`` the change of step ``i``'s mean when the model's score moves by ``-a``
(:func:`~..sampler.score_shift_mean`: a noise prediction moves by ``sqrt(1 - abar_t) a``, a flow
velocity by ``sigma a / (1 - sigma)``).  The fixed point is ``score_theta = score_base - E[a_i | x_i]
= score_base + grad log V_i``, where ``V_i`` is the value ``E[exp(r / alpha_ref) | x_i]`` under the
base *chain*.  For a Gaussian base and a linear reward this is exactly ``grad log h_t`` at any number
of steps (the DDPM and flow posterior means are conditional expectations, so the chain's mean maps
are the forward process's); otherwise ``V_i -> h_t`` as the steps shrink.  Regressing the chain's
own optimal step shift ``-std_i^2 E[a_{i+1} | x_i]`` instead would make the LoRA the optimum of that
discrete chain, which at 20 steps sits 20-30 % away from the tilted score on the ODE.  One step
keeps that chain target: a flow chain's first, from ``sigma = 1``, where every model's score is
pure noise's and the velocity (the mean of ``x_0``) is not a function of the score; there the loss
regresses the step onto its optimal discrete control ``-std_0^2 a_1``.

No importance ratio, clip or value net; the chains are detached samples.  No reward scale enters:
``a`` is the reward's gradient divided by ``alpha_ref``, in the units of the score, whatever units
the reward has.  The loss is reported per dimension (divided by ``d``), a constant factor.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["terminal_adjoint", "lean_adjoint_step", "adjoint_matching_loss"]

MeanFn = Callable[[torch.Tensor], torch.Tensor]


def terminal_adjoint(reward_grad: torch.Tensor, alpha_ref: float) -> torch.Tensor:
    """``a_N = grad g(x_N)`` for the terminal cost ``g = -r / alpha_ref`` (raw reward units)."""
    if not alpha_ref > 0:
        raise ValueError(f"alpha_ref = {alpha_ref!r}: expected > 0")
    return -reward_grad.detach().float() / alpha_ref


def lean_adjoint_step(base_mean: MeanFn, x: torch.Tensor, adjoint_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_i, mean_base_i(x_i))``: one backward step of the lean adjoint, ``a_i = J^T a_{i+1}`` with
    ``J`` the Jacobian of the **base** chain's mean at ``x`` (never the fine-tuned one: that is what
    makes the adjoint lean), and the base's mean itself (detached), which the loss needs too."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        mean = base_mean(x)
        (adjoint,) = torch.autograd.grad(mean, x, grad_outputs=adjoint_next.to(mean.dtype))
    return adjoint.detach().float(), mean.detach()


def adjoint_matching_loss(mean: torch.Tensor, base_mean: torch.Tensor, target_shift: torch.Tensor,
                          std: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean_B(sum_d ((mean - base_mean - target_shift) / std)^2) / d`` for one step of a batch, where
    ``target_shift`` is the mean shift of the score the lean adjoint asks for
    (:func:`~..sampler.score_shift_mean`), and diagnostics: ``kl`` (the step's KL to the base,
    ``||mean - base_mean||^2 / 2 std^2``, batch mean) and ``target_norm`` (``||target_shift / std||``
    per dimension, the size of the control being regressed onto)."""
    if not std > 0:
        raise ValueError(f"std = {std!r}: adjoint matching needs a stochastic (memoryless) step, std > 0")
    delta = (mean.float() - base_mean.detach().float()).flatten(1)
    target = target_shift.detach().float().flatten(1)
    d = delta.shape[1]
    loss = (((delta - target) / std) ** 2).sum(1).mean() / d
    stats = {"kl": ((delta.detach() ** 2).sum(1) / (2 * std**2)).mean(),
             "target_norm": ((target / std) ** 2).mean(1).sqrt().mean()}
    return loss, stats
