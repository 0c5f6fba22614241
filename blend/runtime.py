"""Evaluating a blend of LoRAs on one shared network.

The network's weights are never touched.  While a blended call runs, forward hooks on the
targeted Linear/Conv2d modules add low-rank terms to their outputs:

    y = W x  (+ bias)  +  sum_{(i, g) in segment}  g * s_i * up_i(down_i(x))

A *segment* is one model to evaluate: ``()`` is the base, ``((i, 1.0),)`` is LoRA i alone and
``((1, c_1), (2, c_2), ...)`` is the Rewarded-Soup merge ``W + sum_i c_i dW_i``.  Several segments
can share one forward: the inputs are repeated along the batch, segment ``j`` owns rows
``[j*B, (j+1)*B)`` and each hook adds to a slice only that segment's terms.  The predictions of the
segments are then combined with the affine coefficients of :mod:`.coefficients`.

Because ``x0 = x - sigma * eps`` (and likewise for v-prediction) is affine in the network output at
fixed ``x`` and ``sigma``, combining denoised outputs with weights that sum to 1 is exactly the
``eps`` blend.
"""

from __future__ import annotations

import contextlib
import random
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
    "make_plan",
    "evaluate_plan",
    "evaluate_segments",
    "with_base",
    "repeat_batch",
    "combine",
]

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

    def add_to(self, output: torch.Tensor, x: torch.Tensor, module: nn.Module, gain: float = 1.0) -> None:
        """``output += gain * delta(x)`` in place.  For a linear layer the last product is an
        in-place ``addmm_`` into the output (no temporary of the output's size, one pass less)."""
        if not self.conv and output.is_contiguous() and x.is_contiguous():
            out2d, x2d = output.view(-1, output.shape[-1]), x.view(-1, x.shape[-1])
            if self.down is not None:
                out2d.addmm_(F.linear(x2d, self.down), self.up.t(), alpha=gain)
            if self.dense is not None:
                out2d.addmm_(x2d, self.dense.t(), alpha=gain)
        else:
            matrix = self.apply(x, module)
            if matrix is not None:
                output.add_(matrix, alpha=gain)
        if self.bias is not None:
            output.add_(self.bias.reshape((-1, 1, 1) if self.conv else (-1,)), alpha=gain)


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

    def _hook(self, path: str, segments: tuple[Segment, ...]):
        def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            factors = self._factors(path, module, x.device, x.dtype)
            rows = x.shape[0] // len(segments)
            if rows * len(segments) != x.shape[0]:
                raise RuntimeError(
                    f"diffusion blend: layer {path} got batch {x.shape[0]}, not a multiple of "
                    f"{len(segments)} segments"
                )
            for j, segment in enumerate(segments):
                sl = slice(j * rows, (j + 1) * rows)
                if len(segment) > 1:  # a merge: one concatenated low-rank product
                    merged = self._merged_factors(segment, path, module, x.device, x.dtype)
                    if merged is not None:
                        merged.add_to(output[sl], x[sl], module)
                    continue
                for i, gain in segment:
                    f = factors.get(i)
                    if f is None or gain == 0.0:
                        continue
                    f.add_to(output[sl], x[sl], module, gain)
            return output

        return hook

    @contextlib.contextmanager
    def active(self, root: nn.Module, segments: tuple[Segment, ...]) -> Iterator[None]:
        """While inside, ``root``'s forward computes ``segments`` stacked along the batch."""
        if all(not s for s in segments):
            yield
            return
        used = {i for s in segments for i, g in s if g != 0.0}
        handles = []
        try:
            for path, entries in self._by_path.items():
                if any(i in used for i, _ in entries):
                    module = root.get_submodule(path)
                    handles.append(module.register_forward_hook(self._hook(path, segments)))
            yield
        finally:
            for h in handles:
                h.remove()


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
    outputs: list[torch.Tensor] = []
    for start in range(0, n, per_call):
        chunk = plan.segments[start : start + per_call]
        with bank.active(root, chunk):
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
