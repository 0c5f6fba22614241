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
the same noise and draw the same per-step noise.  Each case can be read through several samplers
(:mod:`.samplers`: the training chain, DDIM's ODE, the flow schedule's Euler and ancestral steps):
the target is the tilt of the base *as that sampler draws it*, so a LoRA that learned the tilted
score (Adjoint Matching on a memoryless chain) meets it everywhere, one that learned a
chain-specific control (DPOK) only on its own chain.

Two targets, one per promise (the row's ``target``):

* ``chain``: the tilt of the base *as the training chain draws it* (DPOK's promise, ``db.chain``):
  the linear gain ``Var_chain(r) / alpha``, the quadratic closed form on the chain's moments;
* ``score``: what the exact tilted score (of the Gaussian the MLP base was fitted to, in closed
  form) gives through the same sampler, from the same noise, against the exact base score (Adjoint
  Matching's promise: the LoRA *is* the tilted score, so every sampler's discretisation and its start
  from pure noise act on both alike).  At 20 steps the two targets differ by 20-35 % on DDPM (the
  chain under-disperses the base), which is why a chain-trained LoRA only holds for its chain.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch

from ..blend.lora_file import read_lora
from ..training.sampler import gaussian_log_prob, sample_trajectory
from .gmm import DTYPE, GMM, noised_eps
from .samplers import sample_chain
from .toy import EpsMLP, fit_base, toy_config, train_toy

__all__ = ["FidelitySettings", "gaussian_base", "fit_gaussian_base", "linear_case", "linear_rows", "quadratic_case",
           "quadratic_rows", "chain_samples", "sampler_samples", "score_gain", "path_alpha"]


@dataclass(frozen=True)
class FidelitySettings:
    """Sizes of a fidelity run (CI uses small ones, ``bench/validation.py`` the full ones)."""

    iterations: int = 200
    batch: int = 512
    steps: int = 50
    rank: int = 16
    lr: float = 3e-3
    eval_samples: int = 16384
    base_fit_steps: int = 2000  # the MLP base's fit to the Gaussian (the score target assumes it exact)


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


def sampler_samples(policy, n: int, seed: int, sampler: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_trained, x_base)`` drawn by ``sampler`` (:data:`.samplers.SAMPLERS`) from the same noise."""
    g = torch.Generator().manual_seed(seed)
    x_T = policy.initial_noise(n, g)
    state = g.get_state()

    def base_eps(x, t):
        with policy.reference():
            return policy.eps(x, t, None)

    x = sample_chain(lambda x, t: policy.eps(x, t, None), policy.schedule, sampler, x_T, g)
    g.set_state(state)
    return x.double(), sample_chain(base_eps, policy.schedule, sampler, x_T, g).double()


def score_gain(schedule, sampler: str, base: GMM, tilted: GMM, reward: Callable, n: int, seed: int) -> float:
    """``E[r]`` of the exact ``tilted`` score minus that of the exact ``base`` score, both drawn by
    ``sampler`` on ``schedule``'s noise levels from the same noise (the ``score`` target)."""

    def exact(gmm):
        return lambda x, t: noised_eps(gmm, x.double(), float(schedule.alphas_cumprod[int(t[0])])).to(x.dtype)

    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, base.dim, generator=g, dtype=DTYPE)
    state = g.get_state()
    x_tilted = sample_chain(exact(tilted), schedule, sampler, x_T, g)
    g.set_state(state)
    return float((reward(x_tilted) - reward(sample_chain(exact(base), schedule, sampler, x_T, g))).mean())


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
    """:func:`linear_rows` read on the training chain alone."""
    return linear_rows(base, reward_std, s, seed, **overrides)[0]


def linear_rows(base: EpsMLP, reward_std: float, s: FidelitySettings, seed: int = 0,
                samplers: tuple[str, ...] = ("ddpm",), **overrides) -> list[dict]:
    """Linear reward scaled to ``reward_std`` under the data, ``alpha_ref = reward_std`` (a one-std
    gain); one LoRA, one row per sampler.  Target ``chain`` (DPOK): ``Var(r) / alpha`` with the base's
    variance as the sampler draws it; ``score`` (Adjoint Matching): the exact tilted score's gain
    through the sampler, which is linear in ``1 / alpha`` (the tilt of a Gaussian by ``a . x / alpha``
    shifts its mean by ``cov a / alpha``; every sampler here is affine in a Gaussian's mean)."""
    dim = base.dim
    a = torch.zeros(dim, dtype=DTYPE)
    a[:2] = torch.tensor([1.0, 0.5], dtype=DTYPE)
    a = a / a.norm() * reward_std / math.sqrt(0.5)
    reward = lambda x: x @ a  # noqa: E731
    result, stated = _train(base, reward, reward_std, s, seed, **overrides)
    ideal = gaussian_base(dim)
    tilted = GMM(ideal.weights, ideal.means + (ideal.covs[0] @ a)[None] / stated, ideal.covs)
    rows = []
    for sampler in samplers:
        x, x_base = sampler_samples(result.policy, s.eval_samples, seed + 1000, sampler)
        r, r_base = reward(x), reward(x_base)
        reached = float((r - r_base).mean())
        if _target(overrides) == "score":
            target = score_gain(result.policy.schedule, sampler, ideal, tilted, reward, s.eval_samples, seed + 2000)
        else:
            target = float(r_base.var()) / stated
        rows.append({"case": f"linear sigma_r={reward_std:g}", "algorithm": _algorithm(overrides), "sampler": sampler,
                     "target": _target(overrides), "alpha_ref": stated,
                     "implied_alpha": stated * target / reached if reached > 0 else math.inf,
                     "target_gain": target, "reached_gain": reached, "reward_scale": result.reward_scale})
    return rows


def _algorithm(overrides: dict) -> str:
    return overrides.get("algorithm.name", "dpok")


def _target(overrides: dict) -> str:
    """The promise a LoRA is held to: its training chain's tilt (DPOK), the tilted score (AM)."""
    return "score" if _algorithm(overrides) == "adjoint_matching" else "chain"


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
    """:func:`quadratic_rows` read on the training chain alone."""
    return quadratic_rows(base, s, alpha_ref, a, seed, **overrides)[0]


def quadratic_rows(base: EpsMLP, s: FidelitySettings, alpha_ref: float = 0.5, a: float = 0.5, seed: int = 0,
                   samplers: tuple[str, ...] = ("ddpm",), **overrides) -> list[dict]:
    """Quadratic reward toward ``goal``; one LoRA, one row per sampler.  Target ``chain``: the closed
    form on the base's moments as the chain draws it, with the objective and its optimum (path KL);
    ``score``: the exact tilted Gaussian's score through the sampler.  The implied alpha is the one
    whose target gain equals the reached gain."""
    dim = base.dim
    goal = torch.zeros(dim, dtype=DTYPE)
    goal[:2] = torch.tensor([2.0, 1.0], dtype=DTYPE)
    reward = lambda x: -0.5 * a * ((x - goal) ** 2).sum(-1)  # noqa: E731
    result, stated = _train(base, reward, alpha_ref, s, seed, **overrides)
    rows = []
    ideal = gaussian_base(dim)

    def ideal_tilt(alpha):
        m, c, _ = _gaussian_tilt(ideal.means[0], ideal.covs[0], a, goal, alpha)
        return GMM(ideal.weights, m[None], c[None])

    for sampler in samplers:
        if sampler == "ddpm":
            x, x_base, kl = chain_samples(result.policy, s.eval_samples, seed + 1000)
        else:
            (x, x_base), kl = sampler_samples(result.policy, s.eval_samples, seed + 1000, sampler), None
        reached = float((reward(x) - reward(x_base)).mean())  # common random numbers
        mean, cov = x_base.mean(0), torch.cov(x_base.T)
        e_base = _expected_quadratic(mean, cov, a, goal)
        if _target(overrides) == "score":
            def gain_at(alpha, sampler=sampler):
                return score_gain(result.policy.schedule, sampler, ideal, ideal_tilt(alpha), reward, s.eval_samples,
                                  seed + 2000)
        else:
            def gain_at(alpha, mean=mean, cov=cov, e_base=e_base):
                m, c, _ = _gaussian_tilt(mean, cov, a, goal, alpha)
                return _expected_quadratic(m, c, a, goal) - e_base

        row = {"case": "quadratic", "algorithm": _algorithm(overrides), "sampler": sampler, "target": _target(overrides),
               "alpha_ref": stated, "implied_alpha": _solve_alpha(gain_at, reached, stated),
               "target_gain": gain_at(stated), "reached_gain": reached, "reward_scale": result.reward_scale}
        if kl is not None and _target(overrides) == "chain":  # E[r] - alpha KL(path) and its optimum on the chain
            _, _, log_z = _gaussian_tilt(mean, cov, a, goal, stated)
            objective, optimum = e_base + reached - stated * float(kl.mean()), stated * log_z
            row.update(objective=objective, objective_optimum=optimum,
                       objective_rel_error=abs(objective - optimum) / abs(optimum))
        rows.append(row)
    return rows


def _solve_alpha(gain_at: Callable[[float], float], gain: float, guess: float, iterations: int = 24) -> float:
    """The alpha whose exact tilt has reward gain ``gain`` (the gain falls as alpha grows); bisection
    in log alpha within ``guess`` x 10^(+-3): 24 halvings leave a factor exp(13.8 / 2^24), 1e-6."""
    if gain <= 0:
        return math.inf
    lo, hi = guess / 1000, guess * 1000
    for _ in range(iterations):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gain_at(mid) > gain else (lo, mid)
    return math.sqrt(lo * hi)


def fit_gaussian_base(dim: int = 2, steps: int = 800, seed: int = 0) -> EpsMLP:
    return fit_base(gaussian_base(dim), steps=steps, seed=seed)
