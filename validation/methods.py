"""Sampling the toy problem with the blend of ``blend/`` (the functions the nodes use).

Models are noise predictors ``eps(x, i)`` at sampling step ``i`` of a
:class:`~diffusion_blend.training.sampler.DDIMSchedule` (ancestral with ``eta = 1``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..blend.coefficients import affine_coefficients, blend_coefficients
from ..blend.runtime import combine, make_plan
from ..blend.smc import AncestralSMC
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
                  potential_on: str = "base", temper: bool | str = False, resampling: str = "systematic",
                  ess_target: float = 0.5, moves: int = 0, move_step: float = 0.5,
                  stats: dict | None = None) -> torch.Tensor:
    """DB-SMC: the blend as the proposal, corrected toward the exact tilted target
    ``p_base exp(sum_i w~_i r_i / alpha)`` by :class:`blend.smc.AncestralSMC` -- the SMC of the
    ComfyUI sampler node -- on this schedule's DDPM chain.

    ``n`` samples come from ``n // particles`` independent groups of ``particles`` particles (the
    ``groups`` of the core).  The chain runs in k-diffusion's scaling (``x = x_vp / sqrt(abar)``,
    ``sigma = sqrt((1 - abar) / abar)``), where the core's ancestral step at eta = 1 is this
    schedule's DDPM posterior; the clean-sample predictions come from the eps models.  Each
    transition is weighted by ``p_base / q_blend``, and by the change of the twisting potential
    ``R(x̂_0) / alpha`` on the base's (``potential_on="base"``) or the blend's (``"blend"``) x̂_0,
    tempered by ``temper`` (False / True = abar_t / ``"adaptive"``); at the end the potential is the
    reward of the sample.  Groups are resampled (``resampling``) when their ESS falls below
    ``resample_below * particles`` and once at the end, and moved ``moves`` times after each
    resampling.  ``stats``, when given, receives the cost: denoise calls and scorings per sample."""
    if n % particles:
        raise ValueError(f"n={n} is not a multiple of particles={particles}")
    if potential_on not in ("base", "blend"):
        raise ValueError(f"potential_on={potential_on!r}: expected 'base' or 'blend'")
    c = blend_coefficients(weights, alpha_refs, kl_scale, normalize)
    w_sum = sum(weights) if normalize else 1.0
    w_tilde = [w / w_sum for w in weights]
    alpha = sum(w * a for w, a in zip(w_tilde, alpha_refs)) / sum(w_tilde) / kl_scale
    reward = lambda x: sum(w * r(x) for w, r in zip(w_tilde, rewards)) / alpha  # noqa: E731
    blend = db_eps(c, base, bases)
    steps = schedule.num_steps
    abars = [float(schedule.abar(i)[0]) for i in range(steps)] + [float(schedule.abar(steps - 1)[1])]
    sigmas = [((1 - a) / a) ** 0.5 for a in abars]
    index = {s: i for i, s in enumerate(sigmas[:-1])}
    calls = {"denoise": 0, "score": 0}

    def denoise(x, sigma):
        i = index[sigma]
        x_vp = x * abars[i] ** 0.5
        calls["denoise"] += 1
        return x - sigma * blend(x_vp, i), x - sigma * base(x_vp, i)

    def log_potential(clean):
        calls["score"] += 1
        return reward(clean)

    chain = AncestralSMC(log_potential, eta=1.0, resample_below=resample_below,
                         potential_on="proposal" if potential_on == "blend" else "base", temper=temper,
                         ess_target=ess_target, resampling=resampling, moves=moves, move_step=move_step,
                         denoise=denoise, groups=n // particles, generator=generator)
    x = torch.randn(n, dim, generator=generator, dtype=DTYPE) / abars[0] ** 0.5
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x, _ = chain.step(x, sigma, sigma_next, *denoise(x, sigma))
    clean = x * abars[-1] ** 0.5  # the chain's last state is the sample (abar just below 1), as for DB
    result = chain.finish(x, clean, sigmas[-1])
    if stats is not None:
        stats.update(denoise_per_sample=calls["denoise"], scorings_per_sample=calls["score"],
                     lineages=result.log[-1].lineages,
                     acceptance=[e.acceptance for e in result.log if e.acceptance is not None])
    return result.samples * abars[-1] ** 0.5


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
