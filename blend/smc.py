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
    "conditional_ess_fraction",
    "next_temperature",
    "RESAMPLING_SCHEMES",
    "multinomial_resample",
    "systematic_resample",
    "residual_resample",
    "resample",
    "SMCState",
    "AncestralStep",
    "ancestral_step",
    "signal_fraction",
    "SMCStepLog",
    "SMCResult",
    "TEMPER_MODES",
    "pcn_proposal",
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


def effective_sample_size(log_weights: torch.Tensor) -> float | torch.Tensor:
    """``(sum w)² / sum w²`` from log-weights (computed stably), in [1, N]: a float for ``(N,)``,
    one per group for ``(G, N)``."""
    lw = log_weights.double()
    ess = torch.exp(2 * torch.logsumexp(lw, -1) - torch.logsumexp(2 * lw, -1))
    return float(ess) if lw.dim() == 1 else ess


def normalized_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """Weights summing to 1 over the last dimension (float64)."""
    return torch.softmax(log_weights.double(), dim=-1)


def conditional_ess_fraction(log_weights: torch.Tensor, increment: torch.Tensor) -> torch.Tensor:
    """The conditional ESS of an incremental weight (Zhou, Johansen & Aston 2016), as a fraction of N:

        CESS / N = (sum_j W_j v_j)² / sum_j W_j v_j²,      W = normalised weights, v = exp(increment)

    1 when the increment is constant, 1/N when it picks one particle.  Unlike the ESS of the updated
    weights it does not count what earlier steps already spent, so a target on it moves the
    tempering forward at a steady rate between resamplings.  Shapes ``(..., N)`` -> ``(...)``."""
    log_w = torch.log_softmax(log_weights.double(), dim=-1)
    inc = increment.double()
    return torch.exp(2 * torch.logsumexp(log_w + inc, -1) - torch.logsumexp(log_w + 2 * inc, -1))


def next_temperature(log_weights: torch.Tensor, fixed_increment: torch.Tensor, raw_potential: torch.Tensor,
                     old_potential: torch.Tensor, kappa_prev: torch.Tensor, ess_target: float,
                     iterations: int = 40) -> torch.Tensor:
    """Adaptive tempering: the exponent ``kappa`` of this step's potential ``kappa * log phi`` per group.

    The increment at exponent ``kappa`` is ``fixed_increment + kappa * raw_potential - old_potential``
    (the transition's ``log p_base / q`` plus the potential difference).  ``kappa`` is the largest
    value in ``[kappa_prev, 1]`` whose :func:`conditional_ess_fraction` is at least ``ess_target``
    (bisection; 1 when even 1 keeps it, ``kappa_prev`` when even that does not).  Shapes: ``(G, N)``
    and ``(G,)``."""
    kappa_prev = kappa_prev.double()

    def cess(kappa: torch.Tensor) -> torch.Tensor:
        inc = fixed_increment.double() + kappa[:, None] * raw_potential.double() - old_potential.double()
        return conditional_ess_fraction(log_weights, inc)

    ones = torch.ones_like(kappa_prev)
    lo, hi = kappa_prev.clone(), ones.clone()
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        ok = cess(mid) >= ess_target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return torch.where(cess(ones) >= ess_target, ones, lo)


# --- resampling -----------------------------------------------------------------------------------

RESAMPLING_SCHEMES = ("systematic", "residual", "multinomial")


def _as_groups(log_weights: torch.Tensor) -> torch.Tensor:
    return log_weights.double().reshape(-1, log_weights.shape[-1])


def multinomial_resample(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """N independent draws from the weights (the highest-variance scheme; kept as the reference)."""
    w = normalized_weights(_as_groups(log_weights)).cpu()
    idx = torch.multinomial(w, w.shape[-1], replacement=True, generator=generator)
    return idx.reshape(log_weights.shape).to(log_weights.device)


def systematic_resample(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Systematic resampling: one uniform ``u`` per group, positions ``(k + u) / N``.  Particle ``j`` is
    copied ``floor(N w_j)`` or ``ceil(N w_j)`` times (the lowest-variance standard scheme).  Indices
    within each group, shaped like ``log_weights`` (``(N,)`` or ``(G, N)``)."""
    lw = _as_groups(log_weights).cpu()
    groups, n = lw.shape
    cumulative = torch.cumsum(normalized_weights(lw), -1)
    cumulative[:, -1] = 1.0  # round-off must not leave the last position unmatched
    u = torch.rand((groups, 1), generator=generator, dtype=torch.float64)
    positions = (torch.arange(n, dtype=torch.float64) + u) / n
    idx = torch.searchsorted(cumulative, positions, right=True).clamp_(max=n - 1)
    return idx.reshape(log_weights.shape).to(log_weights.device)


def residual_resample(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Residual resampling: particle ``j`` is first copied ``floor(N w_j)`` times; the remaining
    ``R = N - sum floor(N w_j)`` slots are drawn multinomially from the residuals ``N w_j - floor(N w_j)``."""
    lw = _as_groups(log_weights).cpu()
    groups, n = lw.shape
    expected = n * normalized_weights(lw)
    counts = torch.floor(expected)
    residual = expected - counts
    residual[residual.sum(-1) <= 0] = 1.0  # no slot left to draw: any valid row
    extra = torch.multinomial(residual, n, replacement=True, generator=generator)
    cumulative = torch.cumsum(counts, -1)
    slots = torch.arange(n, dtype=torch.float64).expand(groups, n).contiguous()
    kept = torch.searchsorted(cumulative, slots, right=True).clamp_(max=n - 1)
    total = cumulative[:, -1:]
    drawn = extra.gather(1, (slots - total).clamp(min=0).long())
    idx = torch.where(slots < total, kept, drawn)
    return idx.reshape(log_weights.shape).to(log_weights.device)


def resample(log_weights: torch.Tensor, scheme: str = "systematic",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestor indices (within each group) by ``scheme``: one of :data:`RESAMPLING_SCHEMES`."""
    if scheme == "systematic":
        return systematic_resample(log_weights, generator)
    if scheme == "residual":
        return residual_resample(log_weights, generator)
    if scheme == "multinomial":
        return multinomial_resample(log_weights, generator)
    raise ValueError(f"resampling={scheme!r}: expected one of {', '.join(RESAMPLING_SCHEMES)}")


@dataclass
class SMCState:
    """The weights of G independent groups of N particles along one chain, with adaptive resampling.

    Tensors are ``(G, N)`` (a state started from ``(N,)`` potentials is one group and hands back
    ``(N,)`` weights).  ``log_weights`` are relative (reset to 0 after a resampling);
    ``log_normalizer`` accumulates the log of the mean weight at every resampling, so
    ``log_normalizer + logmeanexp(log_weights)`` is the usual unbiased estimate of ``log Z`` (the
    target's normalising constant relative to the proposal's).  ``lineage`` holds the index of the
    starting particle each particle descends from: its distinct count per group measures how far
    the genealogy has collapsed."""

    log_weights: torch.Tensor
    log_potential: torch.Tensor
    resample_below: float = 0.5  # resample a group when its ESS / N falls below this
    resampling: str = "systematic"
    log_normalizer: torch.Tensor | None = None
    lineage: torch.Tensor | None = None
    ess_history: list[float] = field(default_factory=list)  # mean over groups
    resampled_at: list[int] = field(default_factory=list)  # steps at which some group resampled
    single: bool = True  # started from (N,) tensors

    @classmethod
    def start(cls, log_potential: torch.Tensor, resample_below: float = 0.5,
              resampling: str = "systematic") -> "SMCState":
        """Particles drawn from the (shared) initial distribution, weighted by the first potential:
        ``(N,)`` for one group, ``(G, N)`` for G."""
        if not 0.0 <= resample_below <= 1.0:
            raise ValueError(f"resample_below={resample_below}: expected a fraction of N in [0, 1]")
        if resampling not in RESAMPLING_SCHEMES:
            raise ValueError(f"resampling={resampling!r}: expected one of {', '.join(RESAMPLING_SCHEMES)}")
        pot = _as_groups(log_potential).clone()
        groups, n = pot.shape
        return cls(log_weights=pot.clone(), log_potential=pot, resample_below=resample_below, resampling=resampling,
                   log_normalizer=torch.zeros(groups, dtype=torch.float64),
                   lineage=torch.arange(n).expand(groups, n).clone(), single=log_potential.dim() == 1)

    @property
    def num_particles(self) -> int:
        return int(self.log_weights.shape[-1])

    @property
    def num_groups(self) -> int:
        return int(self.log_weights.shape[0])

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        return t.double().reshape(self.num_groups, self.num_particles)

    def ess_per_group(self) -> torch.Tensor:
        return effective_sample_size(self.log_weights) if self.num_groups > 1 else \
            torch.tensor([effective_sample_size(self.log_weights[0])], dtype=torch.float64)

    def ess(self) -> float:
        """The ESS (the mean over groups)."""
        return float(self.ess_per_group().mean())

    def lineages(self) -> float:
        """Distinct starting particles the current particles descend from (the mean over groups)."""
        sorted_lineage = self.lineage.sort(dim=-1).values
        distinct = 1 + (sorted_lineage[:, 1:] != sorted_lineage[:, :-1]).sum(-1)
        return float(distinct.double().mean())

    def update(self, transition_log_ratio: torch.Tensor, log_potential_new: torch.Tensor) -> None:
        """Add one transition's increment; the new potential becomes the current one."""
        new = self._grouped(log_potential_new)
        self.log_weights = self.log_weights + log_weight_increment(self._grouped(transition_log_ratio), new,
                                                                  self.log_potential)
        self.log_potential = new.clone()
        self.ess_history.append(self.ess())

    def maybe_resample(self, step: int, generator: torch.Generator | None = None,
                       force: bool = False) -> torch.Tensor | None:
        """Resample every group whose ESS/N < ``resample_below`` (all with ``force``): returns the
        ancestor indices into the flattened ``G * N`` particles (the identity for groups that kept
        their weights) for the caller to apply to its particles and what it carries with them, else
        None."""
        n = self.num_particles
        due = torch.ones(self.num_groups, dtype=torch.bool) if force else self.ess_per_group() < self.resample_below * n
        if not bool(due.any()):
            return None
        self.log_normalizer = self.log_normalizer + torch.where(
            due, torch.logsumexp(self.log_weights, -1) - math.log(n), torch.zeros_like(self.log_normalizer))
        local = resample(self.log_weights, self.resampling, generator)
        local = torch.where(due[:, None], local, torch.arange(n).expand_as(local))
        self.log_weights = torch.where(due[:, None], torch.zeros_like(self.log_weights), self.log_weights)
        self.log_potential = self.log_potential.gather(1, local)
        self.lineage = self.lineage.gather(1, local)
        self.resampled_at.append(step)
        return (local + n * torch.arange(self.num_groups)[:, None]).reshape(-1)

    def log_z_per_group(self) -> torch.Tensor:
        return self.log_normalizer + torch.logsumexp(self.log_weights, -1) - math.log(self.num_particles)

    def log_z(self) -> float:
        """Estimate of ``log E_Q[w]`` over the whole chain so far (the mean of the groups' estimates)."""
        return float(self.log_z_per_group().mean())

    def weights(self) -> torch.Tensor:
        """The particles' normalised weights now (``(N,)`` for one group started from ``(N,)``)."""
        w = normalized_weights(self.log_weights)
        return w[0] if self.single else w


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
    """The particle system after the reweighting of step ``step`` (before its transition); with
    groups, ESS, exponent and lineages are means over the groups."""

    step: int
    sigma: float
    ess: float  # effective sample size after reweighting, before resampling
    resampled: bool
    scored: bool  # the potential was re-evaluated at this step
    kappa: float = 1.0  # the exponent of the potential at this step (tempering)
    lineages: float = 0.0  # distinct starting particles the particles descend from, after resampling
    acceptance: float | None = None  # the moves' mean acceptance rate (None: no move at this step)


@dataclass
class SMCResult:
    samples: torch.Tensor  # N equally weighted particles per group (resampled once more at the end)
    state: SMCState
    log: list[SMCStepLog]
    final_log_potential: torch.Tensor  # log phi_0 of every returned particle: R(x_0) / alpha
    move_calls: int = 0  # calls of ``denoise`` the moves made (each on every particle)

    def ess_fractions(self) -> list[float]:
        return [entry.ess / self.state.num_particles for entry in self.log]


TEMPER_MODES = ("none", "signal", "adaptive")


def pcn_proposal(z: torch.Tensor, step_size: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Preconditioned Crank-Nicolson: ``z' = sqrt(1 - b²) z + b xi``, ``xi ~ N(0, I)``, reversible with
    respect to N(0, I).  A Metropolis-Hastings move with this proposal on a target ``N(z) exp(l(z))``
    accepts with probability ``min(1, exp(l(z') - l(z)))``: no gradient, no proposal density."""
    xi = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z)
    return (1.0 - step_size**2) ** 0.5 * z + step_size * xi


class AncestralSMC:
    """The SMC of :func:`smc_ancestral_chain` one step at a time, for a host that drives the chain
    itself (a diffusers pipeline calls its scheduler once per step): each :meth:`step` reweights the
    particles at ``x`` by the new potential and the previous transition's ``p_base / q``, resamples
    when the ESS falls, moves the resampled particles (``moves > 0``), and draws the proposal's
    ancestral transition; :meth:`finish` scores the final sample and resamples once more.

    **Groups.** The batch may hold ``groups`` independent particle systems of N = batch / groups
    particles each (rows ``g*N ... (g+1)*N - 1``): weights, tempering and resampling are per group.

    **Tempering** (``temper``): the potential at step t is ``kappa_t * log_potential(x̂_0)``.
    ``"none"``: ``kappa = 1``; ``"signal"`` (or True): the signal fraction of sigma_t; ``"adaptive"``:
    the largest ``kappa_t >= kappa_{t-1}`` whose conditional ESS stays above ``ess_target``
    (:func:`next_temperature`).  The final potential is ``log_potential`` of the sample at exponent 1
    in every mode, and the potentials telescope, so the target stays ``P_base · exp(R / alpha)``.

    **Moves** (``moves = k``): after a resampling, k Metropolis-Hastings steps per particle that leave
    the current target ``P_base(x_{T:t}) phi_t(x_t)`` invariant.  They move ``x_t`` given its parent
    ``x_{t+1}``, whose conditional is ``p_base(x_t | x_{t+1}) phi_t(x_t)``: writing the proposal's draw
    as ``x_t = mean_q + std * z``, the target of ``z`` is ``N(z) · [p_base/q](x_t) · phi_t(x_t)``, and
    a pCN proposal on ``z`` (:func:`pcn_proposal`, ``move_step`` = b) is accepted with
    ``exp(Δ[log p_base/q + log phi_t])``.  The MH ratio needs the parent's two means (kept from the
    transition), the potential at the proposed point and nothing else -- no gradient of the reward
    or the network.  Each move costs one call of ``denoise`` (blend and base) and one scoring on every
    particle.  Weights are untouched (the kernel is invariant); the potential and the prediction at
    each accepted point are carried with the particle to the next step's increment."""

    def __init__(self, log_potential: Callable[[torch.Tensor], torch.Tensor], *, eta: float = 1.0, flow: bool = False,
                 score_every: int = 1, resample_below: float = 0.5, potential_on: str = "proposal",
                 temper: bool | str = True, ess_target: float = 0.5, resampling: str = "systematic",
                 moves: int = 0, move_step: float = 0.5, denoise: "DenoisePair | None" = None, groups: int = 1,
                 generator: torch.Generator | None = None,
                 transition_noise: Callable[[float, float], torch.Tensor] | None = None):
        if score_every < 1:
            raise ValueError(f"score_every={score_every}: expected an integer >= 1")
        if potential_on not in ("proposal", "base"):
            raise ValueError(f"potential_on={potential_on!r}: expected 'proposal' or 'base'")
        temper = {True: "signal", False: "none"}.get(temper, temper) if isinstance(temper, bool) else temper
        if temper not in TEMPER_MODES:
            raise ValueError(f"temper={temper!r}: expected one of {', '.join(TEMPER_MODES)} (or a boolean)")
        if not 0.0 < ess_target < 1.0:
            raise ValueError(f"ess_target={ess_target}: expected a fraction of N in (0, 1)")
        if resampling not in RESAMPLING_SCHEMES:
            raise ValueError(f"resampling={resampling!r}: expected one of {', '.join(RESAMPLING_SCHEMES)}")
        if moves < 0:
            raise ValueError(f"moves={moves}: expected an integer >= 0")
        if moves and denoise is None:
            raise ValueError("moves > 0 needs denoise (each move evaluates the models at the proposed point)")
        if not 0.0 < move_step <= 1.0:
            raise ValueError(f"move_step={move_step}: expected 0 < step <= 1 (1 redraws the transition noise)")
        if groups < 1:
            raise ValueError(f"groups={groups}: expected an integer >= 1")
        self.log_potential, self.eta, self.flow = log_potential, float(eta), bool(flow)
        self.score_every, self.resample_below = int(score_every), float(resample_below)
        self.potential_on, self.temper, self.ess_target = potential_on, temper, float(ess_target)
        self.resampling, self.moves, self.move_step = resampling, int(moves), float(move_step)
        self.denoise, self.groups, self.generator = denoise, int(groups), generator
        self.transition_noise = transition_noise
        self.state: SMCState | None = None
        self.log: list[SMCStepLog] = []
        self.move_calls = 0
        self._ratio: torch.Tensor | None = None  # log p_base/q of the last transition, (G*N,)
        self._parent: tuple | None = None  # (mean_p, mean_q, std, z) of the last transition
        self._kappa = torch.zeros(self.groups, dtype=torch.float64)
        self._steps = 0

    # -- potentials ------------------------------------------------------------------------------

    def _raw(self, denoised_q: torch.Tensor, denoised_p: torch.Tensor) -> torch.Tensor:
        clean = denoised_q if self.potential_on == "proposal" else denoised_p
        return self.log_potential(clean).detach().double().cpu().reshape(self.groups, -1)

    def _temperature(self, sigma: float, raw: torch.Tensor, fixed: torch.Tensor, old: torch.Tensor,
                     log_weights: torch.Tensor) -> torch.Tensor:
        if self.temper == "none":
            return torch.ones(self.groups, dtype=torch.float64)
        if self.temper == "signal":
            return torch.full((self.groups,), signal_fraction(sigma, self.flow), dtype=torch.float64)
        return next_temperature(log_weights, fixed, raw, old, self._kappa, self.ess_target)

    # -- one step --------------------------------------------------------------------------------

    def step(self, x: torch.Tensor, sigma: float, sigma_next: float, denoised_q: torch.Tensor,
             denoised_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_next, ancestors)``: the particles after one reweighted, possibly resampled and moved,
        proposal step from ``sigma`` to ``sigma_next``; ``ancestors[j]`` is the particle ``x_next[j]``
        descends from (the identity when nothing was resampled), for anything the host carries with
        the particles.  ``denoised_q`` of a moved particle is not its ancestor's: :attr:`last_denoised`
        holds the proposal's prediction at every particle's current point."""
        i = self._steps
        scored = i % self.score_every == 0
        if x.shape[0] % self.groups:
            raise ValueError(f"batch of {x.shape[0]} particles is not {self.groups} groups of equal size")
        if self.state is None:
            raw = self._raw(denoised_q, denoised_p)
            zeros = torch.zeros_like(raw)
            self._kappa = self._temperature(sigma, raw, zeros, zeros, zeros)
            self.state = SMCState.start(self._kappa[:, None] * raw, self.resample_below, self.resampling)
            self.state.single = self.groups == 1
            ess = self.state.ess()
        else:
            state = self.state
            if scored:
                raw = self._raw(denoised_q, denoised_p)
                ratio = state._grouped(self._ratio)
                self._kappa = self._temperature(sigma, raw, ratio, state.log_potential, state.log_weights)
                new = self._kappa[:, None] * raw
            else:
                new = state.log_potential
            state.update(self._ratio, new)
            ess = state.ess_history[-1]
        idx = self.state.maybe_resample(i, self.generator)
        ancestors = torch.arange(x.shape[0], device=x.device)
        acceptance = None
        if idx is not None:
            x, denoised_q, denoised_p, ancestors = x[idx.to(x.device)], denoised_q[idx.to(x.device)], \
                denoised_p[idx.to(x.device)], idx.to(x.device)
            if self._parent is not None:
                mean_p, mean_q, std, z = self._parent
                dev = idx.to(mean_p.device)
                self._parent = (mean_p[dev], mean_q[dev], std, z[dev])
                self._ratio = self._ratio[idx.cpu()]
            if self.moves and self._parent is not None:
                x, denoised_q, denoised_p, acceptance = self._move(x, sigma, denoised_q, denoised_p, scored)
        self.last_denoised = denoised_q
        self.log.append(SMCStepLog(i, float(sigma), ess, idx is not None, scored, float(self._kappa.mean()),
                                   self.state.lineages(), acceptance))
        transition = ancestral_step(sigma, sigma_next, self.eta, self.flow)
        mean_p = transition.mean(x, denoised_p)
        if transition.noise_std > 0:
            mean_q = transition.mean(x, denoised_q)
            if self.transition_noise is not None:  # the host's own noise stream (its sampler's, same seed)
                noise = self.transition_noise(sigma, sigma_next).to(x)
            else:
                noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x)
            x = mean_q + transition.noise_std * noise
            self._ratio = gaussian_transition_log_ratio(x.double(), mean_p.double(), mean_q.double(),
                                                        transition.noise_std).cpu()
            self._parent = (mean_p, mean_q, transition.noise_std, noise) if self.moves else None
        else:
            x = mean_p
            self._ratio = torch.zeros(x.shape[0], dtype=torch.float64)
            self._parent = None  # a deterministic step: nothing to move
        self._steps += 1
        return x, ancestors

    def _move(self, x: torch.Tensor, sigma: float, denoised_q: torch.Tensor, denoised_p: torch.Tensor,
              scored: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``moves`` pCN Metropolis-Hastings steps on every particle's last transition noise (see the
        class docstring); returns the moved particles, their predictions and the acceptance rate."""
        state = self.state
        mean_p, mean_q, std, z = self._parent
        ratio = self._ratio.clone()
        potential = state.log_potential.reshape(-1).clone()
        kappa = self._kappa.repeat_interleave(state.num_particles)
        accepted = torch.zeros_like(ratio)
        shape = (-1,) + (1,) * (x.dim() - 1)
        for _ in range(self.moves):
            z_new = pcn_proposal(z, self.move_step, self.generator)
            x_new = mean_q + std * z_new
            ratio_new = gaussian_transition_log_ratio(x_new.double(), mean_p.double(), mean_q.double(), std).cpu()
            dq_new, dp_new = self.denoise(x_new, sigma)
            self.move_calls += 1
            potential_new = kappa * self._raw(dq_new, dp_new).reshape(-1) if scored else potential
            log_accept = ratio_new + potential_new - ratio - potential
            u = torch.rand(log_accept.shape, generator=self.generator, dtype=torch.float64)
            accept = torch.log(u) < log_accept
            take = accept.to(x.device).view(shape)
            x, z = torch.where(take, x_new, x), torch.where(take, z_new, z)
            denoised_q, denoised_p = torch.where(take, dq_new, denoised_q), torch.where(take, dp_new, denoised_p)
            ratio, potential = torch.where(accept, ratio_new, ratio), torch.where(accept, potential_new, potential)
            accepted += accept.double()
        state.log_potential = potential.reshape(state.num_groups, state.num_particles)
        self._ratio, self._parent = ratio, (mean_p, mean_q, std, z)
        return x, denoised_q, denoised_p, float(accepted.mean()) / self.moves

    def finish(self, x: torch.Tensor, clean: torch.Tensor | None = None, sigma: float = 0.0) -> SMCResult:
        """Weight the final particles ``x`` by ``log_potential(clean)`` at exponent 1 (``clean``: None
        when ``x`` is the clean sample, else the base's prediction of it when the chain ended at
        ``sigma > 0``) and resample them once more."""
        if self.state is None:
            raise RuntimeError("AncestralSMC.finish: no step was taken")
        state = self.state
        final_raw = self.log_potential(x if clean is None else clean).detach().double().cpu()
        state.update(self._ratio, final_raw)
        final = state.log_potential.reshape(-1).clone()
        idx = state.maybe_resample(self._steps, self.generator, force=True)
        self._kappa = torch.ones(self.groups, dtype=torch.float64)
        self.log.append(SMCStepLog(self._steps, float(sigma), state.ess_history[-1], True, True, 1.0,
                                   state.lineages(), None))
        return SMCResult(samples=x[idx.to(x.device)], state=state, log=self.log, final_log_potential=final[idx],
                         move_calls=self.move_calls)


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
    temper: bool | str = True,
    ess_target: float = 0.5,
    resampling: str = "systematic",
    moves: int = 0,
    move_step: float = 0.5,
    groups: int = 1,
    generator: torch.Generator | None = None,
    transition_noise: Callable[[float, float], torch.Tensor] | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> SMCResult:
    """Sample the tilted path measure ``P_base · exp(log phi_0(x_0))`` with the batch of ``x`` as particles.

    Every step draws the proposal's ancestral transition (:func:`ancestral_step` on
    ``denoised_proposal``) and weights it by ``p_base / q`` (:func:`gaussian_transition_log_ratio`,
    the base's mean from ``denoised_base``); a deterministic step (``noise_std = 0``) takes the base's
    transition, which is the target's.  The twisting potential is ``log_potential`` of a clean-sample
    prediction -- the proposal's (``potential_on="proposal"``) or the base's (``"base"``) -- times
    the tempering exponent (``temper``: see :class:`AncestralSMC`), evaluated every ``score_every``
    steps (in between it is held); at the end it is ``log_potential`` of the final sample.  The
    potentials telescope, so none of these choices changes the target, only when particles are
    resampled.  Particles are resampled (``resampling``: one of :data:`RESAMPLING_SCHEMES`) when
    ESS/N falls below ``resample_below`` and once at the end, and moved ``moves`` times after each
    resampling.  When ``sigmas[-1] > 0`` the final potential is taken on the base's prediction
    there (one more call of ``denoise``).

    Args:
        x: the initial particles, already at noise level ``sigmas[0]`` (N first; ``groups`` systems
            of equal size one after the other).
        generator: drives the transition noise (drawn on the CPU, so a seed gives the same particles on
            every device), the resampling and the moves.
        transition_noise: ``transition_noise(sigma, sigma_next)``, the standard normal noise of each
            stochastic step in place of ``generator``'s: a host's own noise sampler, so that at zero
            reward the chain is that host's ancestral sampler draw for draw.
        callback: ``callback(i, x, denoised_proposal)`` after every step (previews, progress).
    """
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2:
        raise ValueError("sigmas: expected at least two noise levels (one step)")
    chain = AncestralSMC(log_potential, eta=eta, flow=flow, score_every=score_every, resample_below=resample_below,
                         potential_on=potential_on, temper=temper, ess_target=ess_target, resampling=resampling,
                         moves=moves, move_step=move_step, denoise=denoise, groups=groups, generator=generator,
                         transition_noise=transition_noise)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised_q, denoised_p = denoise(x, sigma)
        x, ancestors = chain.step(x, sigma, sigma_next, denoised_q, denoised_p)
        if callback is not None:
            callback(i, x, chain.last_denoised)
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
    #: step, sigma, ess, ess_fraction, resampled, scored, kappa, lineages, acceptance
    steps: list[dict] = field(default_factory=list)
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
                       "resampled": e.resampled, "scored": e.scored, "kappa": e.kappa, "lineages": e.lineages,
                       "acceptance": e.acceptance} for e in result.log]
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
                 "step  sigma      ESS/N   resampled  scored  exponent  lineages  accepted"]
        for e in self.steps:
            accepted = "-" if e.get("acceptance") is None else f"{e['acceptance']:.2f}"
            lines.append(f"{e['step']:4d}  {e['sigma']:9.4f}  {e['ess_fraction']:.3f}   "
                         f"{'yes' if e['resampled'] else '-':9s}  {'yes' if e['scored'] else '-':6s}  "
                         f"{e.get('kappa', 1.0):8.3f}  {e.get('lineages', 0.0):8.1f}  {accepted}")
        return "\n".join(lines)
