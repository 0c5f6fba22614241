"""The blend as a ComfyUI ``APPLY_MODEL`` wrapper (keyed, so it stacks with other packs').

ComfyUI calls ``BaseModel.apply_model(x, t, c_concat, c_crossattn, control, transformer_options,
**kwargs)`` below CFG and every guider, for cond and uncond chunks batched together, and returns
the denoised ``x0``.  The wrapper evaluates the blend's models there -- several of them in one
forward by repeating every batched input -- and combines their ``x0`` (see ``blend.runtime``).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.utils
import comfy.weight_adapter

from ..blend.lora_file import LoraFile, LoraFormatError, LoraModule, index_module_names
from ..blend.memory import SWAP_ENV, swap_budget, swap_pool  # noqa: F401  (the nodes' budget is the shared one)
from ..blend.runtime import (BlendPlan, LayerDelta, LowRankBank, Mode, Segment, combine, evaluate_plan,
                             evaluate_segments, make_plan, relative_plan, repeat_batch, with_base)

WRAPPER_KEY = "diffusion_blend"
#: ``transformer_options`` key of the SMC sampler's :class:`BaseTap`
TAP_KEY = "diffusion_blend_base_tap"
_PREFIX = "diffusion_model."


def module_name_index(base_model) -> dict[str, str]:
    """The project's own LoRA module names (kohya, diffusers/peft, ComfyUI) -> module path in
    ``diffusion_model``."""
    pairs: list[tuple[str, str]] = []
    unet_config = getattr(base_model.model_config, "unet_config", {}) or {}
    for diffusers_key, comfy_key in comfy.utils.unet_to_diffusers(unet_config).items():
        if diffusers_key.endswith(".weight") and comfy_key.endswith(".weight"):
            pairs.append((diffusers_key[: -len(".weight")], comfy_key[: -len(".weight")]))
    for name, module in base_model.diffusion_model.named_modules():
        if name and hasattr(module, "weight"):
            pairs.append((name, name))
    return index_module_names(pairs)


def lora_key_map(base_model) -> dict:
    """LoRA module name -> model state-dict key, the way ComfyUI's stock loader maps it
    (``comfy.lora.model_lora_keys_unet``: a key, or ``(key, (dim, offset, size)[, function])`` for a
    slice of a fused weight and key transforms such as SD3's ``swap_scale_shift``), with the
    project's own names first."""
    key_map = dict(comfy.lora.model_lora_keys_unet(base_model, {}))
    for name, path in module_name_index(base_model).items():
        key_map[name] = f"{_PREFIX}{path}.weight"
    return key_map


def _target(target) -> tuple[str, tuple[int, int, int] | None, object]:
    """``(state-dict key, offset or None, function or None)`` of one ``load_lora`` patch target."""
    if isinstance(target, str):
        return target, None, None
    return target[0], target[1], (target[2] if len(target) > 2 else None)


def _module_of(base_model, key: str, file: str):
    if not key.startswith(_PREFIX) or not key.endswith((".weight", ".bias")):
        raise LoraFormatError(f"{file}: it patches {key!r}, which is not a weight or bias of the diffusion model")
    path = key[len(_PREFIX):].rsplit(".", 1)[0]
    try:
        module = base_model.diffusion_model.get_submodule(path)
    except AttributeError:
        raise LoraFormatError(f"{file}: it patches {key!r}, which this model does not have") from None
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        raise LoraFormatError(f"{file}: it patches {key!r}, a {type(module).__name__}; the blend adds deltas to the "
                              "outputs of Linear and Conv2d layers only (use the stock LoraLoader for this file)")
    return path, module


def _plain_low_rank(patch) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(up, down, scale)`` of a plain LoRA/LoCon patch (no DoRA scale, Tucker mid or reshape)."""
    if not isinstance(patch, comfy.weight_adapter.LoRAAdapter):
        return None
    up, down, alpha, mid, dora_scale, reshape = patch.weights
    if mid is not None or dora_scale is not None or reshape is not None:
        return None
    return up, down, (1.0 if alpha is None else alpha / down.shape[0])


def _sliced_low_rank(up, down, scale, module, offset, function):
    """The patch as ``(down, up)`` on the whole layer: a slice ``(dim, offset, size)`` of the
    weight becomes zero rows of ``up`` (dim 0) or zero columns of ``down`` (dim 1); a key transform
    (a row-wise function such as ``swap_scale_shift``) is applied to ``up``.  None when the patch
    cannot be written that way (then it is applied as a dense delta)."""
    out_features, in_features = module.weight.shape[0], module.weight.shape[1]
    conv = module.weight.ndim == 4
    up = up.float().flatten(1) * scale
    down = down.float()
    if conv and down.ndim == 2 and down.shape[1] != in_features:  # a LoCon stored flat: (rank, in * kh * kw)
        down = down.reshape(down.shape[0], *module.weight.shape[1:])
    if function is not None:
        if offset is not None or conv:
            return None
        moved = function(up)
        if moved.shape != up.shape or not torch.allclose(function(up @ down.flatten(1)), moved @ down.flatten(1),
                                                         rtol=1e-5, atol=1e-6):
            return None  # not a row-wise transform
        up = moved
    if offset is not None:
        dim, start, size = offset
        if conv or dim not in (0, 1):
            return None
        if dim == 0:
            if up.shape[0] != size:
                return None
            up = torch.zeros(out_features, up.shape[1]).index_copy_(0, torch.arange(start, start + size), up)
        else:
            if down.shape[1] != size:
                return None
            down = torch.zeros(down.shape[0], in_features).index_copy_(1, torch.arange(start, start + size), down)
    if conv and down.ndim == 2:
        down = down[:, :, None, None]
    return down, up


def _check_low_rank_shape(up, down, module, offset, name: str, file: str, family: str) -> None:
    """The shape check the stock loader does implicitly (its product must reshape to the weight);
    ``name`` is the module's name in the file."""
    shape = list(module.weight.shape)
    if offset is not None:
        shape[offset[0]] = offset[2]
    rows, cols = up.shape[0], down.flatten(1).shape[1]
    if rows != shape[0] or rows * cols != torch.Size(shape).numel():
        raise LoraFormatError(
            f"{file}: module {name!r}{'' if offset is None else f' (slice {offset} of its layer)'} has up {tuple(up.shape)} / "
            f"down {tuple(down.shape)}, but the model's weight there is {tuple(shape)}; this model was detected "
            f"as {family}. Is the LoRA for another model family or size?")


def _patch_tensors(patch) -> list[torch.Tensor]:
    values = patch.weights if isinstance(patch, comfy.weight_adapter.WeightAdapterBase) else patch[-1]
    return [v for v in values if isinstance(v, torch.Tensor)]


def effective_weight(patcher, key: str) -> torch.Tensor:
    """The weight ``key`` has when ``patcher`` runs, in float32: the model's original weight (the
    shared backup when another clone has patched it in place) with the patcher's own patches
    (LoRAs loaded before the blend) applied by ComfyUI's ``calculate_weight``."""
    backup = patcher.backup.get(key)
    original = backup.weight if backup is not None else comfy.utils.get_attr(patcher.model, key)
    weight = original.detach().to(torch.float32, copy=True)
    own = patcher.patches.get(key)
    return comfy.lora.calculate_weight(own, weight, key) if own else weight


def _dense_delta(patcher, patch, key: str, offset, function) -> torch.Tensor:
    """``W' - W`` of one patch on the weight the patcher runs with, computed by ComfyUI's own
    ``calculate_weight`` at strength 1 (what the stock loader merges on top), in float32.  DoRA's
    normalisation makes it depend on ``W``, which is why ``W`` is the effective weight."""
    weight = effective_weight(patcher, key)
    patched = comfy.lora.calculate_weight([(1.0, patch, 1.0, offset, function)], weight.clone(), key,
                                          intermediate_dtype=torch.float32, original_weights={key: [(weight,)]})
    if patched.shape != weight.shape:
        raise LoraFormatError(f"the patch for {key} reshapes the weight from {tuple(weight.shape)} to "
                              f"{tuple(patched.shape)}, which a blend cannot do at the layer's output")
    if torch.equal(patched, weight) and any(t.count_nonzero() for t in _patch_tensors(patch)):
        # ComfyUI's adapters log a shape error and leave the weight as it was
        kind = getattr(patch, "name", None) or (patch[0] if isinstance(patch, tuple) else type(patch).__name__)
        where = weight if offset is None else weight.narrow(offset[0], offset[1], offset[2])
        raise LoraFormatError(f"the {kind} patch for {key}{'' if offset is None else f' (slice {offset})'} (shapes "
                              f"{[tuple(t.shape) for t in _patch_tensors(patch)]}) does not fit the model's weight "
                              f"there, {tuple(where.shape)}")
    return patched - weight


def file_modules(keys, key_map) -> tuple[dict[object, str], list[str]]:
    """``({target: module name in the file}, unmatched keys)`` for the file's ``keys``: a key is
    claimed by a module name of ``key_map`` that is a dotted prefix of it (the stock loader reads
    ``<name>.<adapter suffix>``); keys no name claims are what the stock loader would skip."""
    names = set(key_map)
    claimed: dict[object, str] = {}
    unmatched = []
    for key in keys:
        parts = key.split(".")
        prefixes = [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)]
        prefixes += [p[: -len("_lora")] for p in prefixes if p.endswith("_lora")]  # diffusers' old "to_q_lora.up"
        hit = next((p for p in prefixes if p in names), None)
        if hit is None:
            unmatched.append(key)
        else:
            claimed.setdefault(key_map[hit], hit)
    return claimed, unmatched


def family_name(base_model) -> str:
    """The family ComfyUI detected (its ``supported_models`` class: SD15, SDXL, SD3, Flux, ...)."""
    config = getattr(base_model, "model_config", None)
    return type(config if config is not None else base_model).__name__


def _concat_low_rank(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> LoraModule:
    """Several ``(down, up)`` patches of one layer (q, k, v slices of a fused qkv) as one product:
    downs stacked along the rank, ups side by side (the LoRA scale is already in ``up``)."""
    down = torch.cat([d for d, _ in pairs], dim=0)
    up = torch.cat([u for _, u in pairs], dim=1)
    if down.ndim == 4:  # a conv: up is a 1x1 convolution
        up = up[:, :, None, None]
    return LoraModule(down=down, up=up, alpha=None)


def host_deltas(patcher, lora: LoraFile, key_map: dict | None = None) -> dict[str, LayerDelta]:
    """One LoRA file as ``{module path of diffusion_model: LayerDelta}``, resolved exactly as the
    stock loader resolves it: ComfyUI's key map and ``comfy.lora.load_lora`` (its weight
    adapters).  Plain LoRA/LoCon patches stay low-rank (sliced targets as zero-padded factors,
    several patches of one layer concatenated along the rank); every other adapter (LoHa, LoKr,
    DoRA, full/diff weights, ``set``) becomes the dense delta ComfyUI's own code computes.

    ``patcher`` is the ComfyUI ``ModelPatcher`` the blend will run on (its weights define DoRA's)."""
    base_model = patcher.model
    key_map = lora_key_map(base_model) if key_map is None else key_map
    tensors = comfy.lora_convert.convert_lora(dict(lora.tensors))
    claimed, missing = file_modules(tensors, key_map)
    family = family_name(base_model)
    if missing:
        missing = sorted(missing, key=lambda k: (k.endswith(".alpha"), k))  # weights first: they name the layer
        shown = ", ".join(repr(k) for k in missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise LoraFormatError(
            f"{lora.name}: {len(missing)} of its {len(tensors)} keys match no layer of this model "
            f"(detected as {family}), e.g. {shown}; ComfyUI's own LoRA loader cannot map them either. "
            "Is the LoRA for another model family?")
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    low: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    dense: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for target, patch in patches.items():
        key, offset, function = _target(target)
        path, module = _module_of(base_model, key, lora.name)
        is_bias = key.endswith(".bias")
        plain = None if is_bias else _plain_low_rank(patch)
        if plain is not None:
            _check_low_rank_shape(plain[0], plain[1], module, offset, claimed.get(target, key), lora.name, family)
        factors = None if plain is None else _sliced_low_rank(*plain, module, offset, function)
        if factors is not None:
            # held at the file's precision, or the model's when that is higher: a half-precision file on a
            # half-precision model is then used without any copy
            dtype = torch.promote_types(plain[0].dtype, module.weight.dtype)
            low.setdefault(path, []).append(tuple(t.to(dtype) for t in factors))
            continue
        try:
            delta = _dense_delta(patcher, patch, key, offset, function)
        except LoraFormatError as exc:
            raise LoraFormatError(f"{lora.name}: module {claimed.get(target, key)!r}: {exc}; this model was detected as {family}. "
                                  "Is the LoRA for another model family or size?") from None
        store = biases if is_bias else dense
        store[path] = delta if path not in store else store[path] + delta
    for store in (dense, biases):  # held in the model's dtype: one weight-sized copy per adapted layer
        for path, delta in store.items():
            dtype = base_model.diffusion_model.get_submodule(path).weight.dtype
            store[path] = delta.to(dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16)
    return {path: LayerDelta(low_rank=_concat_low_rank(low[path]) if path in low else None,
                             weight=dense.get(path), bias=biases.get(path)) for path in {*low, *dense, *biases}}


def bind_bank(patcher, loras: Sequence[LoraFile]) -> LowRankBank:
    """The bank of ``loras`` on the patcher's model, every file resolved as the stock loader would,
    sharing the :func:`swap_pool` of the patcher's device."""
    key_map = lora_key_map(patcher.model)
    bank = LowRankBank.from_deltas([host_deltas(patcher, lora, key_map) for lora in loras],
                                   patcher.model.diffusion_model, [lora.name for lora in loras])
    bank.swap_pool = swap_pool(torch.device(patcher.load_device))
    return bank


def merge_resident(patcher, bank: LowRankBank, segment: Segment) -> None:
    """Make ``segment`` resident in ``patcher`` (a clone): its deltas become ComfyUI weight patches,
    merged into the weights when ComfyUI loads the model -- the stock LoRA loader's mechanism, at
    the stock loader's cost of one plain forward a call.  The patches are the bank's own deltas
    (low-rank as a LoRA adapter on the same tensors, dense ones as ``diff``), so what is merged is
    exactly what the blend's hooks would add: ``W + sum_i g_i dW_i``."""
    # one add_patches call per (basis, kind) -- each call walks the model's whole state dict -- and
    # per basis, so that two bases on one layer stay two patches
    groups: dict[tuple[int, float, str], dict[str, object]] = {}
    for i, path, gain, delta in bank.segment_deltas(segment):
        key = f"{_PREFIX}{path}"
        if delta.low_rank is not None:
            lm = delta.low_rank
            groups.setdefault((i, gain, "lora"), {})[f"{key}.weight"] = comfy.weight_adapter.LoRAAdapter(
                set(), (lm.up, lm.down, lm.alpha, None, None, None))
        if delta.weight is not None:
            groups.setdefault((i, gain, "diff"), {})[f"{key}.weight"] = ("diff", (delta.weight,))
        if delta.bias is not None:
            groups.setdefault((i, gain, "diff"), {})[f"{key}.bias"] = ("diff", (delta.bias,))
    for (_, gain, _), patches in groups.items():
        missing = set(patches) - set(patcher.add_patches(patches, strength_patch=gain))
        if missing:
            raise RuntimeError(f"Diffusion Blend: ComfyUI's model has no weights {sorted(missing)[:3]} to merge the "
                               "blend into")


def _fresh_lists(control):
    """A shallow copy of ComfyUI's control dict ``{"input": [...], "middle": [...], "output": [...]}``."""
    if isinstance(control, dict):
        return {name: list(v) if isinstance(v, list) else v for name, v in control.items()}
    return control


def free_memory(base_model, device: torch.device) -> int:
    """Bytes free for a forward of ``base_model`` on ``device``: its loaded patcher's own figure where
    the host offers one (``ModelPatcher.get_free_memory``, v0.16+: it counts the VRAM that dynamic
    VRAM can reclaim), else ComfyUI's global one."""
    for loaded in comfy.model_management.current_loaded_models:
        patcher = getattr(loaded, "model", None)
        if getattr(patcher, "model", None) is base_model and hasattr(patcher, "get_free_memory"):
            return patcher.get_free_memory(device)
    return comfy.model_management.get_free_memory(device)


def _segments_that_fit(base_model, x: torch.Tensor, wanted: int) -> int:
    """How many copies of the batch fit one forward, by ComfyUI's own memory estimate."""
    if wanted <= 1:
        return 1
    free = free_memory(base_model, x.device)
    for k in range(wanted, 1, -1):
        if base_model.memory_required([x.shape[0] * k, *x.shape[1:]]) * 1.5 < free:
            return k
    return 1


class BaseTap:
    """The SMC sampler's side channel to the blend: the base model's prediction next to the blend's.

    ``record()``: every blended ``apply_model`` call also evaluates the base (free when the blend
    evaluates it anyway) and stores its output.  ``replay()``: the same calls, made again in the same
    order by the sampler, return the stored outputs without running any model, so the guider above
    (CFG, post-CFG hooks) turns them into the *guided* base prediction for the cost of its arithmetic.
    ``forwards`` counts the network forwards made while recording."""

    def __init__(self) -> None:
        self.mode = "off"
        self.forwards = 0
        self._outputs: deque[tuple[float, torch.Tensor]] = deque()

    def record(self) -> None:
        self.mode = "record"
        self._outputs.clear()

    def replay(self) -> None:
        self.mode = "replay"

    def push(self, sigma: float, output: torch.Tensor) -> None:
        self._outputs.append((sigma, output))

    def pop(self, sigma: float, shape) -> torch.Tensor:
        if not self._outputs:
            raise RuntimeError("Diffusion Blend SMC: the guider asked for more base predictions than the blend "
                               "recorded; another node changes the model calls between two identical passes")
        recorded_sigma, output = self._outputs.popleft()
        if recorded_sigma != sigma or tuple(output.shape) != tuple(shape):
            raise RuntimeError(f"Diffusion Blend SMC: replayed call (sigma {sigma}, shape {tuple(shape)}) differs from "
                               f"the recorded one (sigma {recorded_sigma}, shape {tuple(output.shape)})")
        return output

    def finish(self) -> None:
        left = len(self._outputs)
        self._outputs.clear()
        self.mode = "off"
        if left:
            raise RuntimeError(f"Diffusion Blend SMC: {left} recorded base predictions were not replayed")


def _records_attention_for_sag(transformer_options: dict) -> bool:
    """Whether Self-Attention Guidance (``comfy_extras.nodes_sag``) records attention in this call: its
    map comes from one model call and is used in a later one, which a blend of models cannot match."""
    replaced = transformer_options.get("patches_replace", {}).get("attn1", {})
    return any(getattr(f, "__module__", "").endswith("nodes_sag") for f in replaced.values())


@dataclass
class BlendWrapper:
    """``WrappersMP.APPLY_MODEL`` wrapper evaluating the blend with coefficients ``coefficients``."""

    bank: LowRankBank
    coefficients: tuple[float, ...]
    mode: Mode
    #: the blend acts from ``start_percent`` to ``end_percent`` of the schedule, read as sigmas by the
    #: model sampling of the model being called (a ModelSampling node after the blend changes them)
    start_percent: float
    end_percent: float
    seed: int = 0
    #: Stack several models in one forward?  ``None`` (auto): on accelerators yes, as many as fit
    #: ComfyUI's memory estimate; on the CPU no -- there a batch of k*B costs more than k forwards of
    #: B in time and memory (bench/blend_speed.py), and the result is the same.
    batch_segments: bool | None = None
    #: what the blend stands for, read by the SMC sampler: each basis' alpha_ref and reward name
    alpha_refs: tuple[float, ...] = field(default=())
    rewards: tuple[str | None, ...] = field(default=())
    #: the segment merged into the model's weights at load (:func:`merge_resident`); every plan is
    #: evaluated relative to it (``blend.runtime.relative_plan``)
    resident: Segment = ()
    #: set when a stacked forward ran out of memory: later calls stack at most this many models
    segments_cap: int | None = field(default=None, repr=False)
    _window: tuple | None = field(default=None, repr=False)
    _warned_sag: bool = field(default=False, repr=False)

    def segments_per_call(self, base_model, x: torch.Tensor, wanted: int) -> int:
        if self.mode == "sequential":
            return 1
        batch = self.batch_segments if self.batch_segments is not None else x.device.type != "cpu"
        per_call = _segments_that_fit(base_model, x, wanted) if batch else 1
        return per_call if self.segments_cap is None else min(per_call, self.segments_cap)

    def window(self, model_sampling) -> tuple[float, float]:
        """``(sigma_end, sigma_start)``: the blend's part of the schedule under ``model_sampling``."""
        cached = self._window
        if cached is None or cached[0] is not model_sampling:
            cached = self._window = (model_sampling, float(model_sampling.percent_to_sigma(self.end_percent)),
                                     float(model_sampling.percent_to_sigma(self.start_percent)))
        return cached[1], cached[2]

    def out_of_memory(self, per_call: int) -> None:
        """A stacked forward ran out of memory (ComfyUI's estimate was too generous): free the
        allocator's cache and stack at most ``per_call`` models from now on."""
        logging.warning("[Diffusion Blend] a forward of several stacked models ran out of memory; "
                        "retrying with %d per forward (same result, more forwards)", per_call)
        self.segments_cap = per_call
        comfy.model_management.soft_empty_cache()

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = float(t.reshape(-1)[0])
        tap: BaseTap | None = transformer_options.get(TAP_KEY)
        if tap is not None and tap.mode == "replay":
            return tap.pop(sigma, x.shape)
        recording = tap is not None and tap.mode == "record"
        batch = x.shape[0]

        def run(k: int) -> torch.Tensor:
            if recording:
                tap.forwards += 1
            if k == 1:  # the UNet pops control residuals off their lists: give every forward its own
                return executor(x, t, c_concat, c_crossattn, _fresh_lists(control), transformer_options, **kwargs)
            options = dict(transformer_options)
            # Keep ComfyUI's batch contract: one 0/1 entry per chunk of the batch.
            for key in ("cond_or_uncond", "uuids"):
                if key in options:
                    options[key] = list(options[key]) * k
            rep = lambda v: repeat_batch(v, k, batch)  # noqa: E731
            return executor(rep(x), rep(t), rep(c_concat), rep(c_crossattn), rep(control), options,
                            **{name: rep(v) for name, v in kwargs.items()})

        plan = _BASE
        sigma_end, sigma_start = self.window(executor.class_obj.model_sampling)
        if sigma_end <= sigma <= sigma_start:
            plan = make_plan(self.mode, self.coefficients, seed=self.seed, sigma=sigma)
        if len(plan.segments) > 1 and not self._warned_sag and _records_attention_for_sag(transformer_options):
            self._warned_sag = True
            logging.warning("[Diffusion Blend] Self-Attention Guidance on a blend of several models: SAG blurs by "
                            "the attention map of the last model evaluated, not a blend of their maps, so the "
                            "result is an approximation (exact at kl_scale 0 and for one basis at kl_scale 1; "
                            "docs/composition.md)")
        if plan.is_plain and not self.resident:  # the base alone, on unpatched weights
            out = run(1)
            if recording:  # the same tensor goes up to the guider: keep a copy nobody else holds
                tap.push(sigma, out.clone())
            return out
        root = executor.class_obj.diffusion_model
        # ComfyUI's token for the patches in the weights now: merged copies made under another go
        self.bank.weights_changed(getattr(executor.class_obj, "current_weight_patches_uuid", None))
        if not recording:
            relative = relative_plan(plan, self.resident)
            per_call = self.segments_per_call(executor.class_obj, x, len(relative.segments))
            return evaluate_plan(relative, self.bank, root, run, batch, per_call, self.out_of_memory)
        full, base_index = with_base(plan)
        per_call = self.segments_per_call(executor.class_obj, x, len(full.segments))
        outputs = evaluate_segments(relative_plan(full, self.resident), self.bank, root, run, batch, per_call,
                                     self.out_of_memory)
        out = combine(outputs[: len(plan.segments)], plan.weights)
        base = outputs[base_index]
        tap.push(sigma, base.clone() if base is out else base)  # never the tensor that goes up to the guider
        return out


_BASE = BlendPlan(((),), (1.0,))
