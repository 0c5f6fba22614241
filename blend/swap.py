"""Delivery by swapped copies: a segment's merged weights put in place of a layer's for a forward.

When one model runs per forward and the host grants memory for it
(:attr:`SwappedCopies.swap_budget_bytes`), the layer's weight with the segment's delta merged in,
``W + sum g * dW``, is computed once, kept, and put in place of the layer's weight for the forward
(the way ComfyUI's own patcher sets a merged weight), then the original is put back.  The forward
then costs what the plain model costs, for one weight-sized copy per adapted layer and model held.
The copy is made by the same operation as the weight functions' per-call update
(:meth:`.deltas._Factors.weight_plus`), in the weight's own dtype, so where the model computes in
that dtype both give the same bits.  A plan is swapped in only when all its models' copies fit the
budget (:meth:`SwappedCopies.swaps`); banks given one :class:`SwapPool` share one budget.

Layers that ComfyUI's dynamic VRAM streams (they carry ``_v``) read their cached device copy, never
``module.weight``: they are never swapped, the weight functions serve them.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .plan import Segment

if TYPE_CHECKING:
    from .runtime import LowRankBank

__all__ = ["SwapPool", "SwappedCopies"]

_log = logging.getLogger(__name__)

#: Floating-point weight dtypes a merged copy can be made in (quantized weights stay in the hooks).
_SWAP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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


class SwappedCopies:
    """The bank's merged copies (mixed into :class:`.runtime.LowRankBank`, which provides
    ``_by_path``, ``_trainable`` and ``_segment_delta``)."""

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

