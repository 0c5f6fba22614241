"""Delivery on the weight: a segment's delta added to the weight a layer computes with, per call.

ComfyUI's ``comfy.ops`` layers run ``module.weight_function`` / ``bias_function`` on the weight they
are about to use (the hook its low-VRAM LoRA patches use).  When one model runs per forward, the
blend joins those lists for one call (:class:`_WeightPatch`) and returns ``W + dW``: one rank-r
update of the weight's size, whatever the number of tokens.  Dense deltas always go there;
low-rank ones where :func:`low_rank_on_weight` finds it cheaper (or the bank says so).

The contract (ComfyUI's: "return the weight to use"): a weight function never writes the tensor it
is handed.  Under ComfyUI's dynamic VRAM (v0.16+, NVIDIA) that tensor is its cached device copy of
the weight, not a per-call copy, so an in-place add would accumulate into the cache on every call
(``tests/nodes/test_dynamic_vram.py`` pins this on the host's own layers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .deltas import _Factors
from .plan import Segment

if TYPE_CHECKING:
    from .runtime import LowRankBank

__all__ = ["low_rank_on_weight"]


_UNSET = object()

#: The weight side's fixed cost beyond the output side's, in values moved: ComfyUI's cast path and
#: the weight functions (~60 us a layer on a CPU, where a value moved costs ~0.09 ns).
_WEIGHT_SIDE_FIXED = 700_000


def low_rank_on_weight(weight_shape: Sequence[int], x: torch.Tensor) -> bool:
    """Is adding a low-rank delta to the per-call weight cheaper than adding ``up(down(x))`` to the
    output of a layer with weight ``weight_shape`` at input ``x``?  Output side: ``rows * (d_in +
    2 * d_out)`` values moved (read ``x``, read and write the output); weight side: ``2 *
    weight.numel()`` (the update of ComfyUI's copy) plus its fixed cost -- so the weight side wins
    on layers that see many tokens per weight, like a UNet's outer levels.

    That is the CPU's cost model.  On accelerators the output side is always taken: at full size
    (SDXL fp16, Flux-dev bf16, 1024x1024, H100) it was the cheapest placement in every plan
    (SDXL one LoRA 1.84 x plain against 2.03 on the weight and 2.07-2.21 auto; Flux 1.12 against
    1.23 and 1.13; ``bench/families_speed.py --full-size``) -- a kernel's launch, not the values
    it moves, is what a small product costs there."""
    if x.device.type != "cpu":
        return False
    d_out = weight_shape[0]
    d_in = x.shape[1] if len(weight_shape) == 4 else x.shape[-1]
    rows = x.numel() // max(d_in, 1)
    numel = 1
    for size in weight_shape:
        numel *= size
    return 2 * numel + _WEIGHT_SIDE_FIXED < rows * (d_in + 2 * d_out)


def _takes_weight_functions(module: nn.Module) -> bool:
    """Does the layer apply ``module.weight_function``/``bias_function`` to its weights on every call
    (ComfyUI's ``comfy.ops`` layers)?  Checked per call by :meth:`_WeightPatch.check`."""
    return isinstance(getattr(module, "weight_function", None), list) and isinstance(
        getattr(module, "bias_function", None), list
    )


def _push_function(module: nn.Module, name: str, fn) -> tuple[nn.Module, str, object]:
    """Append ``fn`` to the layer's own copy of the list ``name`` (never the class-wide default)."""
    saved = module.__dict__.get(name, _UNSET)
    setattr(module, name, [*getattr(module, name), fn])
    return module, name, saved


def _pop_function(module: nn.Module, name: str, saved: object) -> None:
    if saved is _UNSET:
        delattr(module, name)
    else:
        setattr(module, name, saved)


class _WeightPatch:
    """One segment's delta at one layer that takes weight functions (one model per forward).

    * **On the weight**: ``weight``/``bias`` join the layer's weight functions for one call and add
      the delta to ComfyUI's per-call copy of the weight -- a copy and one rank-r update of the
      weight's size, whatever the number of tokens.  Dense deltas always go there (on the output
      they would cost a second full product); low-rank ones where
      :attr:`LowRankBank.low_rank_side` says so.
    * **On the output**: ``up(down(x))`` added to the output, ``rows * r * (d_in + d_out)`` products
      and a pass over the output.

    :meth:`before` (a forward pre-hook) pushes the weight functions; :meth:`after` (a forward
    hook) removes them, and if the layer did not call them (a layer that lists weight functions but
    ignores them) or the delta stays on the output, adds the delta to the output, so every call
    computes the blend."""

    def __init__(self, bank: "LowRankBank", path: str, module: nn.Module, segment: Segment):
        self.bank, self.path, self.module, self.segment = bank, path, module, segment
        used = {i for i, g in segment if g != 0.0}
        parts = [delta for i, delta in bank._by_path[path] if i in used]
        self.dense = any(d.weight is not None for d in parts)
        self.matrix = self.dense or any(d.low_rank is not None for d in parts)
        self.has_bias = any(d.bias is not None for d in parts)
        self.pushed: list[tuple[nn.Module, str, object]] = []
        self.applied = False

    def _delta(self, like: torch.Tensor) -> tuple[_Factors, float] | None:
        return self.bank._segment_delta(self.segment, self.path, self.module, like.device, like.dtype)

    def on_weight(self, x: torch.Tensor) -> bool:
        if self.dense:
            return True
        if not self.matrix:
            return False  # a bias alone: one add to the output
        side = self.bank.low_rank_side
        return side == "weight" or side == "auto" and low_rank_on_weight(self.module.weight.shape, x)

    def before(self, module: nn.Module, args) -> None:
        if self.on_weight(args[0]):
            self.applied = False
            self.pushed.append(_push_function(module, "weight_function", self.weight))
            if self.has_bias:
                self.pushed.append(_push_function(module, "bias_function", self.bias))

    def unpush(self) -> None:
        while self.pushed:
            _pop_function(*self.pushed.pop())

    def after(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        on_weight = bool(self.pushed)
        self.unpush()
        if not (on_weight and self.applied):
            x = args[0]
            delta = self._delta(x)
            if delta is not None:
                delta[0].add_to(output, x, module, delta[1])
        return output

    def weight(self, weight: torch.Tensor) -> torch.Tensor:
        """ComfyUI's weight function: the weight to use, ``weight + dW`` as a new tensor (the one
        handed in may be the host's own cached copy; see :meth:`_Factors.weight_plus`)."""
        self.applied = True
        delta = self._delta(weight)
        if delta is None or (delta[0].down is None and delta[0].dense is None):
            return weight
        return delta[0].weight_plus(weight, delta[1])

    def bias(self, bias: torch.Tensor) -> torch.Tensor:
        delta = self._delta(bias)
        if delta is None or delta[0].bias is None:
            return bias
        return delta[0].bias_plus(bias, delta[1])
