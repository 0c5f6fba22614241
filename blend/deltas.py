"""One basis' change to one layer, and the arithmetic that adds it to a layer's output or weight.

A :class:`LayerDelta` is what a LoRA file (or a host's weight adapters) resolves to at one layer:
a low-rank ``scale * up(down(x))``, a dense ``dW`` and a bias delta.  :class:`_Factors` is that delta
cast for the device and dtype in use, with the two ways of applying it: added to a layer's output
(:meth:`_Factors.add_to`, the output hooks of :mod:`.output_hooks`) or to a weight
(:meth:`_Factors.weight_plus`, the weight functions of :mod:`.weight_functions` and the merged
copies of :mod:`.swap`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lora_file import LoraModule

__all__ = ["LayerDelta", "balance_factors"]


@dataclass(frozen=True)
class LayerDelta:
    """One basis' change to one layer, applied to the layer's output:

        y += scale * up(down(x))   (``low_rank``: a LoRA/LoCon, possibly several concatenated along the rank)
           + F(x; weight)          (``weight``: a dense delta dW, for adapters that are not low-rank)
           + bias                  (``bias``: a dense delta of the layer's bias)

    where ``F`` is the layer's own operation (linear, or conv with its stride/padding/dilation/groups).
    Any part may be None.  A whole-file LoRA read by :func:`.lora_file.read_lora` is all ``low_rank``.
    """

    low_rank: LoraModule | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def num_bytes(self) -> int:
        total = 0
        if self.low_rank is not None:
            total += sum(t.numel() * t.element_size() for t in (self.low_rank.down, self.low_rank.up))
        for t in (self.weight, self.bias):
            if t is not None:
                total += t.numel() * t.element_size()
        return total


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) or getattr(module, "weight", torch.empty(0)).ndim == 4


@dataclass
class _Factors:
    """One basis' delta at one module, cast for the device/dtype in use; ``up`` already carries
    the LoRA scale, so ``apply(x) = scale * up(down(x)) + F(x; dense)`` and :meth:`add_to` adds
    that and ``bias`` to the layer's output."""

    down: torch.Tensor | None
    up: torch.Tensor | None
    conv: bool
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def apply(self, x: torch.Tensor, module: nn.Module) -> torch.Tensor | None:
        """The delta's matrix part at input ``x`` (None when it has only a bias)."""
        out = None
        if self.down is not None:
            if self.conv:
                h = F.conv2d(x, self.down, None, module.stride, module.padding, module.dilation)
                out = F.conv2d(h, self.up)
            else:
                out = F.linear(F.linear(x, self.down), self.up)
        if self.dense is not None:
            if self.conv:
                d = F.conv2d(x, self.dense, None, module.stride, module.padding, module.dilation, module.groups)
            else:
                d = F.linear(x, self.dense)
            out = d if out is None else out.add_(d)
        return out

    def weight_plus(self, weight: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """A new tensor ``weight + gain * dW``, ``dW = scale * up @ down`` (reshaped to a conv kernel)
        plus the dense delta.  ``weight`` itself is never written: a host may hand its weight
        functions the weight it keeps (ComfyUI's cached device copy under dynamic VRAM, the stored
        parameter when no cast is needed).  The price is a fresh weight-sized tensor per call: on
        accelerators the caching allocator makes that free, on a CPU it costs ~3x the in-place
        update of ComfyUI's per-call copy (a 1280x1280 float32 rank-4 update: 480 us against 153 us,
        2 cores), which the swapped copies (:mod:`.swap`, the CPU default within its budget) avoid."""
        out = weight
        if self.down is not None:
            flat = weight.reshape(weight.shape[0], -1)
            out = torch.addmm(flat, self.up.flatten(1), self.down.flatten(1), alpha=gain).view(weight.shape)
        if self.dense is not None:
            out = weight.add(self.dense, alpha=gain) if out is weight else out.add_(self.dense, alpha=gain)
        return out

    def bias_plus(self, bias: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """A new tensor ``bias + gain * db`` (``bias`` itself when the delta has no bias)."""
        return bias if self.bias is None else bias.add(self.bias, alpha=gain)

    def add_to(self, output: torch.Tensor, x: torch.Tensor, module: nn.Module, gain: float = 1.0) -> None:
        """``output += gain * delta(x)`` in place.  The last low-rank product accumulates straight
        into the output (``addmm_``/``baddbmm_``: no temporary of the output's size), and a 1x1
        convolution's rank-r product is a matrix product over the channels, not an r-channel
        convolution (which costs ~10x more on CPUs)."""
        if not self.conv and output.is_contiguous() and x.is_contiguous():
            out2d, x2d = output.view(-1, output.shape[-1]), x.view(-1, x.shape[-1])
            if self.down is not None:
                out2d.addmm_(F.linear(x2d, self.down), self.up.t(), alpha=gain)
            if self.dense is not None:
                out2d.addmm_(x2d, self.dense.t(), alpha=gain)
        elif self.conv and output.ndim == 4 and output.is_contiguous():
            if self.down is not None:
                batch, channels = output.shape[:2]
                if _is_pointwise(self.down, module) and x.is_contiguous():
                    hidden = torch.matmul(self.down.flatten(1), x.view(batch, x.shape[1], -1))
                else:
                    hidden = F.conv2d(x, self.down, None, module.stride, module.padding, module.dilation).flatten(2)
                up = self.up.flatten(1).expand(batch, -1, -1)
                output.view(batch, channels, -1).baddbmm_(up, hidden, alpha=gain)
            if self.dense is not None:
                dense = F.conv2d(x, self.dense, None, module.stride, module.padding, module.dilation, module.groups)
                output.add_(dense, alpha=gain)
        else:
            matrix = self.apply(x, module)
            if matrix is not None:
                output.add_(matrix, alpha=gain)
        if self.bias is not None:
            output.add_(self.bias.reshape((-1, 1, 1) if self.conv else (-1,)), alpha=gain)


def balance_factors(down: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down_j / 2^k_j, up_j * 2^k_j)`` for each rank component ``j``, with the least ``k_j >= 0``
    that makes no row of ``down`` longer than the layer's own weight rows (root mean square).

    A low-rank delta on the output computes ``h = down(x)`` in the model's dtype.  A LoRA's down
    factor can be many times the weight's scale, and ``up`` small, so in float16 ``h`` can
    overflow where ``W x`` and the merged ``(W + up @ down) x`` do not (seen on full-size SDXL:
    the stock loader's model finite, the output side NaN).  Scaling by a power of two changes no
    bit of ``up @ down`` or of ``up(h)`` (exact in binary floating point), only the range ``h``
    lives in: that of the layer's own output.  ``weight`` that is not a floating-point tensor with
    values (quantized, meta) leaves the factors as they are.  The bank applies it for float16
    compute only (bfloat16 and float32 have float32's range), where the cast copies the factors
    anyway: other dtypes keep using the file's tensors without a copy."""
    if (weight is None or not isinstance(weight, torch.Tensor) or not weight.is_floating_point()
            or weight.device.type == "meta" or weight.ndim < 2):
        return down, up
    weight_rms = float(weight.detach().float().norm()) / weight.shape[0] ** 0.5
    if not math.isfinite(weight_rms) or weight_rms <= 0.0:
        return down, up
    down_norm = down.detach().float().flatten(1).norm(dim=1)
    k = torch.ceil(torch.log2(down_norm / weight_rms)).clamp(min=0, max=64).nan_to_num(0.0).to(torch.int32)
    if not bool(k.any()):
        return down, up
    scale = torch.ldexp(torch.ones(k.shape, dtype=torch.float32, device=k.device), k)  # exactly 2^k_j
    shape_down = (-1,) + (1,) * (down.ndim - 1)
    shape_up = (1, -1) + (1,) * (up.ndim - 2)
    return (down / scale.to(down.device, down.dtype).view(shape_down),
            up * scale.to(up.device, up.dtype).view(shape_up))


def _is_pointwise(down: torch.Tensor, module: nn.Module) -> bool:
    """Is ``conv2d(x, down)`` with the layer's stride/padding a plain product over channels?"""
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    padding = getattr(module, "padding", 0)
    return (tuple(down.shape[2:]) == (1, 1) and pair(getattr(module, "stride", 1)) == (1, 1)
            and (padding in ("valid", "same") or pair(padding) == (0, 0)))


def _module_weight_shape(module: nn.Module) -> tuple[int, ...] | None:
    weight = getattr(module, "weight", None)
    return None if weight is None else tuple(weight.shape)
