"""Delivery on the output: a segment's low-rank (and dense) terms added to a layer's output rows.

Used where several models share one forward (the inputs repeated along the batch, segment ``j``
owning rows ``[j*B, (j+1)*B)``), on layers without weight functions, and where the output side is
cheaper (:func:`.weight_functions.low_rank_on_weight`): a forward hook adds
``gain * scale * up(down(x))`` (:meth:`.deltas._Factors.add_to`) to each segment's slice,
``tokens * r * (d_in + d_out)`` products and a pass over the output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .plan import Segment

if TYPE_CHECKING:
    from .runtime import LowRankBank

__all__ = ["output_hook"]


def output_hook(bank: "LowRankBank", path: str, segments: tuple[Segment, ...]):
    """A forward hook adding each segment's delta at ``path`` to its slice of the layer's output."""

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        rows = x.shape[0] // len(segments)
        if rows * len(segments) != x.shape[0]:
            raise RuntimeError(
                f"diffusion blend: layer {path} got batch {x.shape[0]}, not a multiple of "
                f"{len(segments)} segments"
            )
        for j, segment in enumerate(segments):
            delta = bank._segment_delta(segment, path, module, x.device, x.dtype)
            if delta is not None:
                sl = slice(j * rows, (j + 1) * rows)
                delta[0].add_to(output[sl], x[sl], module, delta[1])
        return output

    return hook
