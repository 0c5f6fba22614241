"""Stochastic DDIM (eta = 1 is DDPM-like) with exact per-step Gaussian log-probabilities.

For a noise prediction ``eps`` at step ``t -> t_prev`` (``abar`` = cumulative product of alphas)::

    x0_hat   = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)
    sigma_t  = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
    mean     = sqrt(abar_prev) * x0_hat + sqrt(1 - abar_prev - sigma_t^2) * eps
    x_prev   = mean + sigma_t * z,      z ~ N(0, I)
    log p(x_prev | x_t) = sum_d log N(x_prev_d; mean_d, sigma_t^2)

Two transitions from the same ``x_t`` share ``sigma_t``, so their KL divergence is
``||mean_a - mean_b||^2 / (2 sigma_t^2)``: the per-step term DPOK regularizes with.

The sampler only needs ``eps_fn(x_t, t) -> eps`` (guidance already applied), so it drives a
diffusers UNet and a toy MLP alike.  Timesteps follow diffusers' DDIMScheduler ("leading"
spacing with ``steps_offset``), so trajectories match it step for step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "DDIMSchedule",
    "StepStats",
    "Trajectory",
    "ddim_step_stats",
    "gaussian_log_prob",
    "kl_same_std",
    "sample_trajectory",
]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DDIMSchedule:
    """``alphas_cumprod`` of the training noise schedule and the sampling timesteps."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,), float64
    timesteps: torch.Tensor  # (num_steps,), descending, long
    final_alpha_cumprod: float
    eta: float = 1.0

    @classmethod
    def stable_diffusion(
        cls,
        num_steps: int,
        eta: float = 1.0,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
        steps_offset: int = 1,
    ) -> "DDIMSchedule":
        """SD1.x/SDXL's ``scaled_linear`` betas, ``set_alpha_to_one=False``, leading spacing."""
        if num_steps < 1 or num_steps > num_train_timesteps:
            raise ValueError(f"num_steps={num_steps}: expected 1..{num_train_timesteps}")
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        ratio = num_train_timesteps // num_steps
        timesteps = (torch.arange(num_steps) * ratio).flip(0) + steps_offset
        return cls(alphas_cumprod, timesteps.long(), float(alphas_cumprod[0]), eta)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def step_ratio(self) -> int:
        return int(self.timesteps[0] - self.timesteps[1]) if self.num_steps > 1 else 1

    def abar(self, i: int) -> tuple[float, float]:
        """``(abar_t, abar_prev)`` for sampling step ``i`` (0 = the noisiest)."""
        t = int(self.timesteps[i])
        prev = t - (len(self.alphas_cumprod) // self.num_steps)
        abar_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha_cumprod
        return float(self.alphas_cumprod[t]), abar_prev

    def sigma(self, i: int) -> float:
        abar_t, abar_prev = self.abar(i)
        return self.eta * math.sqrt((1 - abar_prev) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_prev)


@dataclass
class StepStats:
    mean: torch.Tensor
    std: float


def ddim_step_stats(schedule: DDIMSchedule, i: int, x_t: torch.Tensor, eps: torch.Tensor) -> StepStats:
    """Mean and standard deviation of ``p(x_prev | x_t)`` at sampling step ``i``."""
    abar_t, abar_prev = schedule.abar(i)
    sigma = schedule.sigma(i)
    x0_hat = (x_t - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    direction = math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
    return StepStats(mean=math.sqrt(abar_prev) * x0_hat + direction, std=sigma)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """``sum_d log N(x_d; mean_d, std^2)`` per batch row (the exact log-density)."""
    d = x[0].numel()
    sq = ((x.double() - mean.double()) ** 2).flatten(1).sum(1)
    log_prob = -sq / (2 * std**2) - d * (math.log(std) + 0.5 * math.log(2 * math.pi))
    return log_prob.to(torch.promote_types(x.dtype, torch.float32))


def kl_same_std(mean_a: torch.Tensor, mean_b: torch.Tensor, std: float) -> torch.Tensor:
    """``KL(N(mean_a, std^2 I) || N(mean_b, std^2 I))`` per batch row."""
    return ((mean_a.float() - mean_b.float()) ** 2).flatten(1).sum(1) / (2 * std**2)


@dataclass
class Trajectory:
    """A batch of sampled chains: ``latents[:, i]`` is ``x`` before step ``i`` (``latents[:, -1]``
    the final sample), ``log_probs[:, i]`` the log-probability of step ``i``'s transition."""

    latents: torch.Tensor  # (B, N + 1, C, H, W)
    log_probs: torch.Tensor  # (B, N)
    timesteps: torch.Tensor  # (N,)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


@torch.no_grad()
def sample_trajectory(
    eps_fn: EpsFn, schedule: DDIMSchedule, x_T: torch.Tensor, generator: torch.Generator | None = None
) -> Trajectory:
    """Run the stochastic sampler from ``x_T`` and record every transition's log-probability."""
    x = x_T
    latents, log_probs = [x], []
    for i in range(schedule.num_steps):
        t = schedule.timesteps[i].expand(x.shape[0]).to(x.device)
        stats = ddim_step_stats(schedule, i, x, eps_fn(x, t))
        noise = torch.randn(x.shape, generator=generator, device="cpu", dtype=torch.float32).to(x.device, x.dtype)
        x = stats.mean + stats.std * noise
        latents.append(x)
        log_probs.append(gaussian_log_prob(x, stats.mean, stats.std))
    return Trajectory(torch.stack(latents, 1), torch.stack(log_probs, 1), schedule.timesteps.clone())
