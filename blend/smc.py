"""Sequential Monte Carlo toward the exact tilted target, with the blend as the proposal.

The target of Diffusion Blend is the path measure

    P*(x_T, ..., x_0)  ∝  P_base(x_T, ..., x_0) · exp(R(x_0) / alpha),     R = sum_i w_i r_i,

whose x_0-marginal is exactly ``p_base(x_0) exp(R(x_0) / alpha)``.  The blend samples a proposal
``Q`` with the same (Gaussian) transition noise as the base chain; particles drawn from ``Q`` are
re-weighted toward ``P*`` step by step (a Feynman-Kac model with twisting potentials, as in twisted
SMC / TDS and FK steering).  With potentials ``phi_t(x_t)`` -- e.g. ``exp(R(x̂_0(x_t)) / alpha)`` on
the predicted clean sample -- a particle's log-weight is

    log w = log phi_T(x_T)                                                   (start)
          + sum_t [ log p_base(x_{t-1} | x_t) - log q(x_{t-1} | x_t) ]        (transitions)
          + sum_t [ log phi_{t-1}(x_{t-1}) - log phi_t(x_t) ]                  (potential differences)

with the last potential the reward itself, ``phi_0(x_0) = exp(R(x_0) / alpha)``.  The potential
differences telescope, so the final weight is ``dP_base/dQ(path) · exp(R(x_0) / alpha)``: the exact
importance weight of the target, whatever the intermediate potentials.  The intermediate ones only
decide *when* particles are resampled (good potentials resample early, before the paths commit).

Everything here is a pure function of tensors: log-weights ``(N,)`` over N particles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

__all__ = [
    "gaussian_transition_log_ratio",
    "log_weight_increment",
    "effective_sample_size",
    "normalized_weights",
    "systematic_resample",
    "SMCState",
    "AncestralStep",
    "ancestral_step",
    "signal_fraction",
    "SMCStepLog",
    "SMCResult",
    "AncestralSMC",
    "smc_ancestral_chain",
    "SMCLog",
    "describe_target",
]


def _flat_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1)


def gaussian_transition_log_ratio(x_next: torch.Tensor, mean_base: torch.Tensor, mean_proposal: torch.Tensor,
                                  std: float | torch.Tensor) -> torch.Tensor:
    """``log N(x_next; mean_base, std²) - log N(x_next; mean_proposal, std²)`` per particle.

    Both transitions share the noise level (the blend only moves the mean), so the normalisers
    cancel: ``(||x - mean_proposal||² - ||x - mean_base||²) / (2 std²)``, summed over every
    non-batch dimension.  ``std`` may be a scalar or broadcast against ``x_next``."""
    std = torch.as_tensor(std, dtype=x_next.dtype, device=x_next.device)
    if bool((std <= 0).any()):
        raise ValueError("std: the transition noise must be > 0 (a deterministic step has no density ratio)")
    d_prop = (x_next - mean_proposal) / std
    d_base = (x_next - mean_base) / std
    return 0.5 * _flat_sum(d_prop * d_prop - d_base * d_base)


def log_weight_increment(transition_log_ratio: torch.Tensor, log_potential_new: torch.Tensor,
                         log_potential_old: torch.Tensor) -> torch.Tensor:
    """One step's log-weight increment: ``log p/q`` of the transition plus the potential difference."""
    return transition_log_ratio + log_potential_new - log_potential_old


def effective_sample_size(log_weights: torch.Tensor) -> float:
    """``(sum w)² / sum w²`` from log-weights (computed stably), in [1, N]."""
    lw = log_weights.double()
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)))


def normalized_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """Weights summing to 1 (float64)."""
    return torch.softmax(log_weights.double(), dim=0)


def systematic_resample(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of N particles drawn by systematic resampling: one uniform ``u``, positions
    ``(k + u) / N``.  Particle ``j`` is copied ``floor(N w_j)`` or ``ceil(N w_j)`` times (the
    lowest-variance standard scheme)."""
    n = log_weights.shape[0]
    w = normalized_weights(log_weights)
    cumulative = torch.cumsum(w, 0)
    cumulative[-1] = 1.0  # round-off must not leave the last position unmatched
    u = torch.rand((), generator=generator, dtype=torch.float64)
    positions = (torch.arange(n, dtype=torch.float64) + u) / n
    return torch.searchsorted(cumulative, positions, right=True).clamp_(max=n - 1).to(log_weights.device)


@dataclass
class SMCState:
    """The weights of N particles along one chain, with adaptive resampling.

    ``log_weights`` are relative (reset to 0 after a resampling); ``log_normalizer`` accumulates the
    log of the mean weight at every resampling, so ``log_normalizer + logmeanexp(log_weights)`` is
    the usual unbiased estimate of ``log Z`` (the target's normalising constant relative to the
    proposal's)."""

    log_weights: torch.Tensor
    log_potential: torch.Tensor
    resample_below: float = 0.5  # resample when ESS / N falls below this
    log_normalizer: float = 0.0
    ess_history: list[float] = field(default_factory=list)
    resampled_at: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, log_potential: torch.Tensor, resample_below: float = 0.5) -> "SMCState":
        """N particles drawn from the (shared) initial distribution, weighted by the first potential."""
        if not 0.0 <= resample_below <= 1.0:
            raise ValueError(f"resample_below={resample_below}: expected a fraction of N in [0, 1]")
        return cls(log_weights=log_potential.double().clone(), log_potential=log_potential.double().clone(),
                   resample_below=resample_below)

    @property
    def num_particles(self) -> int:
        return int(self.log_weights.shape[0])

    def ess(self) -> float:
        return effective_sample_size(self.log_weights)

    def update(self, transition_log_ratio: torch.Tensor, log_potential_new: torch.Tensor) -> None:
        """Add one transition's increment; the new potential becomes the current one."""
        new = log_potential_new.double()
        self.log_weights = self.log_weights + log_weight_increment(transition_log_ratio.double(), new,
                                                                  self.log_potential)
        self.log_potential = new.clone()
        self.ess_history.append(self.ess())

    def maybe_resample(self, step: int, generator: torch.Generator | None = None,
                       force: bool = False) -> torch.Tensor | None:
        """Resample when ESS/N < ``resample_below`` (or ``force``): returns the ancestor indices the
        caller applies to its particles (and anything carried with them), else None."""
        n = self.num_particles
        if not force and self.ess() >= self.resample_below * n:
            return None
        self.log_normalizer += float(torch.logsumexp(self.log_weights, 0)) - math.log(n)
        idx = systematic_resample(self.log_weights, generator)
        self.log_weights = torch.zeros_like(self.log_weights)
        self.log_potential = self.log_potential[idx]
        self.resampled_at.append(step)
        return idx

    def log_z(self) -> float:
        """Estimate of ``log E_Q[w]`` over the whole chain so far."""
        return self.log_normalizer + float(torch.logsumexp(self.log_weights, 0)) - math.log(self.num_particles)

    def weights(self) -> torch.Tensor:
        """The particles' normalised weights now."""
        return normalized_weights(self.log_weights)


@dataclass(frozen=True)
class AncestralStep:
    """One stochastic sampler step ``x_next = x_coef * x + denoised_coef * denoised + noise_std * z``,
    ``z ~ N(0, I)``: a Gaussian transition whose mean is affine in the model's prediction ``denoised``
    (the clean-sample estimate ``x̂_0``)."""

    x_coef: float
    denoised_coef: float
    noise_std: float

    def mean(self, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        return x * self.x_coef + denoised * self.denoised_coef


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0, flow: bool = False) -> AncestralStep:
    """The ancestral step ComfyUI's ``euler_ancestral`` sampler takes from ``sigma`` to ``sigma_next``.

    Variance-preserving models in k-diffusion's scaling (``x = x_0 + sigma * eps``)::

        sigma_up   = min(sigma_next, eta * sqrt(sigma_next² (sigma² - sigma_next²) / sigma²))
        sigma_down = sqrt(sigma_next² - sigma_up²)
        x_next     = x + (sigma_down / sigma - 1) (x - x̂_0) + sigma_up * z

    At ``eta = 1`` this is the DDPM posterior ``q(x_{t-1} | x_t, x̂_0)``, i.e. DDIM with eta = 1 (the
    chain the basis LoRAs are trained on): mean ``(sigma_next²/sigma²) x + (1 - sigma_next²/sigma²) x̂_0``
    and variance ``sigma_next² (sigma² - sigma_next²) / sigma²``.

    Flow models (``x = (1 - sigma) x_0 + sigma * eps``), ComfyUI's rectified-flow form: step down to
    ``sigma_down = sigma_next (1 + (sigma_next / sigma - 1) eta)`` and renoise to ``sigma_next``::

        x_next = (1 - sigma_next) / (1 - sigma_down) * (r x + (1 - r) x̂_0) + renoise * z,   r = sigma_down / sigma
        renoise = sqrt(sigma_next² - sigma_down² (1 - sigma_next)² / (1 - sigma_down)²)

    A step to ``sigma_next = 0`` is deterministic: ``x_next = x̂_0``.
    """
    sigma, sigma_next, eta = float(sigma), float(sigma_next), float(eta)
    if not sigma > 0 or sigma_next < 0 or sigma_next > sigma:
        raise ValueError(f"sigmas: expected sigma > 0 and 0 <= sigma_next <= sigma, got {sigma} -> {sigma_next}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta}: expected 0 <= eta <= 1")
    if sigma_next == 0.0:
        return AncestralStep(0.0, 1.0, 0.0)
    if flow:
        sigma_down = sigma_next * (1.0 + (sigma_next / sigma - 1.0) * eta)
        ratio = sigma_down / sigma
        scale = (1.0 - sigma_next) / (1.0 - sigma_down)
        renoise = max(sigma_next**2 - sigma_down**2 * scale**2, 0.0) ** 0.5
        return AncestralStep(scale * ratio, scale * (1.0 - ratio), renoise)
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    ratio = sigma_down / sigma
    return AncestralStep(ratio, 1.0 - ratio, sigma_up)


def signal_fraction(sigma: float, flow: bool = False) -> float:
    """The share of signal in ``x_sigma``'s variance for unit-variance data: ``abar = 1 / (1 + sigma²)``
    for VP models in k-diffusion's scaling, ``(1 - sigma)² / ((1 - sigma)² + sigma²)`` for flow models;
    0 at pure noise, 1 at the clean sample.  Used to temper twisting potentials."""
    sigma = float(sigma)
    if flow:
        signal = (1.0 - sigma) ** 2
        return signal / (signal + sigma**2)
    return 1.0 / (1.0 + sigma**2)


@dataclass(frozen=True)
class SMCStepLog:
    """The particle system after the reweighting of step ``step`` (before its transition)."""

    step: int
    sigma: float
    ess: float  # effective sample size after reweighting, before resampling
    resampled: bool
    scored: bool  # the potential was re-evaluated at this step


@dataclass
class SMCResult:
    samples: torch.Tensor  # N equally weighted particles (resampled once more at the end)
    state: SMCState
    log: list[SMCStepLog]
    final_log_potential: torch.Tensor  # log phi_0 of every returned particle: R(x_0) / alpha

    def ess_fractions(self) -> list[float]:
        return [entry.ess / self.state.num_particles for entry in self.log]


class AncestralSMC:
    """The SMC of :func:`smc_ancestral_chain` one step at a time, for a host that drives the chain
    itself (a diffusers pipeline calls its scheduler once per step): each :meth:`step` reweights the
    particles at ``x`` by the new potential and the previous transition's ``p_base / q``, resamples
    when the ESS falls, and draws the proposal's ancestral transition; :meth:`finish` scores the
    final sample and resamples once more.  Arguments as :func:`smc_ancestral_chain`."""

    def __init__(self, log_potential: Callable[[torch.Tensor], torch.Tensor], *, eta: float = 1.0, flow: bool = False,
                 score_every: int = 1, resample_below: float = 0.5, potential_on: str = "proposal",
                 temper: bool = True, generator: torch.Generator | None = None):
        if score_every < 1:
            raise ValueError(f"score_every={score_every}: expected an integer >= 1")
        if potential_on not in ("proposal", "base"):
            raise ValueError(f"potential_on={potential_on!r}: expected 'proposal' or 'base'")
        self.log_potential, self.eta, self.flow = log_potential, float(eta), bool(flow)
        self.score_every, self.resample_below = int(score_every), float(resample_below)
        self.potential_on, self.temper, self.generator = potential_on, bool(temper), generator
        self.state: SMCState | None = None
        self.log: list[SMCStepLog] = []
        self._ratio: torch.Tensor | None = None
        self._steps = 0

    def _potential(self, clean: torch.Tensor) -> torch.Tensor:
        return self.log_potential(clean).detach().double().cpu()

    def _twist(self, denoised_q: torch.Tensor, denoised_p: torch.Tensor, sigma: float) -> torch.Tensor:
        kappa = signal_fraction(sigma, self.flow) if self.temper else 1.0
        return kappa * self._potential(denoised_q if self.potential_on == "proposal" else denoised_p)

    def step(self, x: torch.Tensor, sigma: float, sigma_next: float, denoised_q: torch.Tensor,
             denoised_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_next, ancestors)``: the particles after one reweighted, possibly resampled, proposal step
        from ``sigma`` to ``sigma_next``; ``ancestors[j]`` is the particle ``x_next[j]`` descends from
        (the identity when nothing was resampled), for anything the host carries with the particles."""
        i = self._steps
        scored = i % self.score_every == 0
        if self.state is None:
            self.state = SMCState.start(self._twist(denoised_q, denoised_p, sigma), self.resample_below)
            ess = self.state.ess()
        else:
            self.state.update(self._ratio, self._twist(denoised_q, denoised_p, sigma) if scored
                              else self.state.log_potential)
            ess = self.state.ess_history[-1]
        idx = self.state.maybe_resample(i, self.generator)
        ancestors = torch.arange(x.shape[0], device=x.device)
        if idx is not None:
            idx = idx.to(x.device)
            x, denoised_q, denoised_p, ancestors = x[idx], denoised_q[idx], denoised_p[idx], idx
        self.log.append(SMCStepLog(i, float(sigma), ess, idx is not None, scored))
        transition = ancestral_step(sigma, sigma_next, self.eta, self.flow)
        mean_p = transition.mean(x, denoised_p)
        if transition.noise_std > 0:
            mean_q = transition.mean(x, denoised_q)
            noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x)
            x = mean_q + transition.noise_std * noise
            self._ratio = gaussian_transition_log_ratio(x.double(), mean_p.double(), mean_q.double(),
                                                        transition.noise_std).cpu()
        else:
            x = mean_p
            self._ratio = torch.zeros(x.shape[0], dtype=torch.float64)
        self._steps += 1
        return x, ancestors

    def finish(self, x: torch.Tensor, clean: torch.Tensor | None = None, sigma: float = 0.0) -> SMCResult:
        """Weight the final particles ``x`` by ``log_potential(clean)`` (``clean``: None when ``x`` is the
        clean sample, else the base's prediction of it when the chain ended at ``sigma > 0``) and
        resample them once more."""
        if self.state is None:
            raise RuntimeError("AncestralSMC.finish: no step was taken")
        state = self.state
        state.update(self._ratio, self._potential(x if clean is None else clean))
        final = state.log_potential.clone()
        idx = state.maybe_resample(self._steps, self.generator, force=True)
        self.log.append(SMCStepLog(self._steps, float(sigma), state.ess_history[-1], True, True))
        return SMCResult(samples=x[idx.to(x.device)], state=state, log=self.log, final_log_potential=final[idx])


#: ``denoise(x, sigma) -> (denoised_proposal, denoised_base)``
DenoisePair = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def smc_ancestral_chain(
    denoise: DenoisePair,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    log_potential: Callable[[torch.Tensor], torch.Tensor],
    *,
    eta: float = 1.0,
    flow: bool = False,
    score_every: int = 1,
    resample_below: float = 0.5,
    potential_on: str = "proposal",
    temper: bool = True,
    generator: torch.Generator | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> SMCResult:
    """Sample the tilted path measure ``P_base · exp(log phi_0(x_0))`` with the batch of ``x`` as particles.

    Every step draws the proposal's ancestral transition (:func:`ancestral_step` on
    ``denoised_proposal``) and weights it by ``p_base / q`` (:func:`gaussian_transition_log_ratio`,
    the base's mean from ``denoised_base``); a deterministic step (``noise_std = 0``) takes the base's
    transition, which is the target's.  The twisting potential is ``log_potential`` of a clean-sample
    prediction -- the proposal's (``potential_on="proposal"``) or the base's (``"base"``) -- times
    :func:`signal_fraction` of the step's sigma when ``temper`` (else 1), evaluated every
    ``score_every`` steps (in between it is held); at the end it is ``log_potential`` of the final
    sample.  The potentials telescope, so neither choice changes the target, only when particles are
    resampled (on the report's mixture problem the tempered potential on the blend's prediction keeps
    the worst case at lambda <= 2 lowest: docs/validation.md).  Particles are resampled when ESS/N
    falls below ``resample_below`` and once at the end.  When ``sigmas[-1] > 0`` the final potential
    is taken on the base's prediction there (one more call of ``denoise``).

    Args:
        x: the initial particles, already at noise level ``sigmas[0]`` (N first).
        generator: drives the transition noise (drawn on the CPU, so a seed gives the same particles on
            every device) and the resampling.
        callback: ``callback(i, x, denoised_proposal)`` after every step (previews, progress).
    """
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2:
        raise ValueError("sigmas: expected at least two noise levels (one step)")
    chain = AncestralSMC(log_potential, eta=eta, flow=flow, score_every=score_every, resample_below=resample_below,
                         potential_on=potential_on, temper=temper, generator=generator)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised_q, denoised_p = denoise(x, sigma)
        x, ancestors = chain.step(x, sigma, sigma_next, denoised_q, denoised_p)
        if callback is not None:
            callback(i, x, denoised_q[ancestors])
    return chain.finish(x, None if sigmas[-1] == 0.0 else denoise(x, sigmas[-1])[1], sigmas[-1])


def describe_target(target: Sequence[tuple[str, float]]) -> str:
    """``p_base exp(w_1*r_1 + ...)`` for ``[(reward name, weight of its raw value in R / alpha), ...]``."""
    return "p_base exp(" + " + ".join(f"{w:.4g}*{name}" for name, w in target) + ")"


@dataclass
class SMCLog:
    """What one SMC run did, filled in when a host's sampler runs: the ComfyUI sampler node's ``DB_SMC_LOG``
    (its Report node shows :meth:`text`) and the diffusers host's ``smc_sample``."""

    target: str = ""
    particles: int = 0
    steps: list[dict] = field(default_factory=list)  # step, sigma, ess, ess_fraction, resampled, scored
    forwards_per_step: float | None = None  # network forwards per step for blend + base (None: no blend)
    log_z: float = float("nan")
    final_reward_mean: float = float("nan")  # mean of R(x_0) / alpha over the returned particles
    score_seconds: float = 0.0  # time spent decoding x̂_0 and scoring it
    scorings: int = 0
    runs: int = 0

    def fill(self, result: SMCResult, target: str, forwards: int | None, score_seconds: float,
             scorings: int) -> None:
        n = result.state.num_particles
        self.target, self.particles, self.runs = target, n, self.runs + 1
        self.steps = [{"step": e.step, "sigma": e.sigma, "ess": e.ess, "ess_fraction": e.ess / n,
                       "resampled": e.resampled, "scored": e.scored} for e in result.log]
        self.forwards_per_step = None if forwards is None else forwards / max(1, len(result.log) - 1)
        self.log_z = result.state.log_z()
        self.final_reward_mean = float(result.final_log_potential.mean())
        self.score_seconds, self.scorings = score_seconds, scorings

    def text(self) -> str:
        if not self.runs:
            return "Diffusion Blend SMC: the sampler has not run yet"
        cost = ("no blend: the proposal is the guided base" if self.forwards_per_step is None
                else f"{self.forwards_per_step:.2f} network forwards per step for blend and base")
        lines = [f"Diffusion Blend SMC: {self.particles} particles, target {self.target}",
                 f"log Z estimate {self.log_z:.4f}; mean R/alpha of the result {self.final_reward_mean:.4f}; {cost}",
                 f"scoring (VAE decode + rewards): {self.scorings} times, {self.score_seconds:.2f} s",
                 "step  sigma      ESS/N   resampled  scored"]
        for e in self.steps:
            lines.append(f"{e['step']:4d}  {e['sigma']:9.4f}  {e['ess_fraction']:.3f}   "
                         f"{'yes' if e['resampled'] else '-':9s}  {'yes' if e['scored'] else '-'}")
        return "\n".join(lines)
