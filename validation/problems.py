"""The report's problem (docs/validation.md): a Gaussian mixture base with two quadratic rewards that
pull toward two of its components and one linear reward."""

from __future__ import annotations

import torch

from .gmm import DTYPE, GMM, linear, quadratic

__all__ = ["mixture_problem"]


def mixture_problem(dim: int = 8, seed: int = 0):
    """``(base, rewards, alpha_refs)``: 4 components in R^dim (3 in R^2 for pictures), rewards
    r1, r2 quadratic (a = 1, toward components 2 and 3), r3 linear; alpha_ref = 1, 1, 0.5."""
    g = torch.Generator().manual_seed(seed)
    if dim == 2:
        means = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, 1.8]], dtype=DTYPE)
        covs = torch.stack([torch.eye(2, dtype=DTYPE) * s for s in (0.15, 0.25, 0.1)])
        weights = torch.tensor([0.4, 0.35, 0.25], dtype=DTYPE)
    else:
        means = torch.randn(4, dim, generator=g, dtype=DTYPE) * 1.2
        covs = torch.stack([torch.eye(dim, dtype=DTYPE) * s for s in (0.2, 0.3, 0.15, 0.25)])
        weights = torch.tensor([0.3, 0.3, 0.2, 0.2], dtype=DTYPE)
    base = GMM(weights, means, covs)
    direction = torch.zeros(dim, dtype=DTYPE)
    direction[: 2] = torch.tensor([0.3, -0.6], dtype=DTYPE)
    rewards = [quadratic(1.0, means[1].tolist()), quadratic(1.0, means[2].tolist()), linear(direction.tolist())]
    alpha_refs = [1.0, 1.0, 0.5]
    return base, rewards, alpha_refs
