"""DB-SMC on a diffusers pipeline: the blend as the proposal, corrected toward ``p_base · exp(R / alpha)``.

The pipeline's own ``__call__`` runs (prompt encoding, classifier-free guidance, latent packing,
decoding); only its scheduler's ``step`` is replaced, for one call, by a step of
:class:`..blend.smc.AncestralSMC` -- the SMC the ComfyUI sampler node and the validation use.  The
``num_images_per_prompt`` latents are the particles.  Per step:

1. the pipeline hands the scheduler the *guided blend* prediction (its CFG applied to the blend);
   the blend also recorded the *base's* raw prediction of the same call
   (:meth:`.blend.DiffusionBlend.capture_base`), which gets the pipeline's CFG here;
2. both are turned into clean-sample predictions ``x̂_0`` and the latents into k-diffusion's scaling
   for the scheduler's chain:

   ==========================================  ==================================  ====================
   scheduler                                    chain                                ``x`` / ``sigma``
   ==========================================  ==================================  ====================
   ``DDPMScheduler``, ``DDIMScheduler``          DDPM posterior (DDIM eta = 1)       ``x_t / sqrt(abar)``,
                                                 between the scheduler's timesteps   ``sqrt((1-abar)/abar)``
   ``EulerAncestralDiscreteScheduler``          Euler ancestral                     as the scheduler's
   ``FlowMatchEulerDiscreteScheduler``          the flow ancestral step             as the scheduler's
   ==========================================  ==================================  ====================

   (``eta`` < 1 interpolates toward the deterministic step, as ComfyUI's ``eta``); the chain ends at
   the clean sample (``sigma = 0``), where the final potential ``R(x_0) / alpha`` is taken;
3. :meth:`AncestralSMC.step` reweights, resamples when the ESS falls, and draws the transition.

The potentials decode ``x̂_0`` with the pipeline's VAE and score it with the rewards of the training
package's registry.  What each step costs: the blend's forward plus the base's (free where the blend
evaluates the base anyway), and a VAE decode plus the rewards every ``score_every`` steps.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..blend.coefficients import BlendInputError, tilt_reward_weights
from ..blend.smc import AncestralSMC, SMCLog, describe_target
from .blend import DiffusionBlend
from .loras import denoiser_of

__all__ = ["SCHEDULERS", "smc_sample", "smc_target"]

#: the schedulers DB-SMC runs on, and the chain each one's step becomes
SCHEDULERS = {"DDPMScheduler": "vp", "DDIMScheduler": "vp", "EulerAncestralDiscreteScheduler": "k",
              "FlowMatchEulerDiscreteScheduler": "flow"}


def smc_target(blend: DiffusionBlend | None, rewards: Sequence[str] | Mapping[str, float] | None,
               alpha: float | None) -> list[tuple[str, float]]:
    """``[(reward name, weight of its raw value in log phi_0 = R / alpha), ...]``: with a blend its own
    tilt, ``sum_i (c_i / alpha_ref_i) r_i`` (``rewards``: one name per basis, default each LoRA's
    ``db.reward``); without one ``sum_j w_j r_j / alpha`` for ``rewards = {name: w_j}``."""
    from ..rewards import UnknownRewardError, check_reward_name

    def known(name, where):
        try:
            check_reward_name(name)
        except UnknownRewardError as e:
            raise BlendInputError(f"rewards: {where}: {e}") from None
        return name

    if blend is not None:
        if alpha is not None:
            raise BlendInputError(f"alpha={alpha}: leave it None with a blend; the target is the blend's "
                                  "(set kl_scale on the DiffusionBlend)")
        if isinstance(rewards, Mapping):
            raise BlendInputError("rewards: with a blend give names only (one per basis); the weights are the blend's")
        names = list(rewards) if rewards is not None else list(blend.rewards)
        if len(names) != len(blend.coefficients):
            raise BlendInputError(f"rewards: got {len(names)} names for a blend of {len(blend.coefficients)} bases; "
                                  "expected one per basis, in the blend's order")
        for i, name in enumerate(names):
            if name is None:
                raise BlendInputError(f"rewards: basis {i + 1} has no db.reward metadata; name its reward")
            known(name, f"basis {i + 1}")
        return list(zip(names, tilt_reward_weights(blend.coefficients, blend.alpha_refs)))
    if not isinstance(rewards, Mapping) or not rewards:
        raise BlendInputError("rewards: without a blend, give {reward name: weight} to steer toward")
    if alpha is None or not alpha > 0 or not math.isfinite(alpha):
        raise BlendInputError(f"alpha={alpha}: without a blend the KL weight of p_base exp(R / alpha) must be > 0")
    target = []
    for name, w in rewards.items():
        scaled = float(w) / float(alpha)
        if not math.isfinite(scaled):
            raise BlendInputError(f"rewards: {name}: weight {w} / alpha {alpha} is not a finite number")
        target.append((known(name, name), scaled))
    return target


@dataclass
class _Chain:
    """The scheduler's chain in k-diffusion's scaling: ``to_k(i, x)``, ``clean(i, x, out)``, ``from_k``."""

    kind: str  # "vp", "k" or "flow"
    scheduler: object

    def levels(self) -> list[float]:
        """The chain's noise levels, one per step, then 0."""
        s = self.scheduler
        if self.kind == "vp":
            abar = s.alphas_cumprod.double()
            return [math.sqrt((1 - float(abar[int(t)])) / float(abar[int(t)])) for t in s.timesteps] + [0.0]
        return [float(v) for v in s.sigmas[: len(s.timesteps)]] + [0.0]

    def index(self, timestep) -> int:
        s = self.scheduler
        if self.kind == "vp":
            matches = (s.timesteps == torch.as_tensor(timestep).to(s.timesteps)).nonzero()
            if len(matches) == 0:
                raise RuntimeError(f"Diffusion Blend SMC: timestep {timestep} is not one of the scheduler's")
            return int(matches[0])
        if s.step_index is None:
            s._init_step_index(timestep)
        return int(s.step_index)

    def scale(self, sigma: float) -> float:
        """``x_scheduler = scale * x_k`` at ``sigma`` (VP only: ``sqrt(abar)``; the others use k's scaling)."""
        return 1.0 / math.sqrt(1.0 + sigma**2) if self.kind == "vp" else 1.0

    def clean(self, x_k: torch.Tensor, out: torch.Tensor, sigma: float) -> torch.Tensor:
        """``x̂_0`` from the network's (guided) output at ``x_k``, ``sigma``."""
        if self.kind == "flow":
            return x_k - sigma * out
        prediction = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction == "epsilon":
            return x_k - sigma * out
        if prediction == "v_prediction":
            return x_k / (sigma**2 + 1) - out * (sigma / math.sqrt(sigma**2 + 1))
        if prediction == "sample":
            return out
        raise BlendInputError(f"scheduler: prediction_type={prediction!r} is not one DB-SMC reads "
                              "(epsilon, v_prediction, sample)")


class _SMCRun:
    """One ``pipe(...)`` call's SMC: what the replaced scheduler step reads and fills."""

    def __init__(self, pipe, blend: DiffusionBlend | None, chain: _Chain, smc: AncestralSMC, captured: list | None):
        self.pipe, self.blend, self.chain, self.smc, self.captured = pipe, blend, chain, smc, captured
        self.levels: list[float] | None = None
        self.result = None

    def base_prediction(self, guided_blend: torch.Tensor) -> torch.Tensor:
        """The base's prediction of this step with the pipeline's guidance, from the recorded calls."""
        if self.blend is None:
            return guided_blend
        calls, self.captured[:] = list(self.captured), []
        if len(calls) != 1:
            raise BlendInputError(f"pipe: the pipeline called its {self.blend.attribute} {len(calls)} times in one "
                                  "step; DB-SMC needs one (classifier-free guidance in one batched call: "
                                  "true_cfg_scale is not supported)")
        raw = calls[0]
        if raw.shape[0] == guided_blend.shape[0]:
            return raw
        if raw.shape[0] != 2 * guided_blend.shape[0] or not getattr(self.pipe, "do_classifier_free_guidance", False):
            raise BlendInputError(f"pipe: the {self.blend.attribute} saw a batch of {raw.shape[0]} for "
                                  f"{guided_blend.shape[0]} particles; DB-SMC reads classifier-free guidance "
                                  "as (uncond, cond) halves")
        uncond, cond = raw.chunk(2)
        return uncond + self.pipe.guidance_scale * (cond - uncond)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        if self.levels is None:
            self.levels = self.chain.levels()
        i = self.chain.index(timestep)
        sigma, sigma_next = self.levels[i], self.levels[i + 1]
        base = self.base_prediction(model_output)
        x_k = sample.float() / self.chain.scale(sigma)
        clean_q = self.chain.clean(x_k, model_output.float(), sigma)
        clean_p = self.chain.clean(x_k, base.float(), sigma)
        x_next, _ = self.smc.step(x_k, sigma, sigma_next, clean_q, clean_p)
        if self.chain.kind != "vp":
            self.chain.scheduler._step_index = i + 1
        if i + 1 == len(self.levels) - 1:  # the clean sample: final weights, one more resampling
            self.result = self.smc.finish(x_next)
            x_next = self.result.samples
        return (x_next * self.chain.scale(sigma_next)).to(sample.dtype)


def _scheduler_for(pipe, run: _SMCRun):
    """A shallow copy of the pipeline's scheduler whose ``step`` is the SMC's (every other method, and
    ``set_timesteps``' signature that pipelines inspect, stay the scheduler's own)."""
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    inner = pipe.scheduler

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        prev = run.step(model_output, timestep, sample)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    cls = type(f"DBSMC{type(inner).__name__}", (type(inner),), {"step": step})
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(inner.__dict__)
    return wrapped


def _decoder(pipe, height: int, width: int):
    """``decode(latents) -> images in [0, 1]`` with the pipeline's VAE (Flux's packed latents unpacked)."""
    vae = pipe.vae
    scaling = vae.config.scaling_factor
    shift = vae.config.get("shift_factor", None) or 0.0
    packed = hasattr(pipe, "_unpack_latents")

    def decode(latents: torch.Tensor) -> torch.Tensor:
        if packed:
            latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = (latents / scaling + shift).to(vae.dtype)
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    return decode


@torch.no_grad()
def smc_sample(pipe, prompt: str, *, blend: DiffusionBlend | None = None, particles: int = 8,
               rewards: Sequence[str] | Mapping[str, float] | None = None, alpha: float | None = None,
               reward_options: Mapping[str, Mapping[str, str]] | None = None, eta: float = 1.0,
               score_every: int = 1, resample_below: float = 0.5, potential_on: str = "blend", temper: bool = True,
               seed: int = 0, height: int | None = None, width: int | None = None, **pipe_kwargs):
    """Sample ``particles`` images of ``prompt`` with DB-SMC; returns ``(pipeline output, SMCLog)``.

    With ``blend`` (a :class:`DiffusionBlend` on ``pipe``) the target is the blend's tilt
    ``p_base exp(sum_i (c_i / alpha_ref_i) r_i)``; without, reward-guided SMC on the base toward
    ``p_base exp(sum_j w_j r_j / alpha)`` (``rewards={name: w_j}``, ``alpha > 0``).  ``reward_options``:
    ``{reward: get_reward options}`` (learned rewards need ``path``).  ``pipe_kwargs`` go to ``pipe(...)``
    (steps, guidance, ``output_type``, ...).  The result is equally weighted (resampled at the end)."""
    from ..rewards import get_reward

    if not isinstance(prompt, str):
        raise BlendInputError("prompt: DB-SMC resamples the batch as particles of one chain; give one prompt (a str)")
    if particles < 1:
        raise BlendInputError(f"particles={particles}: expected an integer >= 1")
    if not 0.0 < eta <= 1.0:
        raise BlendInputError(f"eta={eta}: expected 0 < eta <= 1 (a deterministic step has no density ratio)")
    if potential_on not in ("blend", "base"):
        raise BlendInputError(f"potential_on={potential_on!r}: expected 'blend' or 'base'")
    if blend is not None and (blend.pipe is not pipe or not blend.active):
        raise BlendInputError("blend: expected an active DiffusionBlend on this pipeline")
    kind = SCHEDULERS.get(type(pipe.scheduler).__name__)
    if kind is None:
        raise BlendInputError(f"pipe.scheduler: DB-SMC runs on {', '.join(SCHEDULERS)}, not "
                              f"{type(pipe.scheduler).__name__} (replace it, e.g. DDPMScheduler.from_config("
                              "pipe.scheduler.config))")
    if float(pipe_kwargs.get("guidance_rescale", 0.0) or 0.0) != 0.0:
        raise BlendInputError("guidance_rescale: DB-SMC guides the base with plain CFG; leave it 0")
    target = smc_target(blend, rewards, alpha)
    options = dict(reward_options or {})
    functions = [(get_reward(name, **options.get(name, {})), w) for name, w in target if w != 0.0]
    name, denoiser = denoiser_of(pipe)
    default = (denoiser.config.sample_size if name == "unet" else getattr(pipe, "default_sample_size", 64)) \
        * getattr(pipe, "vae_scale_factor", 8)
    height, width = int(height or default), int(width or default)
    decode = _decoder(pipe, height, width)
    timing = {"seconds": 0.0, "calls": 0}

    def log_potential(clean: torch.Tensor) -> torch.Tensor:
        if not functions:
            return torch.zeros(clean.shape[0], dtype=torch.float64)
        start = time.perf_counter()
        images = decode(clean)
        total = torch.zeros(images.shape[0], dtype=torch.float64)
        for fn, weight in functions:
            total += weight * torch.as_tensor(fn(images, [prompt] * images.shape[0])).detach().double().cpu().reshape(-1)
        timing["seconds"] += time.perf_counter() - start
        timing["calls"] += 1
        return total

    generator = torch.Generator().manual_seed(int(seed))
    smc = AncestralSMC(log_potential, eta=eta, flow=kind == "flow", score_every=score_every,
                       resample_below=resample_below, potential_on="proposal" if potential_on == "blend" else "base",
                       temper=temper, generator=generator)
    original = pipe.scheduler
    forwards_before = blend.forwards if blend is not None else 0
    with (blend.capture_base() if blend is not None else contextlib.nullcontext()) as captured:
        run = _SMCRun(pipe, blend, _Chain(kind, None), smc, captured)
        scheduler = _scheduler_for(pipe, run)
        run.chain.scheduler = scheduler
        pipe.__dict__["scheduler"] = scheduler  # DiffusionPipeline.__setattr__ would rewrite its config
        try:
            output = pipe(prompt, num_images_per_prompt=particles, height=height, width=width,
                          generator=torch.Generator().manual_seed(int(seed)), **pipe_kwargs)
        finally:
            pipe.__dict__["scheduler"] = original
    if run.result is None:
        raise RuntimeError("Diffusion Blend SMC: the pipeline ended before its last scheduler step")
    log = SMCLog()
    forwards = None if blend is None else blend.forwards - forwards_before
    log.fill(run.result, describe_target(target), forwards, timing["seconds"], timing["calls"])
    return output, log
