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

import torch

__all__ = [
    "gaussian_transition_log_ratio",
    "log_weight_increment",
    "effective_sample_size",
    "normalized_weights",
    "systematic_resample",
    "SMCState",
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
