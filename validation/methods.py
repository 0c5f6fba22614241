"""Sampling the toy problem with the blend of ``blend/`` (the functions the nodes use).

Models are noise predictors ``eps(x, i)`` at sampling step ``i`` of a
:class:`~diffusion_blend.training.sampler.DDIMSchedule` (ancestral with ``eta = 1``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..blend.coefficients import affine_coefficients, blend_coefficients
from ..blend.runtime import combine, make_plan
from ..training.sampler import DDIMSchedule, ddim_step_stats
from .gmm import DTYPE, GMM, noised_eps

__all__ = ["EpsModel", "exact_model", "db_eps", "sample", "sample_db", "sample_db_ls", "mmd2", "mmd_test"]

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
