"""Sampling the toy problem with the blend of ``blend/`` (the functions the nodes use).

Models are noise predictors ``eps(x, i)`` at sampling step ``i`` of a
:class:`~diffusion_blend.training.sampler.DDIMSchedule` (ancestral with ``eta = 1``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..blend.coefficients import affine_coefficients, blend_coefficients
from ..blend.runtime import combine, make_plan
from ..blend.smc import SMCState, gaussian_transition_log_ratio
from ..training.sampler import DDIMSchedule, ddim_step_stats
from .gmm import DTYPE, GMM, noised_eps

__all__ = ["EpsModel", "exact_model", "db_eps", "sample", "sample_db", "sample_db_ls", "sample_db_smc", "sample_code",
           "sample_rgg", "mmd2", "mmd_test", "weighted_error"]

EpsModel = Callable[[torch.Tensor, int], torch.Tensor]


def exact_model(gmm: GMM, schedule: DDIMSchedule) -> EpsModel:
    """The optimal noise predictor of ``gmm`` at every sampling step."""
    return lambda x, i: noised_eps(gmm, x, schedule.abar(i)[0])


def db_eps(coefficients: Sequence[float], base: EpsModel, bases: Sequence[EpsModel]) -> EpsModel:
    """Diffusion Blend over separate models: the nodes' plan (``make_plan``) and ``combine``."""
    plan = make_plan("exact", coefficients)

    def eps(x, i):
        outputs = [base(x, i) if not seg else bases[seg[0][0]](x, i) for seg in plan.segments]
        return combine(outputs, plan.weights)

    return eps


def sample(eps: EpsModel, schedule: DDIMSchedule, n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, dim, generator=generator, dtype=DTYPE)
    for i in range(schedule.num_steps):
        stats = ddim_step_stats(schedule, i, x, eps(x, i))
        x = stats.mean + stats.std * torch.randn(x.shape, generator=generator, dtype=DTYPE)
    return x


def sample_db(weights, alpha_refs, kl_scale, base, bases, schedule, n, dim, generator, normalize=True):
    c = blend_coefficients(weights, alpha_refs, kl_scale, normalize)
    return sample(db_eps(c, base, bases), schedule, n, dim, generator)


def sample_db_ls(weights, alpha_refs, kl_scale, base, bases, schedule, n, dim, generator, normalize=True):
    """DB-MPA-LS: every chain draws, at every step, one model with the affine coefficients as
    probabilities (checked non-negative by ``make_plan('stochastic')``)."""
    c = blend_coefficients(weights, alpha_refs, kl_scale, normalize)
    make_plan("stochastic", c)  # raises on negative coefficients
    probs = torch.tensor(affine_coefficients(c), dtype=DTYPE)
    models = [base, *bases]

    def eps(x, i):
        pick = torch.multinomial(probs, x.shape[0], replacement=True, generator=generator)
        out = torch.empty_like(x)
        for j, model in enumerate(models):
            rows = pick == j
            if rows.any():
                out[rows] = model(x[rows], i)
        return out

    return sample(eps, schedule, n, dim, generator)


def sample_db_smc(weights, alpha_refs, kl_scale, base, bases, schedule, n, dim, generator, rewards,
                  particles: int = 32, resample_below: float = 0.5, normalize: bool = True,
                  potential_on: str = "base", temper: bool = False) -> torch.Tensor:
    """DB-SMC: the blend as the proposal, corrected toward the exact tilted target
    ``p_base exp(sum_i w~_i r_i / alpha)`` by sequential Monte Carlo (:mod:`blend.smc`).

    ``n`` samples come from ``n // particles`` independent groups of ``particles`` particles.  Each
    transition is weighted by ``p_base / q_blend`` (both Gaussian, same std: the base's mean is
    computed from ``eps_base``, which the blend evaluates anyway), and by the change of the twisting
    potential ``R(x̂_0) / alpha`` on the base's prediction of the clean sample; at the end the
    potential is the reward itself.  A deterministic step (std 0) takes the base's transition, which
    is the target's.  Every group is resampled when its ESS falls below
    ``resample_below * particles`` and once at the end, so the returned samples are equally weighted.

    ``potential_on="blend"`` takes the potential on the blend's x̂_0 instead of the base's;
    ``temper=True`` multiplies it by abar_t (0 at pure noise, 1 at the clean sample).  Neither
    changes the target (the potentials telescope); they change when particles are resampled."""
    if n % particles:
        raise ValueError(f"n={n} is not a multiple of particles={particles}")
    if potential_on not in ("base", "blend"):
        raise ValueError(f"potential_on={potential_on!r}: expected 'base' or 'blend'")
    c = blend_coefficients(weights, alpha_refs, kl_scale, normalize)
    w_sum = sum(weights) if normalize else 1.0
    w_tilde = [w / w_sum for w in weights]
    alpha = sum(w * a for w, a in zip(w_tilde, alpha_refs)) / sum(w_tilde) / kl_scale
    reward = lambda x: sum(w * r(x) for w, r in zip(w_tilde, rewards)) / alpha  # noqa: E731
    groups = n // particles
    blend = db_eps(c, base, bases)

    def x0_hat(x, eps, i):
        abar = schedule.abar(i)[0]
        return (x - (1 - abar) ** 0.5 * eps) / abar ** 0.5

    def twist(x, eps_b, eps_q, i):
        kappa = float(schedule.abar(i)[0]) if temper else 1.0
        return kappa * reward(x0_hat(x, eps_b if potential_on == "base" else eps_q, i))

    x = torch.randn(n, dim, generator=generator, dtype=DTYPE)
    eps_base = base(x, 0)
    eps_q = blend(x, 0)  # the blend's prediction at the current x, carried to the next transition
    states = [SMCState.start(p, resample_below) for p in twist(x, eps_base, eps_q, 0).view(groups, particles)]
    last = schedule.num_steps - 1
    for i in range(schedule.num_steps):
        p_mean = ddim_step_stats(schedule, i, x, eps_base).mean
        std = schedule.sigma(i)
        if std > 0:
            q_mean = ddim_step_stats(schedule, i, x, eps_q).mean
            x = q_mean + std * torch.randn(x.shape, generator=generator, dtype=DTYPE)
            ratio = gaussian_transition_log_ratio(x, p_mean, q_mean, std).view(groups, particles)
        else:  # a deterministic step (the last one, to abar = 1): take the target's (the base's) transition
            x = p_mean
            ratio = torch.zeros(groups, particles, dtype=DTYPE)
        if i < last:
            eps_base, eps_q = base(x, i + 1), blend(x, i + 1)
            potential = twist(x, eps_base, eps_q, i + 1)
        else:
            potential = reward(x)
        potential = potential.view(groups, particles)
        rows = torch.arange(n).view(groups, particles)
        for g, state in enumerate(states):
            state.update(ratio[g], potential[g])
            idx = state.maybe_resample(i, generator, force=(i == last))
            if idx is not None:
                rows[g] = rows[g][idx]
        order = rows.reshape(-1)
        x = x[order]
        if i < last:
            eps_base, eps_q = eps_base[order], eps_q[order]
    return x


def _target_reward(weights, alpha_refs, kl_scale, rewards):
    """``(x -> R(x) / alpha)`` of the tilted target the blend at ``(w, lambda)`` stands for."""
    w_tilde = [w / sum(weights) for w in weights]
    alpha = sum(w * a for w, a in zip(w_tilde, alpha_refs)) / kl_scale
    return lambda x: sum(w * r(x) for w, r in zip(w_tilde, rewards)) / alpha


def _x0_hat(schedule: DDIMSchedule, x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
    abar = schedule.abar(i)[0]
    return (x - (1 - abar) ** 0.5 * eps) / abar ** 0.5


def sample_code(weights, alpha_refs, kl_scale, base, schedule, n, dim, generator, rewards, candidates: int = 8,
                block: int = 5) -> torch.Tensor:
    """CoDe (blockwise best-of-N on the base model), in its soft form: every ``block`` steps each
    sample draws ``candidates`` continuations of the base chain and keeps one with probability
    ``∝ exp(R(x̂_0) / alpha)`` (the tilt's weights on the predicted clean sample; the last block
    scores the final sample).  Needs only the base model and the rewards."""
    score = _target_reward(weights, alpha_refs, kl_scale, rewards)
    x = torch.randn(n, dim, generator=generator, dtype=DTYPE)
    steps = schedule.num_steps
    for start in range(0, steps, block):
        end = min(start + block, steps)
        xs = x.repeat_interleave(candidates, dim=0)
        for i in range(start, end):
            stats = ddim_step_stats(schedule, i, xs, base(xs, i))
            xs = stats.mean + stats.std * torch.randn(xs.shape, generator=generator, dtype=DTYPE)
        clean = xs if end == steps else _x0_hat(schedule, xs, base(xs, end), end)
        logits = score(clean).view(n, candidates)
        pick = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
        x = xs.view(n, candidates, dim)[torch.arange(n), pick]
    return x


def sample_rgg(weights, alpha_refs, kl_scale, base, schedule, n, dim, generator, rewards,
               guidance: float = 1.0) -> torch.Tensor:
    """RGG (reward-gradient guidance, DPS-style) on the base model: the score is shifted by
    ``guidance * grad_x R(x̂_0(x_t)) / alpha``, i.e. ``eps = eps_base - sqrt(1 - abar_t) * guidance *
    grad_x R(x̂_0) / alpha``, the gradient taken through the base's prediction x̂_0."""
    score = _target_reward(weights, alpha_refs, kl_scale, rewards)

    def eps(x, i):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            e = base(x, i)
            grad, = torch.autograd.grad(score(_x0_hat(schedule, x, e, i)).sum(), x)
        abar = schedule.abar(i)[0]
        return e.detach() - (1 - abar) ** 0.5 * guidance * grad

    return sample(eps, schedule, n, dim, generator)


def weighted_error(w, e, e_target, e_base) -> float:
    """``|sum_i w_i (E[r_i] - E*[r_i])| / |sum_i w_i (E*[r_i] - E_base[r_i])|``: the error of the
    weighted objective as a fraction of its alignment gain."""
    gain = sum(wi * (t - b) for wi, t, b in zip(w, e_target, e_base))
    return abs(sum(wi * (a - t) for wi, a, t in zip(w, e, e_target))) / abs(gain)


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with a Gaussian kernel (median heuristic bandwidth by default)."""
    z = torch.cat([x, y]).double()
    d2 = torch.cdist(z, z).pow(2)
    if bandwidth is None:
        bandwidth = float(d2[d2 > 0].median().sqrt())
    k = torch.exp(-d2 / (2 * bandwidth**2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
                 - 2 * kxy.mean())


def mmd_test(x: torch.Tensor, y: torch.Tensor, permutations: int, generator: torch.Generator) -> tuple[float, float]:
    """``(mmd2, p-value)`` of a permutation test of ``x ~ y`` (Gaussian kernel, median bandwidth).

    With indicator vectors ``a`` (rows of x) and ``b = 1 - a``, the unbiased statistic is
    ``(a'Ka - n)/(n(n-1)) + (b'Kb - m)/(m(m-1)) - 2 a'Kb/(nm)`` (``K`` has a unit diagonal), so each
    permutation costs one matrix-vector product.
    """
    z = torch.cat([x, y]).double()
    d2 = torch.cdist(z, z).pow(2)
    bw = float(d2[d2 > 0].median().sqrt())
    k = torch.exp(-d2 / (2 * bw**2))
    n, m = len(x), len(y)
    total = k.sum()

    def stat(a: torch.Tensor) -> float:
        ka = k @ a
        s_xx = float(a @ ka)
        s_xy = float(ka.sum()) - s_xx
        s_yy = float(total) - 2 * s_xy - s_xx
        return (s_xx - n) / (n * (n - 1)) + (s_yy - m) / (m * (m - 1)) - 2 * s_xy / (n * m)

    a0 = torch.cat([torch.ones(n), torch.zeros(m)]).double()
    observed = stat(a0)
    exceed = sum(stat(a0[torch.randperm(n + m, generator=generator)]) >= observed for _ in range(permutations))
    return observed, (1 + exceed) / (1 + permutations)
