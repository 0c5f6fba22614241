"""Sampling one noise predictor several ways, to test a LoRA's promise beyond the chain it was trained on.

A model trained on a :class:`~diffusion_blend.training.sampler.DDIMSchedule` predicts the noise
``eps(x, t)`` of the variance-preserving path ``x = sqrt(abar) x_0 + sqrt(1 - abar) eps``.  If it
predicts the *score* of a distribution at every noise level (the base, or the tilt Adjoint Matching
aims at), every sampler below draws that distribution, up to its discretisation:

* ``ddpm``: DDIM with eta = 1 (the DDPM posterior), the chain the LoRAs are trained on;
* ``ddim``: DDIM with eta = 0, the probability-flow ODE;
* ``flow_euler``: the same model read as a flow-matching velocity on the same noise levels and
  integrated by Euler in the flow's coordinates ``x_f = (1 - s) x_0 + s eps`` (a different ODE
  discretisation: ComfyUI's ``euler`` on a flow schedule);
* ``flow_ancestral``: ComfyUI's ``euler_ancestral`` step on the flow coordinates at eta = 0.5 (at
  eta = 1 it would be the DDPM posterior again, rescaled).

All samplers use the schedule's own timesteps (the noise levels the network was trained at) and end
at its last noise level; they return points in the variance-preserving coordinates.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..blend.smc import ancestral_step
from ..training.sampler import DDIMSchedule, ddim_step_stats

__all__ = ["SAMPLERS", "sample_chain"]

SAMPLERS = ("ddpm", "ddim", "flow_euler", "flow_ancestral")
FLOW_ANCESTRAL_ETA = 0.5

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _flow_sigma(abar: float) -> float:
    """The flow noise level ``s`` of the VP level ``abar``: ``s / (1 - s) = sqrt((1 - abar) / abar)``."""
    return math.sqrt(1 - abar) / (math.sqrt(abar) + math.sqrt(1 - abar))


def _to_flow(s: float) -> float:
    """``x_f = x_vp * sqrt((1 - s)^2 + s^2)``."""
    return math.sqrt((1 - s) ** 2 + s**2)


@torch.no_grad()
def sample_chain(eps_fn: EpsFn, schedule: DDIMSchedule, sampler: str, x_T: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """Final points of ``sampler`` from ``x_T`` (noise drawn from ``generator`` where the sampler is
    stochastic, so two models run with the same generator state share their noise)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler = {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    x = x_T

    def noise():
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)

    if sampler in ("ddpm", "ddim"):
        chain = DDIMSchedule(schedule.alphas_cumprod, schedule.timesteps, schedule.final_alpha_cumprod,
                             1.0 if sampler == "ddpm" else 0.0, schedule.prediction_type, schedule.spacing)
        for i in range(chain.num_steps):
            t = chain.timesteps[i].expand(x.shape[0])
            stats = ddim_step_stats(chain, i, x, eps_fn(x, t).to(x.dtype))
            x = stats.mean + stats.std * noise() if stats.std > 0 else stats.mean
        return x
    levels = [schedule.abar(i)[0] for i in range(schedule.num_steps)] + [schedule.abar(schedule.num_steps - 1)[1]]
    sigmas = [_flow_sigma(a) for a in levels]
    xf = x * _to_flow(sigmas[0])
    for i in range(schedule.num_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        t = schedule.timesteps[i].expand(x.shape[0])
        eps = eps_fn(xf / _to_flow(s), t).to(x.dtype)
        velocity = (eps - xf) / (1 - s)  # v = eps - x_0, x_0 = (x_f - s eps) / (1 - s)
        if sampler == "flow_euler":
            xf = xf + (s_next - s) * velocity
        else:
            step = ancestral_step(s, s_next, FLOW_ANCESTRAL_ETA, flow=True)
            xf = step.mean(xf, xf - s * velocity) + step.noise_std * noise()
    return xf / _to_flow(sigmas[-1])
