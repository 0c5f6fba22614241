"""Diffusion Blend on flow-matching models (SD3, Flux): the same identity, written in velocities.

Flow models are trained on ``x_s = (1 - s) x_0 + s eps`` (``s`` = sigma in [0, 1]) and predict the
velocity ``v = eps - x_0``.  For data ``p`` the optimal velocity at a fixed ``(x, s)`` is::

    v*(x, s) = E[eps - x_0 | x_s = x] = -(x + s * grad log p_s(x)) / (1 - s)

(``E[eps | x] = -s grad log p_s`` and ``E[x_0 | x] = (x - s E[eps | x]) / (1 - s)``).  It is affine in
the score with coefficients that do not depend on the model, so an affine combination of velocities
(the blend's coefficients, the base's included, sum to one) is the velocity of the same combination
of scores: everything the VP validation shows for noise predictions carries over unchanged, and for
linear rewards on a Gaussian base the blend is the tilted target's velocity exactly.

``p_s`` of a mixture ``sum_k pi_k N(mu_k, S_k)`` is ``sum_k pi_k N((1 - s) mu_k, (1 - s)^2 S_k + s^2 I)``.
The sampler is the stochastic step ComfyUI's ``euler_ancestral`` takes on flow models
(:func:`blend.smc.ancestral_step` with ``flow=True``), the one the SMC sampler uses too.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..blend.smc import ancestral_step
from .gmm import DTYPE, GMM

__all__ = ["flow_noised", "exact_velocity", "flow_sigmas", "sample_flow"]

VelocityModel = Callable[[torch.Tensor, float], torch.Tensor]


def flow_noised(gmm: GMM, sigma: float) -> GMM:
    """The marginal of ``(1 - sigma) x_0 + sigma eps``, ``x_0 ~ gmm``."""
    eye = torch.eye(gmm.dim, dtype=DTYPE)
    return GMM(gmm.weights, (1 - sigma) * gmm.means, (1 - sigma) ** 2 * gmm.covs + sigma**2 * eye)


def exact_velocity(gmm: GMM) -> VelocityModel:
    """The optimal velocity ``v*(x, sigma) = -(x + sigma grad log p_sigma(x)) / (1 - sigma)`` of ``gmm``."""
    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return -(x + sigma * flow_noised(gmm, sigma).score(x)) / (1 - sigma)

    return velocity


def flow_sigmas(num_steps: int, shift: float = 1.0, sigma_max: float = 0.999) -> list[float]:
    """``num_steps + 1`` noise levels from ``sigma_max`` to 0, uniform in time and then shifted as SD3/Flux
    shift them: ``shift * s / (1 + (shift - 1) s)``.  (``sigma_max < 1``: the exact velocity divides by
    ``1 - sigma``; a network does not need that.)"""
    times = torch.linspace(sigma_max, 0.0, num_steps + 1, dtype=DTYPE).tolist()
    return [shift * s / (1 + (shift - 1) * s) for s in times]


def sample_flow(velocity: VelocityModel, sigmas: Sequence[float], n: int, dim: int, generator: torch.Generator,
                eta: float = 1.0) -> torch.Tensor:
    """Ancestral flow sampling from ``N(0, sigma_0^2 I)`` (the marginal at ``sigma_0`` up to its
    ``(1 - sigma_0)``-scaled signal) down to ``sigmas[-1]``; ``x_0`` is read from the velocity."""
    x = sigmas[0] * torch.randn(n, dim, generator=generator, dtype=DTYPE)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = x - sigma * velocity(x, sigma)
        step = ancestral_step(sigma, sigma_next, eta, flow=True)
        x = step.mean(x, denoised) + step.noise_std * torch.randn(x.shape, generator=generator, dtype=DTYPE)
    return x

