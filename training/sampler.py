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
spacing with ``steps_offset``), so trajectories match it step for step.  The schedule is read
from the base model's own scheduler config (:meth:`DDIMSchedule.from_scheduler_config`): its
betas, spacing and prediction type (``epsilon`` or ``v_prediction``, converted to ``eps`` by
:meth:`DDIMSchedule.eps_from_output`).

When a reference ``eps`` is given, :func:`sample_trajectory` also records each step's KL to the
reference transition at the visited state, so the objective can add the KL still to come.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "ScheduleError",
    "DDIMSchedule",
    "StepStats",
    "Trajectory",
    "ddim_step_stats",
    "FlowSchedule",
    "step_stats",
    "score_output_scale",
    "score_shift_mean",
    "gaussian_log_prob",
    "kl_same_std",
    "sample_trajectory",
]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("leading", "trailing")


class ScheduleError(ValueError):
    """The base model's scheduler config asks for something this sampler does not do; the message
    names the field."""


def _betas(config: dict) -> torch.Tensor:
    n = int(config.get("num_train_timesteps", 1000))
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    raise ScheduleError(f"scheduler beta_schedule = {kind!r}: expected linear, scaled_linear or squaredcos_cap_v2")


@dataclass(frozen=True)
class DDIMSchedule:
    """``alphas_cumprod`` of the training noise schedule and the sampling timesteps."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,), float64
    timesteps: torch.Tensor  # (num_steps,), descending, long
    final_alpha_cumprod: float
    eta: float = 1.0
    prediction_type: str = "epsilon"
    spacing: str = "leading"

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

    @classmethod
    def from_scheduler_config(cls, config: dict, num_steps: int, eta: float = 1.0) -> "DDIMSchedule":
        """The chain of a diffusers scheduler config (``scheduler/scheduler_config.json``) as the
        model ships it: betas, ``prediction_type``, ``timestep_spacing`` (+ ``steps_offset``) and
        ``set_alpha_to_one``.  Sampler-only options (``clip_sample``, ``thresholding``) are not
        model properties and are not used: this chain never clips."""
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise ScheduleError(f"scheduler prediction_type = {prediction!r}: expected one of {', '.join(PREDICTION_TYPES)}")
        if config.get("rescale_betas_zero_snr"):
            raise ScheduleError("scheduler rescale_betas_zero_snr = true: zero terminal SNR is not supported by the "
                                "DDIM chain (x0 is undefined at the first step)")
        spacing = config.get("timestep_spacing", "leading")
        if spacing not in SPACINGS:
            raise ScheduleError(f"scheduler timestep_spacing = {spacing!r}: expected one of {', '.join(SPACINGS)}")
        alphas_cumprod = torch.cumprod(1.0 - _betas(config), dim=0)
        n = len(alphas_cumprod)
        if num_steps < 1 or num_steps > n:
            raise ScheduleError(f"sampling.steps = {num_steps}: expected 1..{n} (num_train_timesteps)")
        if spacing == "leading":
            timesteps = (torch.arange(num_steps) * (n // num_steps)).flip(0) + int(config.get("steps_offset", 0))
        else:
            timesteps = torch.round(torch.arange(n, 0, -n / num_steps, dtype=torch.float64)).long()[:num_steps] - 1
        final = 1.0 if config.get("set_alpha_to_one", False) else float(alphas_cumprod[0])
        return cls(alphas_cumprod, timesteps.long(), final, eta, prediction, spacing)

    def eps_from_output(self, t: torch.Tensor, x_t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The network's output at timesteps ``t`` (B,) as a noise prediction (``v = sqrt(abar) eps
        - sqrt(1 - abar) x0`` gives ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``)."""
        if self.prediction_type == "epsilon":
            return output
        abar_t = self.alphas_cumprod[t.cpu()].to(x_t.device, torch.float32).view(-1, *[1] * (x_t.dim() - 1))
        return (abar_t.sqrt() * output + (1 - abar_t).sqrt() * x_t).to(output.dtype)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def step_ratio(self) -> int:
        return int(self.timesteps[0] - self.timesteps[1]) if self.num_steps > 1 else 1

    def abar(self, i: int) -> tuple[float, float]:
        """``(abar_t, abar_prev)`` for sampling step ``i`` (0 = the noisiest)."""
        t = int(self.timesteps[i])
        if self.spacing == "leading":  # diffusers' DDIM: prev = t - num_train_timesteps // steps
            prev = t - (len(self.alphas_cumprod) // self.num_steps)
        else:
            prev = int(self.timesteps[i + 1]) if i + 1 < self.num_steps else -1
        abar_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha_cumprod
        return float(self.alphas_cumprod[t]), abar_prev

    def sigma(self, i: int) -> float:
        abar_t, abar_prev = self.abar(i)
        return self.eta * math.sqrt((1 - abar_prev) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_prev)


@dataclass
class StepStats:
    mean: torch.Tensor
    std: float


@dataclass(frozen=True)
class FlowSchedule:
    """The stochastic chain of a flow-matching model (SD3, Flux): ``x_s = (1 - s) x_0 + s eps``, the
    network predicts the velocity ``v = eps - x_0`` at model time ``1000 s``.

    Noise levels: ``num_steps + 1`` times uniform from 1 to ``1 / num_train_timesteps``, shifted as
    diffusers' ``FlowMatchEulerDiscreteScheduler`` shifts them (``shift s / (1 + (shift - 1) s)``).  The
    chain ends at the smallest noise level the model was trained at, as the DDIM chain ends at ᾱ_0,
    rather than at 0, so that every transition is a proper Gaussian:

        x̂_0 = x - s_i v,   x_{i+1} ~ N(a_i x + b_i x̂_0, c_i^2 I)

    with ``(a_i, b_i, c_i)`` ComfyUI's ancestral step on flow models (:func:`blend.smc.ancestral_step`,
    ``flow=True``; at ``eta = 1`` the posterior of the flow's Gaussian path given x̂_0).  Its marginals
    are the flow's in the limit of small steps, as DDPM's are the VP model's; the per-step KL between
    two such transitions from one state is ``||mean_a - mean_b||^2 / 2c_i^2``, as in :class:`DDIMSchedule`.
    """

    sigmas: torch.Tensor  # (num_steps + 1,), float64, descending, all > 0
    eta: float = 1.0
    num_train_timesteps: int = 1000
    shift: float = 1.0
    prediction_type: str = "flow"

    @classmethod
    def from_scheduler_config(cls, config: dict, num_steps: int, eta: float = 1.0,
                              image_seq_len: int | None = None) -> "FlowSchedule":
        """The chain of a ``FlowMatchEulerDiscreteScheduler`` config.  With ``use_dynamic_shifting``
        (Flux) the shift depends on the image's token count: ``mu`` linear in ``image_seq_len`` between
        ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``, and
        ``sigma = e^mu / (e^mu + 1/t - 1)`` (diffusers' ``calculate_shift`` and exponential time shift),
        i.e. the static form with ``shift = e^mu``."""
        n = int(config.get("num_train_timesteps", 1000))
        if num_steps < 1 or num_steps > n:
            raise ScheduleError(f"sampling.steps = {num_steps}: expected 1..{n} (num_train_timesteps)")
        shift = float(config.get("shift", 1.0))
        if config.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise ScheduleError("scheduler use_dynamic_shifting = true: the shift depends on the resolution "
                                    "(image_seq_len), which the family must give")
            if config.get("time_shift_type", "exponential") != "exponential":
                raise ScheduleError(f"scheduler time_shift_type = {config['time_shift_type']!r}: expected exponential")
            base_len, max_len = int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096))
            base_shift, max_shift = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
            slope = (max_shift - base_shift) / (max_len - base_len)
            shift = math.exp(base_shift + slope * (image_seq_len - base_len))
        times = torch.linspace(1.0, 1.0 / n, num_steps + 1, dtype=torch.float64)
        sigmas = shift * times / (1 + (shift - 1) * times)
        return cls(sigmas, eta, n, shift)

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.numel()) - 1

    @property
    def timesteps(self) -> torch.Tensor:
        """The model's time input at every step (``num_train_timesteps * sigma``)."""
        return (self.sigmas[:-1] * self.num_train_timesteps).float()

    def step_stats(self, i: int, x_t: torch.Tensor, velocity: torch.Tensor) -> StepStats:
        from ..blend.smc import ancestral_step

        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        step = ancestral_step(sigma, sigma_next, self.eta, flow=True)
        return StepStats(mean=step.mean(x_t, x_t - sigma * velocity), std=step.noise_std)


def step_stats(schedule, i: int, x_t: torch.Tensor, output: torch.Tensor) -> StepStats:
    """Mean and standard deviation of the chain's step ``i`` given the network's output (a noise
    prediction for :class:`DDIMSchedule`, a velocity for :class:`FlowSchedule`)."""
    if isinstance(schedule, FlowSchedule):
        return schedule.step_stats(i, x_t, output)
    return ddim_step_stats(schedule, i, x_t, output)


def score_output_scale(schedule, i: int) -> float:
    """How far the network's output at step ``i`` moves when the model's score moves by ``-1``
    (per unit, the same along every dimension): ``sqrt(1 - abar_t)`` for a noise prediction
    (``score = -eps / sqrt(1 - abar)``), ``sigma / (1 - sigma)`` for a flow velocity (``score = -eps /
    sigma`` and ``eps = x + (1 - sigma) v`` at fixed ``x``); infinite at a flow's ``sigma = 1``, where
    every model's score is pure noise's and the velocity is not a function of the score."""
    if isinstance(schedule, FlowSchedule):
        sigma = float(schedule.sigmas[i])
        return sigma / (1 - sigma) if sigma < 1 else math.inf
    return math.sqrt(1 - schedule.abar(i)[0])


def score_shift_mean(schedule, i: int, adjoint: torch.Tensor) -> torch.Tensor:
    """The change of step ``i``'s mean when the model's score moves by ``-adjoint`` (its output by
    ``score_output_scale * adjoint``): the step's mean is affine in ``(x, output)`` with no constant
    term, so the change is the mean at ``x = 0`` of that output change."""
    scale = score_output_scale(schedule, i)
    if not math.isfinite(scale):
        raise ValueError(f"step {i}: the score at noise level 1 does not determine the model's output")
    return step_stats(schedule, i, torch.zeros_like(adjoint), scale * adjoint).mean


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
    #: ``kl[:, i] = KL(p(.|x_i) || p_ref(.|x_i))`` at the sampling policy (zeros without a reference)
    kl: torch.Tensor | None = None  # (B, N)
    #: the reference transition's mean at every visited state (for the KL term of the update)
    ref_means: torch.Tensor | None = None  # (B, N, C, H, W)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


@torch.no_grad()
def sample_trajectory(
    eps_fn: EpsFn,
    schedule: DDIMSchedule,
    x_T: torch.Tensor,
    generator: torch.Generator | None = None,
    reference_eps_fn: EpsFn | None = None,
) -> Trajectory:
    """Run the stochastic sampler from ``x_T`` and record every transition's log-probability and,
    with ``reference_eps_fn``, its KL to the reference transition from the same state."""
    x = x_T
    latents, log_probs, kls, ref_means = [x], [], [], []
    for i in range(schedule.num_steps):
        t = schedule.timesteps[i].expand(x.shape[0]).to(x.device)
        stats = step_stats(schedule, i, x, eps_fn(x, t))
        if reference_eps_fn is not None:
            ref = step_stats(schedule, i, x, reference_eps_fn(x, t))
            kls.append(kl_same_std(stats.mean, ref.mean, stats.std))
            ref_means.append(ref.mean)
        noise = torch.randn(x.shape, generator=generator, device="cpu", dtype=torch.float32).to(x.device, x.dtype)
        x = stats.mean + stats.std * noise
        latents.append(x)
        log_probs.append(gaussian_log_prob(x, stats.mean, stats.std))
    log_probs_t = torch.stack(log_probs, 1)
    kl = torch.stack(kls, 1) if kls else torch.zeros_like(log_probs_t)
    return Trajectory(torch.stack(latents, 1), log_probs_t, schedule.timesteps.clone(), kl,
                      torch.stack(ref_means, 1) if ref_means else None)
