"""Evaluating a blend of LoRAs on one shared network: the bank of deltas and where each goes.

The runtime never writes the network's weights.  :mod:`.plan` decides *what* to evaluate (the
segments of a call and how their outputs combine); this module binds the LoRAs' deltas
(:mod:`.deltas`) to the network's layers (:class:`LowRankBank`) and, per layer and call, picks how a
segment's delta reaches it:

* **on the weight** (:mod:`.weight_functions`) -- one model per forward on a layer that takes
  ComfyUI's weight functions: ``W + dW`` computed per call, never written into the weight handed in;
* **on the output** (:mod:`.output_hooks`) -- several models stacked in one forward, layers without
  weight functions, or where it is cheaper: ``up(down(x))`` added to each segment's output rows;
* **swapped in** (:mod:`.swap`) -- one model per forward with a memory budget: a merged copy of the
  layer's weight put in its place for the forward;
* **merged at load** -- a resident segment (:func:`.plan.static_segment`) handed to the host's own
  weight patching once (:meth:`LowRankBank.segment_deltas`; ComfyUI: ``nodes/comfy_wrapper.py``).

:func:`evaluate_plan` runs a plan with a host's ``run(k)`` (one forward on the inputs repeated ``k``
times) and combines the outputs.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from .deltas import LayerDelta, _Factors, _is_conv, _module_weight_shape, balance_factors
from .lora_file import LoraFile, LoraFormatError, LoraModule
from .output_hooks import output_hook
from .plan import (MODES, BlendPlan, Mode, Segment, Term, combine, make_plan, relative_plan, repeat_batch,
                   segment_minus, static_segment, with_base)
from .swap import SwapPool, SwappedCopies, _Swapped
from .weight_functions import _takes_weight_functions, _WeightPatch, low_rank_on_weight

__all__ = [
    "Mode",
    "MODES",
    "Segment",
    "Term",
    "BlendPlan",
    "LayerDelta",
    "LowRankBank",
    "LowRankSide",
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
    "low_rank_on_weight",
]

LowRankSide = Literal["auto", "weight", "output"]

#: How many multi-term segments (coefficient sets) keep their concatenated factors cached.
_MERGED_CACHE_SEGMENTS = 4
#: How many (network, segments) keep their hooked layers cached.
_TARGETS_CACHE = 8


class LowRankBank(SwappedCopies):
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
                targets.append((module, None, output_hook(self, path, segments)))
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


def evaluate_segments(
    plan: BlendPlan,
    bank: LowRankBank,
    root: nn.Module,
    run: Callable[[int], torch.Tensor],
    batch: int,
    segments_per_call: int | None = None,
    on_out_of_memory: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """The output of every segment of ``plan`` (same order), ``segments_per_call`` at a time.

    Args:
        run: ``run(k)`` runs the network once on its inputs repeated ``k`` times along the batch
            (``run(1)`` on the original inputs) and returns the output (batch ``k * batch``).
        root: the module the bank's paths refer to (hooks go there).
        batch: ``B``, the batch size of the original inputs.
        segments_per_call: at most this many segments share one forward (``None``: all of them,
            ``1``: sequential).
        on_out_of_memory: a stacked forward that runs out of memory (``torch.OutOfMemoryError``) is
            retried with half as many segments per forward, down to one; this is called with the new
            count first (to free cached memory, remember the count).  A single segment that does not
            fit raises as before.  The segments not evaluated yet are then evaluated exactly as in a
            run that used the smaller count for them.
    """
    n = len(plan.segments)
    per_call = n if segments_per_call is None else max(1, min(n, segments_per_call))
    swap = per_call == 1 and bank.swaps(root, plan.segments)
    outputs: list[torch.Tensor] = []
    while len(outputs) < n:
        chunk = plan.segments[len(outputs) : len(outputs) + per_call]
        try:
            with bank.active(root, chunk, swap):
                out = run(len(chunk))
        except torch.OutOfMemoryError:
            if per_call == 1:
                raise
            per_call //= 2
            swap = per_call == 1 and bank.swaps(root, plan.segments)
            if on_out_of_memory is not None:
                on_out_of_memory(per_call)
            continue
        outputs.extend(out.split(batch, dim=0) if len(chunk) > 1 else (out,))
    return outputs


def evaluate_plan(
    plan: BlendPlan,
    bank: LowRankBank,
    root: nn.Module,
    run: Callable[[int], torch.Tensor],
    batch: int,
    segments_per_call: int | None = None,
    on_out_of_memory: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run ``plan`` and combine the outputs (arguments as :func:`evaluate_segments`)."""
    if plan.is_plain:
        return run(1)
    outputs = evaluate_segments(plan, bank, root, run, batch, segments_per_call, on_out_of_memory)
    return combine(outputs, plan.weights)
