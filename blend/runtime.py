"""Evaluating a blend of LoRAs on one shared network.

The runtime never writes the network's weights.  While a blended call runs, each targeted
Linear/Conv2d computes

    y = W x  (+ bias)  +  sum_{(i, g) in segment}  g * s_i * up_i(down_i(x))

in one of two ways:

* **on the weight** -- one model per forward (sequential, the CPU path of exact, merged), on a
  layer that takes weight functions (ComfyUI's ``comfy.ops`` protocol: ``module.weight_function`` /
  ``bias_function``, the hook its low-VRAM LoRA patches use): ComfyUI's per-call copy of the weight
  becomes ``W + sum g * s_i * up_i @ down_i`` (plus any dense delta), a cost independent of the
  number of tokens.  Dense deltas always go there; low-rank ones where it is cheaper for the
  layer's input (:attr:`LowRankBank.low_rank_side`, :func:`low_rank_on_weight`).  The weight
  functions return a new tensor and never write the one they are handed: under ComfyUI's dynamic
  VRAM (v0.16+, NVIDIA) that is its cached device copy of the weight, not a per-call copy;
* **on the output** -- otherwise (several models stacked in one forward, layers without that
  protocol, layers that see few tokens): a forward hook adds the term to the output rows of each
  segment, ``tokens * r * (d_in + d_out)`` products and a pass over the output.

and, when one model runs per forward and the host grants memory for it
(:attr:`LowRankBank.swap_budget_bytes`), a third:

* **swapped in** -- the layer's weight with the segment's delta merged in, ``W + sum g * dW``, is
  computed once, kept, and put in place of the layer's weight for the forward (the way ComfyUI's
  own patcher sets a merged weight), then the original is put back.  The forward then costs what
  the plain model costs, for one weight-sized copy per adapted layer and model held.  The copy is
  made by the same operations as the weight side's per-call update, in the weight's own dtype, so
  where the model computes in that dtype both give the same bits.  Layers that dynamic VRAM
  streams (they carry ``_v``) read their cached copy, not ``module.weight``: they are never swapped.

A *segment* is one model to evaluate: ``()`` is the base, ``((i, 1.0),)`` is LoRA i alone and
``((1, c_1), (2, c_2), ...)`` is the Rewarded-Soup merge ``W + sum_i c_i dW_i``.  Several segments
can share one forward: the inputs are repeated along the batch, segment ``j`` owns rows
``[j*B, (j+1)*B)`` and each hook adds to a slice only that segment's terms.  The predictions of the
segments are then combined with the affine coefficients of :mod:`.coefficients`.

Because ``x0 = x - sigma * eps`` (and likewise for v-prediction) is affine in the network output at
fixed ``x`` and ``sigma``, combining denoised outputs with weights that sum to 1 is exactly the
``eps`` blend.

**A resident segment.**  When every step evaluates the same one or two models and the base is not
among them (exact at lambda = 1, the merge), a host may merge one segment into the weights once, at load time,
the way ComfyUI's own LoRA loader merges (:func:`static_segment`, :meth:`LowRankBank.segment_deltas`).
Every segment is then evaluated *relative* to it (:func:`relative_plan`): the resident segment
itself is a plain forward, the base is the resident terms with negated gains.  A single LoRA at its
own alpha, or a merge, then costs exactly one plain forward per call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .coefficients import BlendInputError, affine_coefficients
from .lora_file import LoraFile, LoraFormatError, LoraModule

__all__ = [
    "Mode",
    "MODES",
    "Segment",
    "BlendPlan",
    "LayerDelta",
    "LowRankBank",
    "SwapPool",
    "make_plan",
    "evaluate_plan",
    "evaluate_segments",
    "with_base",
    "static_segment",
    "relative_plan",
    "segment_minus",
    "repeat_batch",
    "combine",
]

_log = logging.getLogger(__name__)

Mode = Literal["exact", "sequential", "merged", "stochastic"]
LowRankSide = Literal["auto", "weight", "output"]
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


#: How many multi-term segments (coefficient sets) keep their concatenated factors cached.
_MERGED_CACHE_SEGMENTS = 4
#: How many (network, segments) keep their hooked layers cached.
_TARGETS_CACHE = 8
#: Floating-point weight dtypes a merged copy can be made in (quantized weights stay in the hooks).
_SWAP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
        parameter when no cast is needed), and ``addmm`` writes its result once, as an in-place
        update of a copy would."""
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


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for an inference tensor, which keeps none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _swappable(module: nn.Module) -> bool:
    """Can the layer's weight be replaced by a merged copy for a forward: a plain floating-point
    tensor with values (not quantized, not on the meta device) of a Linear's or Conv2d's shape."""
    weight = getattr(module, "_parameters", {}).get("weight")
    if hasattr(module, "_v"):
        # ComfyUI's dynamic VRAM streams this layer: a forward reads its cached device copy, never
        # ``module.weight``, so a merged copy swapped in would be ignored while the cache is resident.
        return False
    return (weight is not None and type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype in _SWAP_DTYPES
            and weight.device.type != "meta" and weight.ndim in (2, 4))


@dataclass
class _Swapped:
    """One layer's parameters with one segment's delta merged in (``merged``: ``{"weight": W + dW,
    "bias": b + db}``, the parts the segment changes) and what they were made from (``sources``:
    ``{name: (weak reference, data pointer, version)}``), to tell when the layer's own parameters
    changed since (ComfyUI replaces them when it patches or restores a model)."""

    merged: dict[str, torch.Tensor]
    sources: dict[str, tuple[weakref.ref, int, int | None]]

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.merged.values())

    def fresh(self, module: nn.Module) -> bool:
        for name, (ref, ptr, version) in self.sources.items():
            current = module._parameters.get(name)
            if current is None or ref() is not current or current.data_ptr() != ptr or _version(current) != version:
                return False
        return True


class SwapPool:
    """Memory for merged weight copies (:attr:`LowRankBank.swap_pool`), shared by every bank given
    the same pool: at most ``budget_bytes`` over all of them.  To make room for a plan, the copies
    of the least recently used other models (of any bank) go first.  A bank that is garbage
    collected frees its copies with it."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes={budget_bytes}: expected a number of bytes >= 0")
        self.budget_bytes = int(budget_bytes)
        # (id(bank), segment) -> weak reference to the bank; least recently used first
        self._order: OrderedDict[tuple[int, Segment], weakref.ref] = OrderedDict()

    def _live(self) -> list[tuple[tuple[int, Segment], "LowRankBank"]]:
        """The entries whose bank is alive and still holds the segment (stale ones are dropped)."""
        live = []
        for key, ref in list(self._order.items()):
            bank = ref()
            if bank is None or key[1] not in bank._swapped:
                del self._order[key]
            else:
                live.append((key, bank))
        return live

    @property
    def held_bytes(self) -> int:
        """Bytes of merged copies held now, over all banks."""
        return sum(bank._held_bytes(key[1]) for key, bank in self._live())

    def touch(self, bank: "LowRankBank", segment: Segment) -> None:
        """``segment`` of ``bank`` was just used."""
        key = (id(bank), segment)
        self._order.pop(key, None)
        self._order[key] = weakref.ref(bank)

    def make_room(self, bank: "LowRankBank", wanted: Sequence[Segment], need: int) -> None:
        """Drop other models' copies, least recently used first, until ``need`` bytes (the copies of
        ``wanted``, held or not) fit with what stays."""
        keep = {(id(bank), s) for s in wanted}
        others = [(key, owner, owner._held_bytes(key[1])) for key, owner in self._live() if key not in keep]
        held_by_others = sum(size for _, _, size in others)
        for key, owner, size in others:
            if need + held_by_others <= self.budget_bytes:
                break
            owner._swapped.pop(key[1], None)
            del self._order[key]
            held_by_others -= size


def _module_weight_shape(module: nn.Module) -> tuple[int, ...] | None:
    weight = getattr(module, "weight", None)
    return None if weight is None else tuple(weight.shape)


class LowRankBank:
    """The deltas of m LoRAs (low-rank factors, and dense deltas for adapters that are not
    low-rank), bound to the module paths of one network.

    Args:
        loras: the parsed LoRA files, in basis order.
        resolve: maps every module name a file may use to a module path of ``root``
            (see :func:`.lora_file.index_module_names`).
        root: the network the paths refer to; used once to check shapes.

    :meth:`from_deltas` builds a bank from per-basis ``{module path: LayerDelta}`` maps instead
    (what a host's own key map and weight adapters resolve a file to).
    """

    def __init__(self, loras: Sequence[LoraFile], resolve: Mapping[str, str], root: nn.Module):
        deltas: list[dict[str, LayerDelta]] = []
        for lora in loras:
            per_path: dict[str, LayerDelta] = {}
            for name, lm in lora.modules.items():
                path = resolve.get(name)
                if path is None:
                    raise LoraFormatError(
                        f"{lora.name}: module {name!r} matches no layer of this model's UNet "
                        "(is the LoRA for another architecture?)"
                    )
                self._check_shape(lora.name, name, lm, root.get_submodule(path))
                per_path[path] = LayerDelta(low_rank=lm)
            deltas.append(per_path)
        self._bind(deltas, root, [lora.name for lora in loras])

    @classmethod
    def from_deltas(cls, deltas: Sequence[Mapping[str, LayerDelta]], root: nn.Module,
                    names: Sequence[str] | None = None) -> "LowRankBank":
        """A bank over ``deltas[i]`` (``{module path of root: LayerDelta}``) for basis ``i``."""
        bank = cls.__new__(cls)
        names = list(names) if names is not None else [f"basis {i + 1}" for i in range(len(deltas))]
        for i, per_path in enumerate(deltas):
            for path, delta in per_path.items():
                if delta.low_rank is not None:
                    cls._check_shape(names[i], path, delta.low_rank, root.get_submodule(path))
                cls._check_dense(names[i], path, delta, root.get_submodule(path))
        bank._bind(deltas, root, names)
        return bank

    def _bind(self, deltas: Sequence[Mapping[str, LayerDelta]], root: nn.Module, names: Sequence[str]) -> None:
        self.num_bases = len(deltas)
        self.names = list(names)
        # path -> [(basis index, LayerDelta)]
        self._by_path: dict[str, list[tuple[int, LayerDelta]]] = {}
        for i, per_path in enumerate(deltas):
            for path, delta in per_path.items():
                self._by_path.setdefault(path, []).append((i, delta))
        self._cast: dict[tuple[str, torch.device, torch.dtype], dict[int, _Factors]] = {}
        # (segment, path, device, dtype) -> the combined delta of a multi-term segment
        self._merged: dict[tuple[Segment, str, torch.device, torch.dtype], _Factors] = {}
        self._merged_segments: list[Segment] = []
        self._targets_cache: dict[tuple[int, tuple[Segment, ...], frozenset[str]], tuple[weakref.ref, list]] = {}
        self._low_rank_side: LowRankSide = "auto"
        self.swap_pool: SwapPool | None = None
        # segment -> {path: merged parameters}, for the network _swap_root (recency: the pool's)
        self._swapped: dict[Segment, dict[str, _Swapped]] = {}
        self._swap_root: weakref.ref | None = None
        self._swap_layouts: dict[tuple[int, Segment], tuple[int, tuple[tuple[str, nn.Module], ...], frozenset[str]]] = {}
        self._swap_generation: object = None
        self._swap_refusals: set[int] = set()
        self._trainable = any(t is not None and t.requires_grad for per_path in deltas for d in per_path.values()
                              for t in (d.weight, d.bias, *(() if d.low_rank is None else
                                                            (d.low_rank.down, d.low_rank.up))))

    @property
    def low_rank_side(self) -> LowRankSide:
        """Where a low-rank delta goes when one model runs per forward, on layers with ComfyUI's
        weight functions (dense deltas always go on the weight):

        * ``"output"``: ``up(down(x))`` added to the output -- about ``rows * (d_in + 2 * d_out)``
          values moved, so its cost grows with the tokens the layer sees;
        * ``"weight"``: into ComfyUI's per-call copy of the weight -- about ``2 * weight.numel()``
          values moved whatever the number of tokens, plus the cast path's fixed cost per layer;
        * ``"auto"`` (default): per layer and call, the side :func:`low_rank_on_weight` finds cheaper.

        ``bench/families_speed.py`` measures all three (``--full-size --device cuda`` on full-size
        models)."""
        return self._low_rank_side

    @low_rank_side.setter
    def low_rank_side(self, value: LowRankSide) -> None:
        if value not in ("auto", "weight", "output"):
            raise ValueError(f"low_rank_side={value!r}: expected 'auto', 'weight' or 'output'")
        self._low_rank_side = value
        self._targets_cache.clear()

    @property
    def swap_budget_bytes(self) -> int:
        """Bytes of merged weights the bank may hold to evaluate one model per forward by swapping
        them in (module docstring): its :attr:`swap_pool`'s budget, which banks can share.  A plan
        is swapped in only when *all* of its models fit the budget (:meth:`swaps`), so which way a
        plan runs depends on the plan and the budget, never on what ran before it.  0 (default):
        never.  Setting it gives the bank a pool of its own; a host shares one pool between its
        banks (``nodes``: ``DIFFUSION_BLEND_SWAP_MB``)."""
        return 0 if self.swap_pool is None else self.swap_pool.budget_bytes

    @swap_budget_bytes.setter
    def swap_budget_bytes(self, value: int) -> None:
        self.swap_pool = SwapPool(value) if value != 0 else None

    @property
    def swap_pool(self) -> SwapPool | None:
        return self._swap_pool

    @swap_pool.setter
    def swap_pool(self, pool: SwapPool | None) -> None:
        self._swap_pool = pool
        if hasattr(self, "_swapped"):
            self.clear_swapped()

    def _held_bytes(self, segment: Segment) -> int:
        return sum(entry.num_bytes() for entry in self._swapped.get(segment, {}).values())

    @property
    def swapped_bytes(self) -> int:
        """Bytes of merged weights this bank holds now."""
        return sum(self._held_bytes(segment) for segment in self._swapped)

    def clear_swapped(self) -> None:
        """Drop every merged weight held."""
        self._swapped.clear()
        self._swap_layouts.clear()

    def weights_changed(self, generation: object) -> None:
        """The host's token for the state of the network's weights (ComfyUI: the patches its model
        was last patched with); merged copies made under another token are dropped.  The copies
        also check the parameters they were made from (identity, storage, version), but an
        inference tensor rewritten in place changes none of these."""
        if generation != self._swap_generation:
            self._swap_generation = generation
            self.clear_swapped()

    def _swap_layout(self, root: nn.Module, segment: Segment) -> tuple[int, tuple[tuple[str, nn.Module], ...], frozenset[str]]:
        """``(bytes of the merged copies, (path, layer) of every swappable layer, their paths)`` for
        the layers ``segment`` changes, cached per (network, segment): the lookups would cost more
        than the swap itself on every call."""
        key = (id(root), segment)
        layout = self._swap_layouts.get(key)
        if layout is None:
            used = {i for i, g in segment if g != 0.0}
            size, layers = 0, []
            for path, entries in self._by_path.items():
                parts = [d for i, d in entries if i in used]
                module = root.get_submodule(path) if parts else None
                if module is None or not _swappable(module):
                    continue
                if any(d.low_rank is not None or d.weight is not None for d in parts):
                    size += module.weight.numel() * module.weight.element_size()
                if any(d.bias is not None for d in parts) and isinstance(module._parameters.get("bias"), torch.Tensor):
                    size += module.bias.numel() * module.bias.element_size()
                layers.append((path, module))
            if len(self._swap_layouts) > 64:
                self._swap_layouts.clear()
            layout = self._swap_layouts[key] = (size, tuple(layers), frozenset(path for path, _ in layers))
        return layout

    def swaps(self, root: nn.Module, segments: Sequence[Segment]) -> bool:
        """Evaluate ``segments`` (one plan, one model per forward) with merged weights swapped in?
        Yes when the merged copies of all of them fit :attr:`swap_budget_bytes`; then the copies
        of other models in the pool are dropped, least recently used first, until they do."""
        pool = self.swap_pool
        if pool is None or pool.budget_bytes <= 0 or (self._trainable and torch.is_grad_enabled()):
            return False
        if self._swap_root is None or self._swap_root() is not root:
            self.clear_swapped()
            self._swap_root = weakref.ref(root)
        wanted = [s for s in dict.fromkeys(segments) if s]
        need = sum(self._swap_layout(root, s)[0] for s in wanted)
        if need == 0:
            return False
        if need > pool.budget_bytes:
            if need not in self._swap_refusals:  # once per plan size: the hooks serve it, a little slower
                self._swap_refusals.add(need)
                _log.info("Diffusion Blend: merged copies for %d models would take %.0f MiB, over the swap budget of "
                          "%.0f MiB; their deltas are added per call instead", len(wanted), need / 2**20,
                          pool.budget_bytes / 2**20)
            return False
        pool.make_room(self, wanted, need)
        return True

    def _swap_in(self, root: nn.Module, segment: Segment) -> tuple[list[tuple[nn.Module, str, torch.Tensor]], frozenset[str]]:
        """Put ``segment``'s merged parameters in place on every swappable layer it changes; returns
        ``(module, name, original)`` to put back and the paths done."""
        per_path = self._swapped.setdefault(segment, {})
        if self.swap_pool is not None:
            self.swap_pool.touch(self, segment)
        _, layers, paths = self._swap_layout(root, segment)
        swapped, done = [], []
        for path, module in layers:
            entry = per_path.get(path)
            if entry is None or not entry.fresh(module):
                if not _swappable(module):  # its weight is no longer a plain tensor: the hooks serve it
                    per_path.pop(path, None)
                    continue
                entry = per_path[path] = self._merge_layer(segment, path, module)
            for name, tensor in entry.merged.items():
                swapped.append((module, name, module._parameters[name]))
                module._parameters[name] = tensor
            done.append(path)
        return swapped, paths if len(done) == len(paths) else frozenset(done)

    def _merge_layer(self, segment: Segment, path: str, module: nn.Module) -> _Swapped:
        """``W + g * dW`` (and ``b + g * db``) for one layer, by the weight side's own operations."""
        weight = module._parameters["weight"]
        bias = module._parameters.get("bias")
        merged: dict[str, torch.Tensor] = {}
        delta = self._segment_delta(segment, path, module, weight.device, weight.dtype)
        with torch.no_grad():
            if delta is not None:
                factors, gain = delta
                if factors.down is not None or factors.dense is not None:
                    merged["weight"] = factors.weight_plus(weight.detach(), gain)
                if factors.bias is not None and isinstance(bias, torch.Tensor):
                    merged["bias"] = factors.bias_plus(bias.detach(), gain)
        sources = {name: (weakref.ref(module._parameters[name]), module._parameters[name].data_ptr(),
                          _version(module._parameters[name])) for name in merged}
        return _Swapped({name: nn.Parameter(t, requires_grad=False) for name, t in merged.items()}, sources)

    def num_bytes(self, basis: int | None = None) -> int:
        """Bytes the bank's deltas hold (of one basis, or of all), before any device copies."""
        return sum(d.num_bytes() for entries in self._by_path.values() for i, d in entries
                   if basis is None or i == basis)

    def dense_bytes(self, basis: int | None = None) -> int:
        """Bytes of the dense deltas (adapters that are not low-rank) alone."""
        return sum(t.numel() * t.element_size() for entries in self._by_path.values() for i, d in entries
                   if basis is None or i == basis for t in (d.weight, d.bias) if t is not None)

    @staticmethod
    def _check_dense(file: str, name: str, delta: LayerDelta, module: nn.Module) -> None:
        if delta.weight is None and delta.bias is None:
            return
        if not (isinstance(module, (nn.Linear, nn.Conv2d)) or _module_weight_shape(module) is not None
                and len(_module_weight_shape(module)) in (2, 4)):
            raise LoraFormatError(f"{file}: {name!r} targets a {type(module).__name__}, not a Linear or Conv2d")
        if delta.weight is not None and tuple(delta.weight.shape) != _module_weight_shape(module):
            raise LoraFormatError(f"{file}: {name!r} changes a weight of shape {tuple(delta.weight.shape)}, "
                                  f"but the model's layer weight is {_module_weight_shape(module)}")
        bias = getattr(module, "bias", None)
        if delta.bias is not None and (bias is None or tuple(delta.bias.shape) != tuple(bias.shape)):
            raise LoraFormatError(f"{file}: {name!r} changes a bias of shape {tuple(delta.bias.shape)}, but the "
                                  f"model's layer bias is {None if bias is None else tuple(bias.shape)}")

    @staticmethod
    def _check_shape(file: str, name: str, lm: LoraModule, module: nn.Module) -> None:
        shape = _module_weight_shape(module)
        if isinstance(module, nn.Conv2d) or (shape is not None and len(shape) == 4):
            expected_in, expected_out = shape[1], shape[0]
            # the down factor carries the layer's kernel (LoCon); a bare matrix only fits a 1x1 conv
            kernel_ok = tuple(lm.down.shape[2:]) == tuple(shape[2:]) or (lm.down.ndim == 2 and tuple(shape[2:]) == (1, 1))
        elif isinstance(module, nn.Linear) or (shape is not None and len(shape) == 2):
            expected_in, expected_out = shape[1], shape[0]
            kernel_ok = lm.down.ndim == 2 or tuple(lm.down.shape[2:]) == (1, 1)
        else:
            raise LoraFormatError(f"{file}: module {name!r} targets a {type(module).__name__}, not a Linear or Conv2d")
        if lm.in_features != expected_in or lm.out_features != expected_out or not kernel_ok:
            raise LoraFormatError(
                f"{file}: key {name!r} has shape down {tuple(lm.down.shape)} / up {tuple(lm.up.shape)}, "
                f"but the model's layer weight is {shape} (is the LoRA for another architecture?)"
            )

    @property
    def paths(self) -> list[str]:
        return list(self._by_path)

    def segment_deltas(self, segment: Segment) -> list[tuple[int, str, float, LayerDelta]]:
        """``(basis, module path, gain, delta)`` for every basis delta ``segment`` applies: what a
        host merges into the weights (``W += gain * dW``) to carry ``segment`` resident."""
        gains = {i: g for i, g in segment if g != 0.0}
        return [(i, path, gains[i], delta) for path, entries in self._by_path.items() for i, delta in entries
                if i in gains]

    def _factors(self, path: str, module: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[int, _Factors]:
        key = (path, device, dtype)
        cached = self._cast.get(key)
        if cached is None:
            conv = _is_conv(module)
            cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
            cached = {}
            for i, delta in self._by_path[path]:
                down = up = None
                lm = delta.low_rank
                if lm is not None:
                    down, up = lm.down, lm.up.float() * lm.scale
                    if dtype == torch.float16:  # the one compute dtype whose range down(x) can leave
                        down, up = balance_factors(down, up, getattr(module, "weight", None))
                    if conv and down.ndim == 2:
                        down, up = down[:, :, None, None], up[:, :, None, None]
                    if not conv and down.ndim == 4:
                        down, up = down.flatten(1), up.flatten(1)
                cached[i] = _Factors(down=cast(down), up=cast(up), conv=conv, dense=cast(delta.weight),
                                     bias=cast(delta.bias))
            self._cast[key] = cached
        return cached

    def _merged_factors(
        self, segment: Segment, path: str, module: nn.Module, device: torch.device, dtype: torch.dtype
    ) -> _Factors | None:
        """The terms of a multi-term segment at one module as a single delta.

        ``sum_i g_i * up_i(down_i(x)) = [g_1 up_1 | g_2 up_2 | ...]([down_1; down_2; ...] x)``: the
        down factors are stacked along the rank and the up factors, scaled by their gains,
        concatenated, so the merge costs one (sum r_i)-rank product per layer instead of m; dense
        deltas and biases are summed with their gains.  Cached for the last few segments (one per
        coefficient set in use).
        """
        key = (segment, path, device, dtype)
        if key in self._merged:
            return self._merged[key]
        if segment not in self._merged_segments:
            self._merged_segments.append(segment)
            while len(self._merged_segments) > _MERGED_CACHE_SEGMENTS:
                stale = self._merged_segments.pop(0)
                self._merged = {k: v for k, v in self._merged.items() if k[0] != stale}
        factors = self._factors(path, module, device, dtype)
        terms = [(factors[i], gain) for i, gain in segment if i in factors and gain != 0.0]
        cached = None
        if terms:
            low = [(f, g) for f, g in terms if f.down is not None]

            def weighted_sum(parts):
                parts = [(t, g) for t, g in parts if t is not None]
                return sum((t * g for t, g in parts[1:]), parts[0][0] * parts[0][1]) if parts else None

            cached = _Factors(
                down=torch.cat([f.down for f, _ in low], dim=0) if low else None,
                up=torch.cat([f.up * gain for f, gain in low], dim=1) if low else None,
                conv=terms[0][0].conv,
                dense=weighted_sum([(f.dense, g) for f, g in terms]),
                bias=weighted_sum([(f.bias, g) for f, g in terms]),
            )
        self._merged[key] = cached
        return cached

    def _segment_delta(
        self, segment: Segment, path: str, module: nn.Module, device: torch.device, dtype: torch.dtype
    ) -> tuple[_Factors, float] | None:
        """A segment's delta at one layer as ``(factors, gain)``; None when it adds nothing there."""
        if len(segment) > 1:  # a merge: one concatenated low-rank product
            merged = self._merged_factors(segment, path, module, device, dtype)
            return None if merged is None else (merged, 1.0)
        if not segment:
            return None
        i, gain = segment[0]
        factors = self._factors(path, module, device, dtype).get(i)
        return None if factors is None or gain == 0.0 else (factors, gain)

    def _hook(self, path: str, segments: tuple[Segment, ...]):
        def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            rows = x.shape[0] // len(segments)
            if rows * len(segments) != x.shape[0]:
                raise RuntimeError(
                    f"diffusion blend: layer {path} got batch {x.shape[0]}, not a multiple of "
                    f"{len(segments)} segments"
                )
            for j, segment in enumerate(segments):
                delta = self._segment_delta(segment, path, module, x.device, x.dtype)
                if delta is not None:
                    sl = slice(j * rows, (j + 1) * rows)
                    delta[0].add_to(output[sl], x[sl], module, delta[1])
            return output

        return hook

    def _targets(self, root: nn.Module, segments: tuple[Segment, ...], swapped: frozenset[str] = frozenset()
                 ) -> list[tuple[nn.Module, object, object]]:
        """``(module, pre-hook or None, hook)`` for every layer ``segments`` change but the
        ``swapped`` ones, cached per (network, segments, swapped) for the last few: the lookups
        cost ~1.5 ms a call on a UNet."""
        key = (id(root), segments, swapped)
        hit = self._targets_cache.get(key)
        if hit is not None and hit[0]() is root:
            return hit[1]
        used = {i for s in segments for i, g in s if g != 0.0}
        targets = []
        for path, entries in self._by_path.items():
            if not any(i in used for i, _ in entries) or path in swapped:
                continue
            module = root.get_submodule(path)
            weight_side = self.low_rank_side != "output" or any(i in used and d.weight is not None for i, d in entries)
            if len(segments) == 1 and weight_side and _takes_weight_functions(module):
                patch = _WeightPatch(self, path, module, segments[0])
                targets.append((module, patch.before, patch.after))
            else:
                targets.append((module, None, self._hook(path, segments)))
        while len(self._targets_cache) >= _TARGETS_CACHE:
            self._targets_cache.pop(next(iter(self._targets_cache)))
        self._targets_cache[key] = (weakref.ref(root), targets)
        return targets

    @contextlib.contextmanager
    def active(self, root: nn.Module, segments: tuple[Segment, ...], swap: bool = False) -> Iterator[None]:
        """While inside, ``root``'s forward computes ``segments`` stacked along the batch.  ``swap``
        (one segment, after :meth:`swaps` said yes for its plan): its merged weights are swapped in
        on every layer that allows it, the hooks serve the rest."""
        if all(not s for s in segments):
            yield
            return
        swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
        handles: list = []
        targets: list = []
        try:
            done: frozenset[str] = frozenset()
            if swap and len(segments) == 1:
                swapped, done = self._swap_in(root, segments[0])
            targets = self._targets(root, segments, done)
            for module, before, after in targets:
                if before is not None:
                    handles.append(module.register_forward_pre_hook(before))
                handles.append(module.register_forward_hook(after))
            yield
        finally:
            for h in handles:
                h.remove()
            for _, before, _ in targets:  # a forward that raised inside a layer leaves its functions pushed
                if before is not None:
                    before.__self__.unpush()
            for module, name, original in reversed(swapped):
                module._parameters[name] = original


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

    def __init__(self, bank: LowRankBank, path: str, module: nn.Module, segment: Segment):
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


def evaluate_segments(
    plan: BlendPlan,
    bank: LowRankBank,
    root: nn.Module,
    run: Callable[[int], torch.Tensor],
    batch: int,
    segments_per_call: int | None = None,
) -> list[torch.Tensor]:
    """The output of every segment of ``plan`` (same order), ``segments_per_call`` at a time.

    Args:
        run: ``run(k)`` runs the network once on its inputs repeated ``k`` times along the batch
            (``run(1)`` on the original inputs) and returns the output (batch ``k * batch``).
        root: the module the bank's paths refer to (hooks go there).
        batch: ``B``, the batch size of the original inputs.
        segments_per_call: at most this many segments share one forward (``None``: all of them,
            ``1``: sequential).
    """
    n = len(plan.segments)
    per_call = n if segments_per_call is None else max(1, min(n, segments_per_call))
    swap = per_call == 1 and bank.swaps(root, plan.segments)
    outputs: list[torch.Tensor] = []
    for start in range(0, n, per_call):
        chunk = plan.segments[start : start + per_call]
        with bank.active(root, chunk, swap):
            out = run(len(chunk))
        outputs.extend(out.split(batch, dim=0) if len(chunk) > 1 else (out,))
    return outputs


def evaluate_plan(
    plan: BlendPlan,
    bank: LowRankBank,
    root: nn.Module,
    run: Callable[[int], torch.Tensor],
    batch: int,
    segments_per_call: int | None = None,
) -> torch.Tensor:
    """Run ``plan`` and combine the outputs (arguments as :func:`evaluate_segments`)."""
    if plan.is_plain:
        return run(1)
    return combine(evaluate_segments(plan, bank, root, run, batch, segments_per_call), plan.weights)


def with_base(plan: BlendPlan) -> tuple[BlendPlan, int]:
    """``plan`` with the base model among its segments (weight 0 if it was not), and its index.

    SMC needs the base's prediction next to the blend's: when the blend evaluates the base anyway
    (its affine coefficient is non-zero) this costs nothing, else one more model in the forward."""
    if () in plan.segments:
        return plan, plan.segments.index(())
    return BlendPlan(plan.segments + ((),), plan.weights + (0.0,)), len(plan.segments)
