"""What a blend evaluates: plans of segments and how their outputs combine.

A *segment* is one model to evaluate: ``()`` is the base, ``((i, 1.0),)`` is LoRA i alone and
``((1, c_1), (2, c_2), ...)`` is the Rewarded-Soup merge ``W + sum_i c_i dW_i``.  A plan lists the
segments of one call and the affine weights their predictions are combined with
(:mod:`.coefficients`).  Because ``x0 = x - sigma * eps`` (and likewise for v-prediction) is affine
in the network output at fixed ``x`` and ``sigma``, combining denoised outputs with weights that sum
to 1 is exactly the ``eps`` blend.

**A resident segment.**  When every step evaluates the same one or two models and the base is not
among them (exact at lambda = 1, the merge), a host may merge one segment into the weights once, at
load time, the way ComfyUI's own LoRA loader merges (:func:`static_segment`,
:meth:`.runtime.LowRankBank.segment_deltas`).  Every segment is then evaluated *relative* to it
(:func:`relative_plan`): the resident segment itself is a plain forward, the base is the resident
terms with negated gains.

How each segment's delta reaches the layers is decided elsewhere (:mod:`.runtime`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from .coefficients import BlendInputError, affine_coefficients

__all__ = ["Mode", "MODES", "Term", "Segment", "BlendPlan", "make_plan", "static_segment", "segment_minus",
           "relative_plan", "combine", "repeat_batch", "with_base"]

Mode = Literal["exact", "sequential", "merged", "stochastic"]
MODES: tuple[Mode, ...] = ("exact", "sequential", "merged", "stochastic")

#: ``(basis index, gain)``: add ``gain * s_i * up_i(down_i(x))`` to a module's output.
Term = tuple[int, float]
Segment = tuple[Term, ...]


@dataclass(frozen=True)
class BlendPlan:
    """Which models to evaluate (``segments``) and how to combine their outputs (``weights``)."""

    segments: tuple[Segment, ...]
    weights: tuple[float, ...]

    @property
    def is_plain(self) -> bool:
        """A single segment without terms and weight 1: the untouched base forward."""
        return len(self.segments) == 1 and not self.segments[0] and self.weights == (1.0,)


def _draw_index(probabilities: Sequence[float], seed: int, sigma: float) -> int:
    """Deterministic draw for one sampling step: the same (seed, sigma) always picks the same
    model, so the cond and uncond passes of a step agree even when ComfyUI runs them apart."""
    u = random.Random(f"{seed}:{sigma:.9e}").random()
    acc = 0.0
    for j, p in enumerate(probabilities):
        acc += p
        if u < acc:
            return j
    return max(j for j, p in enumerate(probabilities) if p > 0)


def make_plan(mode: Mode, coefficients: Sequence[float], *, seed: int = 0, sigma: float = 0.0) -> BlendPlan:
    """The evaluation plan for blend coefficients ``c`` (see :func:`.blend_coefficients`).

    ``exact``/``sequential``: evaluate every model whose affine coefficient is non-zero and combine.
    ``merged``: one model with ``W + sum_i c_i dW_i``.  ``stochastic``: one model drawn with the
    affine coefficients as probabilities (DB-MPA-LS), keyed by ``(seed, sigma)``.
    """
    affine = affine_coefficients(coefficients)
    if mode in ("exact", "sequential"):
        segments = tuple(() if j == 0 else ((j - 1, 1.0),) for j, a in enumerate(affine) if a != 0.0)
        weights = tuple(a for a in affine if a != 0.0)
        if weights == (affine[0],) and segments == ((),):
            weights = (1.0,)
        return BlendPlan(segments, weights)
    if mode == "merged":
        terms = tuple((i, float(c)) for i, c in enumerate(coefficients) if affine[i + 1] != 0.0)
        return BlendPlan((terms,), (1.0,))
    if mode == "stochastic":
        negative = [(j, a) for j, a in enumerate(affine) if a < 0]
        if negative:
            j, a = negative[0]
            which = "the base model (1 - sum c)" if j == 0 else f"basis {j}"
            raise BlendInputError(
                f"mode=stochastic: the coefficient of {which} is {a:.4g} < 0, so it cannot be a "
                "probability; use kl_scale and weights with 0 <= c and sum(c) <= 1, or mode=exact"
            )
        j = _draw_index(affine, seed, sigma)
        return BlendPlan((() if j == 0 else ((j - 1, 1.0),),), (1.0,))
    raise BlendInputError(f"mode={mode!r}: expected one of {', '.join(MODES)}")


def static_segment(mode: Mode, coefficients: Sequence[float]) -> Segment | None:
    """The segment a host may merge into the network's weights once for a whole sampling run:
    the first segment of the plan when every step's plan is the same (``exact``, ``sequential``,
    ``merged``), does not evaluate the base model (its affine coefficient ``1 - sum c`` is 0) and
    has at most two segments.  None otherwise: ``stochastic`` draws a model per step; a plan with
    the base gains nothing; with k > 2 segments the k - 1 others, each carrying the resident's
    terms negated, would cost (k - 1)(r + r_res) in low-rank work against sum r without."""
    if mode == "stochastic":
        return None
    plan = make_plan(mode, coefficients)
    if () in plan.segments or len(plan.segments) > 2:
        return None
    return plan.segments[0]


def segment_minus(segment: Segment, resident: Segment) -> Segment:
    """The terms that turn a network carrying ``resident`` into ``segment``: per basis, the gain in
    ``segment`` minus the gain in ``resident`` (zeros dropped, bases in index order)."""
    gains: dict[int, float] = {}
    for i, g in segment:
        gains[i] = gains.get(i, 0.0) + g
    for i, g in resident:
        gains[i] = gains.get(i, 0.0) - g
    return tuple((i, g) for i, g in sorted(gains.items()) if g != 0.0)


def relative_plan(plan: BlendPlan, resident: Segment) -> BlendPlan:
    """``plan`` for a network whose weights already carry ``resident``: every segment minus it
    (:func:`segment_minus`), the same combination weights."""
    if not resident:
        return plan
    return BlendPlan(tuple(segment_minus(s, resident) for s in plan.segments), plan.weights)


def combine(outputs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_j weights[j] * outputs[j]``; a single output with weight 1 is returned untouched."""
    if len(outputs) == 1 and weights[0] == 1.0:
        return outputs[0]
    total = outputs[0] * weights[0]
    for out, w in zip(outputs[1:], weights[1:]):
        total = total.add_(out, alpha=w)
    return total


def repeat_batch(value, times: int, batch: int):
    """Repeat every tensor whose first dimension is ``batch`` ``times`` times along that dimension
    (recursing into lists, tuples and dicts); everything else is returned as is."""
    if times == 1:
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim > 0 and value.shape[0] == batch:
            return torch.cat([value] * times, dim=0)
        return value
    if isinstance(value, dict):
        return {k: repeat_batch(v, times, batch) for k, v in value.items()}
    if isinstance(value, list):
        return [repeat_batch(v, times, batch) for v in value]
    if isinstance(value, tuple):
        return tuple(repeat_batch(v, times, batch) for v in value)
    return value


def with_base(plan: BlendPlan) -> tuple[BlendPlan, int]:
    """``plan`` with the base model among its segments (weight 0 if it was not), and its index.

    SMC needs the base's prediction next to the blend's: when the blend evaluates the base anyway
    (its affine coefficient is non-zero) this costs nothing, else one more model in the forward."""
    if () in plan.segments:
        return plan, plan.segments.index(())
    return BlendPlan(plan.segments + ((),), plan.weights + (0.0,)), len(plan.segments)
