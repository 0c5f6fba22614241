"""Gaussian mixtures under a VP noise schedule, and their exact reward tilts.

A mixture ``p = sum_k pi_k N(mu_k, S_k)`` noised as ``x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps``
is the mixture ``sum_k pi_k N(sqrt(abar) mu_k, abar S_k + (1 - abar) I)``; the optimal noise
prediction is ``eps*(x_t) = -sqrt(1 - abar) grad log p_t(x_t)``.

Rewards are quadratic ``r(x) = -a ||x - g||^2 / 2`` or linear ``r(x) = a . x``.  For any weights
``w`` and KL weight ``alpha`` the target ``p*(x) ~ p(x) exp(sum_i w_i r_i(x) / alpha)`` is again a
mixture: component k gets precision ``S_k^-1 + P``, mean ``(S_k^-1 + P)^-1 (S_k^-1 mu_k + h)`` and a
weight multiplied by its normalizer, where ``sum_i w_i r_i / alpha = -x'Px/2 + h'x + const``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["GMM", "Reward", "quadratic", "linear", "tilt", "noised_eps", "expected_reward"]

DTYPE = torch.float64


@dataclass(frozen=True)
class GMM:
    weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, d)
    covs: torch.Tensor  # (K, d, d)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        z = torch.randn(n, self.dim, generator=generator, dtype=DTYPE)
        return self.means[k] + (chol[k] @ z[:, :, None])[:, :, 0]

    def noised(self, abar: float) -> "GMM":
        eye = torch.eye(self.dim, dtype=DTYPE)
        return GMM(self.weights, math.sqrt(abar) * self.means, abar * self.covs + (1 - abar) * eye)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``grad log p(x)`` for ``x`` of shape ``(n, d)``."""
        prec = torch.linalg.inv(self.covs)  # (K, d, d)
        diff = x[:, None, :] - self.means[None]  # (n, K, d)
        pd = torch.einsum("kij,nkj->nki", prec, diff)  # (n, K, d)
        logdet = torch.linalg.slogdet(self.covs).logabsdet
        log_comp = torch.log(self.weights)[None] - 0.5 * (diff * pd).sum(-1) - 0.5 * logdet[None]
        resp = torch.softmax(log_comp, dim=1)  # (n, K)
        return -(resp[:, :, None] * pd).sum(1)


@dataclass(frozen=True)
class Reward:
    kind: str  # "quadratic" | "linear"
    a: torch.Tensor  # scalar for quadratic, (d,) for linear
    g: torch.Tensor | None = None  # (d,) centre for quadratic

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "quadratic":
            return -0.5 * self.a * ((x - self.g) ** 2).sum(-1)
        return x @ self.a


def quadratic(a: float, g: Sequence[float]) -> Reward:
    return Reward("quadratic", torch.tensor(float(a), dtype=DTYPE), torch.tensor(g, dtype=DTYPE))


def linear(a: Sequence[float]) -> Reward:
    return Reward("linear", torch.tensor(a, dtype=DTYPE))


def _natural_params(rewards: Sequence[Reward], coefs: Sequence[float], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``P, h`` with ``sum_i coef_i r_i(x) = -x'Px/2 + h'x + const``."""
    P = torch.zeros(dim, dim, dtype=DTYPE)
    h = torch.zeros(dim, dtype=DTYPE)
    for r, c in zip(rewards, coefs):
        if r.kind == "quadratic":
            P += c * r.a * torch.eye(dim, dtype=DTYPE)
            h += c * r.a * r.g
        else:
            h += c * r.a
    return P, h


def tilt(base: GMM, rewards: Sequence[Reward], weights: Sequence[float], alpha: float) -> GMM:
    """The exact ``p*(x) ~ base(x) exp(sum_i w_i r_i(x) / alpha)``."""
    P, h = _natural_params(rewards, [w / alpha for w in weights], base.dim)
    prec = torch.linalg.inv(base.covs)
    new_prec = prec + P[None]
    if (torch.linalg.eigvalsh(new_prec) <= 0).any():
        raise ValueError("the tilt is not normalizable (negative precision): use smaller negative quadratic weights")
    new_cov = torch.linalg.inv(new_prec)
    eta = torch.einsum("kij,kj->ki", prec, base.means) + h[None]
    new_mean = torch.einsum("kij,kj->ki", new_cov, eta)
    log_z = (0.5 * (new_mean * eta).sum(-1) - 0.5 * (base.means * torch.einsum("kij,kj->ki", prec, base.means)).sum(-1)
             + 0.5 * torch.linalg.slogdet(new_cov).logabsdet - 0.5 * torch.linalg.slogdet(base.covs).logabsdet)
    w = torch.softmax(torch.log(base.weights) + log_z, dim=0)
    return GMM(w, new_mean, new_cov)


def noised_eps(gmm: GMM, x: torch.Tensor, abar: float) -> torch.Tensor:
    """The optimal noise prediction ``-sqrt(1 - abar) grad log p_t(x)``."""
    return -math.sqrt(1 - abar) * gmm.noised(abar).score(x)


def expected_reward(gmm: GMM, reward: Reward) -> float:
    if reward.kind == "linear":
        return float(gmm.weights @ (gmm.means @ reward.a))
    diff = gmm.means - reward.g[None]
    second = (diff**2).sum(-1) + torch.diagonal(gmm.covs, dim1=-2, dim2=-1).sum(-1)
    return float(-0.5 * reward.a * (gmm.weights @ second))
