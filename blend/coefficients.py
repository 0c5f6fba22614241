"""The Diffusion Blend formula -- the one place it is written down.

For basis models i = 1..m fine-tuned with KL weights ``alpha_ref[i]``, user weights ``w`` and a
KL scale ``lambda`` (``kl_scale``)::

    w~        = w / sum(w)                      if normalize else w
    alpha_bar = sum(w~_i alpha_ref_i) / sum(w~_i)
    alpha     = alpha_bar / lambda              (target KL weight; lambda = 1: "as trained")
    c_i       = w~_i * alpha_ref_i / alpha  =  lambda * w~_i * alpha_ref_i / alpha_bar
    eps       = eps_base + sum_i c_i (eps_i - eps_base)
              = (1 - sum_i c_i) eps_base + sum_i c_i eps_i        (affine form)

The second expression for ``c_i`` avoids dividing by ``alpha = inf`` at ``lambda = 0``.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["BlendInputError", "blend_coefficients", "affine_coefficients", "tilt_reward_weights", "ZERO_TOLERANCE"]

#: Affine coefficients with ``|a| <= ZERO_TOLERANCE`` are treated as exactly zero: the model they
#: multiply is not evaluated at all.
ZERO_TOLERANCE = 1e-6


class BlendInputError(ValueError):
    """A user input to the blend is invalid; the message names the input and what was expected."""


def _check_finite(name: str, values: Sequence[float]) -> None:
    for i, v in enumerate(values):
        if not math.isfinite(float(v)):
            raise BlendInputError(f"{name}[{i}] = {v!r}: expected a finite number")


def blend_coefficients(
    weights: Sequence[float],
    alpha_refs: Sequence[float],
    kl_scale: float,
    normalize: bool = True,
) -> list[float]:
    """Return the blend coefficients ``c_i`` (one per basis).

    Args:
        weights: user weights ``w_i`` of the basis rewards (negative allowed).
        alpha_refs: KL weights ``alpha_ref_i`` each basis LoRA was trained with (> 0).
        kl_scale: ``lambda >= 0``; ``alpha = alpha_bar / lambda``.  0 gives the base model.
        normalize: divide ``w`` by ``sum(w)`` (DB-MPA's simplex weights).
    """
    weights = [float(w) for w in weights]
    alpha_refs = [float(a) for a in alpha_refs]
    if len(weights) == 0:
        raise BlendInputError("basis: expected at least one basis LoRA, got none")
    if len(weights) != len(alpha_refs):
        raise BlendInputError(
            f"alpha_ref: expected one value per basis ({len(weights)}), got {len(alpha_refs)}"
        )
    _check_finite("weight", weights)
    _check_finite("alpha_ref", alpha_refs)
    kl_scale = float(kl_scale)
    if not math.isfinite(kl_scale) or kl_scale < 0:
        raise BlendInputError(f"kl_scale = {kl_scale!r}: expected a finite number >= 0")
    for i, a in enumerate(alpha_refs):
        if a <= 0:
            raise BlendInputError(f"alpha_ref[{i}] = {a!r}: expected a KL weight > 0")

    weight_sum = math.fsum(weights)
    if normalize:
        if abs(weight_sum) <= 1e-12:
            raise BlendInputError(
                f"weight: the weights sum to {weight_sum!r}; normalize=True divides by that sum. "
                "Use weights with a non-zero sum or turn normalize off."
            )
        w_tilde = [w / weight_sum for w in weights]
    else:
        w_tilde = weights

    if kl_scale == 0.0:
        return [0.0] * len(weights)

    w_tilde_sum = math.fsum(w_tilde)
    if abs(w_tilde_sum) <= 1e-12:
        raise BlendInputError(
            f"weight: the weights sum to {w_tilde_sum!r}, so the mean reference KL weight "
            "sum(w*alpha_ref)/sum(w) is undefined; use weights with a non-zero sum"
        )
    alpha_bar = math.fsum(w * a for w, a in zip(w_tilde, alpha_refs)) / w_tilde_sum
    if alpha_bar <= 0:
        raise BlendInputError(
            f"weight: the weighted mean reference KL weight sum(w*alpha_ref)/sum(w) = {alpha_bar!r} "
            "is not positive, so no target KL weight alpha = alpha_bar / kl_scale exists"
        )
    return [kl_scale * w * a / alpha_bar for w, a in zip(w_tilde, alpha_refs)]


def affine_coefficients(coefficients: Sequence[float]) -> list[float]:
    """``[1 - sum(c), c_1, ..., c_m]``: weights of ``eps_base, eps_1, ..., eps_m`` (they sum to 1).

    Entries within :data:`ZERO_TOLERANCE` of zero are returned as exactly ``0.0``.
    """
    base = 1.0 - math.fsum(coefficients)
    return [0.0 if abs(a) <= ZERO_TOLERANCE else float(a) for a in [base, *coefficients]]


def tilt_reward_weights(coefficients: Sequence[float], alpha_refs: Sequence[float]) -> list[float]:
    """The tilt a blend stands for, as weights on the raw rewards: the blend with coefficients ``c``
    approximates ``p_base · exp(R / alpha)`` with

        R / alpha = sum_i (w~_i / alpha) r_i = sum_i (c_i / alpha_ref_i) r_i

    (from ``c_i = w~_i alpha_ref_i / alpha``), so ``c_i / alpha_ref_i`` is the weight of ``r_i``.  It
    needs no ``w`` or ``lambda`` of its own, which keeps the SMC target the blend's by construction."""
    if len(coefficients) != len(alpha_refs):
        raise BlendInputError(f"alpha_ref: expected one value per coefficient ({len(coefficients)}), "
                              f"got {len(alpha_refs)}")
    for i, a in enumerate(alpha_refs):
        if not float(a) > 0:
            raise BlendInputError(f"alpha_ref[{i}] = {a!r}: expected a KL weight > 0")
    return [float(c) / float(a) for c, a in zip(coefficients, alpha_refs)]
