"""Training fidelity: does a LoRA trained by the shipped loop approximate ``p_base exp(r / alpha_ref)``
at the ``alpha_ref`` its file states?  Problems with a known optimum, run through
:func:`~diffusion_blend.training.train.run_training` (the toy family) with the shipped defaults.

* **linear**: Gaussian base, ``r = a . x``.  The tilt is the base shifted by ``Var(r) / alpha``
  along ``a``, so the reward gain is ``Var_base(r) / alpha`` exactly and the *implied* KL weight
  of a trained LoRA is ``Var_base(r) / gain``.  Run at reward scales spanning 100x: a reward
  normalisation that leaks into the objective shows as implied != stated.
* **quadratic**: Gaussian base, ``r = -a ||x - g||^2 / 2`` (the optimal control depends on the
  state).  The tilt is Gaussian in closed form (on the base chain's own mean and covariance): its
  expected reward, and the optimum of the objective ``E[r] - alpha KL = alpha log E_base[exp(r / alpha)]``.
  Dropping the KL still to come moves the fixed point visibly (it behaves like a larger alpha).

Gains are measured with common random numbers: the trained chain and the base chain start from
the same noise and draw the same per-step noise.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch

from ..blend.lora_file import read_lora
from ..training.sampler import gaussian_log_prob, sample_trajectory
from .gmm import DTYPE, GMM
from .toy import EpsMLP, fit_base, toy_config, train_toy

__all__ = ["FidelitySettings", "gaussian_base", "fit_gaussian_base", "linear_case", "quadratic_case", "chain_samples",
           "path_alpha"]


@dataclass(frozen=True)
class FidelitySettings:
    """Sizes of a fidelity run (CI uses small ones, ``bench/validation.py`` the full ones)."""

    iterations: int = 200
    batch: int = 512
    steps: int = 50
    rank: int = 16
    lr: float = 3e-3
    eval_samples: int = 16384
    base_fit_steps: int = 800


def gaussian_base(dim: int = 2) -> GMM:
    mean = torch.tensor([[0.5, -0.2] + [0.0] * (dim - 2)], dtype=DTYPE)
    return GMM(torch.ones(1, dtype=DTYPE), mean, (torch.eye(dim, dtype=DTYPE) * 0.5)[None])


def chain_samples(policy, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_trained, x_base, path KL of the trained chain)`` from the same noise."""
    g = torch.Generator().manual_seed(seed)
    x_T = policy.initial_noise(n, g)
    state = g.get_state()

    def reference(x, t):
        with policy.reference():
            return policy.eps(x, t, None)

    traj = sample_trajectory(lambda x, t: policy.eps(x, t, None), policy.schedule, x_T, g, reference_eps_fn=reference)
    g.set_state(state)
    base = sample_trajectory(reference, policy.schedule, x_T, g)
    return traj.final.double(), base.final.double(), traj.kl.sum(1).double()


def path_alpha(eps_policy, eps_base, schedule, reward: Callable, x_T: torch.Tensor, generator) -> float:
    """The KL weight a trained chain encodes, read off its path density ratio.

    The optimum of ``E[r] - alpha KL(path)`` is ``dP*/dP_base(path) = exp(r(x_0) / alpha) / Z``, so
    along chains sampled from the policy ``L = log dP_theta/dP_base = sum_i log p_theta(x_{i+1}|x_i) -
    log p_base(x_{i+1}|x_i)`` (exact: Gaussian transitions) is linear in ``r`` with slope ``1/alpha``.
    The least-squares slope gives ``alpha = Var(r) / Cov(L, r)``.  Unlike inverting the reward
    gain, this stays well conditioned where the gain saturates in alpha (mode-seeking rewards)."""
    traj = sample_trajectory(eps_policy, schedule, x_T, generator, reference_eps_fn=eps_base)
    log_ratio = torch.zeros(x_T.shape[0], dtype=torch.float64)
    for i in range(schedule.num_steps):
        std = schedule.sigma(i)
        log_base = gaussian_log_prob(traj.latents[:, i + 1], traj.ref_means[:, i], std).double()
        log_ratio += traj.log_probs[:, i].double() - log_base
    r = reward(traj.final.double())
    cov = ((log_ratio - log_ratio.mean()) * (r - r.mean())).mean()
    return float(r.var(unbiased=False) / cov)


def _train(base: EpsMLP, reward: Callable, alpha_ref: float, s: FidelitySettings, seed: int, **overrides):
    with tempfile.TemporaryDirectory(prefix="db-fidelity-") as out:
        cfg = toy_config(alpha_ref, out, iterations=s.iterations, batch=s.batch, steps=s.steps, lr=s.lr, rank=s.rank,
                         seed=seed, **{"lora.alpha": float(s.rank), "lr_schedule": "cosine", **overrides})
        result = train_toy(base, reward, cfg)
        stated = read_lora(result.lora_path).alpha_ref
    return result, stated


def linear_case(base: EpsMLP, reward_std: float, s: FidelitySettings, seed: int = 0, **overrides) -> dict:
    """Linear reward scaled to ``reward_std`` under the data, ``alpha_ref = reward_std`` (a one-std gain)."""
    dim = base.dim
    a = torch.zeros(dim, dtype=DTYPE)
    a[:2] = torch.tensor([1.0, 0.5], dtype=DTYPE)
    a = a / a.norm() * reward_std / math.sqrt(0.5)
    reward = lambda x: x @ a  # noqa: E731
    result, stated = _train(base, reward, reward_std, s, seed, **overrides)
    x, x_base, _ = chain_samples(result.policy, s.eval_samples, seed + 1000)
    r, r_base = reward(x), reward(x_base)
    var = float(r_base.var())
    reached = float((r - r_base).mean())
    return {"case": f"linear sigma_r={reward_std:g}", "alpha_ref": stated, "implied_alpha": var / reached,
            "target_gain": var / stated, "reached_gain": reached, "reward_scale": result.reward_scale}


def _gaussian_tilt(mean: torch.Tensor, cov: torch.Tensor, a: float, goal: torch.Tensor, alpha: float):
    """Tilt of ``N(mean, cov)`` by ``exp(-a ||x - goal||^2 / (2 alpha))``: its mean, covariance, log Z."""
    eye = torch.eye(len(mean), dtype=DTYPE)
    prec = torch.linalg.inv(cov) + eye * a / alpha
    cov_t = torch.linalg.inv(prec)
    mean_t = cov_t @ (torch.linalg.solve(cov, mean) + goal * a / alpha)
    diff = mean - goal
    quad = (a / alpha) * diff @ diff - (a / alpha) ** 2 * diff @ cov_t @ diff
    log_z = -0.5 * torch.logdet(cov @ prec) - 0.5 * quad
    return mean_t, cov_t, float(log_z)


def _expected_quadratic(mean, cov, a, goal) -> float:
    diff = mean - goal
    return float(-0.5 * a * (diff @ diff + torch.trace(cov)))


def quadratic_case(base: EpsMLP, s: FidelitySettings, alpha_ref: float = 0.5, a: float = 0.5, seed: int = 0,
                   **overrides) -> dict:
    """Quadratic reward toward ``goal``; the closed forms use the base chain's measured moments."""
    dim = base.dim
    goal = torch.zeros(dim, dtype=DTYPE)
    goal[:2] = torch.tensor([2.0, 1.0], dtype=DTYPE)
    reward = lambda x: -0.5 * a * ((x - goal) ** 2).sum(-1)  # noqa: E731
    result, stated = _train(base, reward, alpha_ref, s, seed, **overrides)
    x, x_base, kl = chain_samples(result.policy, s.eval_samples, seed + 1000)
    mean, cov = x_base.mean(0), torch.cov(x_base.T)
    e_base = _expected_quadratic(mean, cov, a, goal)
    mean_t, cov_t, log_z = _gaussian_tilt(mean, cov, a, goal, stated)
    e_target = _expected_quadratic(mean_t, cov_t, a, goal)
    e_reached = e_base + float((reward(x) - reward(x_base)).mean())  # common random numbers
    objective = e_reached - stated * float(kl.mean())
    optimum = stated * log_z

    def gain_at(alpha):
        m, c, _ = _gaussian_tilt(mean, cov, a, goal, alpha)
        return _expected_quadratic(m, c, a, goal) - e_base

    return {"case": "quadratic", "alpha_ref": stated, "implied_alpha": _solve_alpha(gain_at, e_reached - e_base, stated),
            "target_gain": e_target - e_base, "reached_gain": e_reached - e_base, "objective": objective,
            "objective_optimum": optimum, "objective_rel_error": abs(objective - optimum) / abs(optimum),
            "reward_scale": result.reward_scale}


def _solve_alpha(gain_at: Callable[[float], float], gain: float, guess: float) -> float:
    """The alpha whose exact tilt has reward gain ``gain`` (the gain falls as alpha grows)."""
    if gain <= 0:
        return math.inf
    lo, hi = guess / 1000, guess * 1000
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gain_at(mid) > gain else (lo, mid)
    return math.sqrt(lo * hi)


def fit_gaussian_base(dim: int = 2, steps: int = 800, seed: int = 0) -> EpsMLP:
    return fit_base(gaussian_base(dim), steps=steps, seed=seed)
