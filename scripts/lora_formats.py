"""LoRA files in every key format and adapter kind ComfyUI's stock loader accepts, generated from
ComfyUI's own key map (``comfy.lora.model_lora_keys_unet``) of a model, with random weights.

A *key format* is a family of module names in that map (kohya ``lora_unet_*``, ComfyUI
``diffusion_model.*``, diffusers ``transformer.*``, OneTrainer ``lora_transformer_*``, LyCORIS
``lycoris_*``, Flux's ``linear1_qkv`` slices, diffusers' old ``.processor.to_q`` UNet names, the
project's own peft ``unet.*``); an *adapter kind* is what the file stores per module (LoRA,
LoCon with a kernel, LoHa, LoKr, DoRA, full ``diff`` + ``diff_b``).  Names whose target is a slice
of a fused weight (``(key, (dim, offset, size))``) or carries a key transform (SD3's
``swap_scale_shift``) are kept: they are what the parity tests are for.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

#: key format -> (regex on the module name, families it exists for)
FORMATS = {
    "comfyui": (r"^diffusion_model\.", ("SDXL", "SD3", "SD3.5", "Flux", "QwenImage")),
    "kohya": (r"^lora_unet_", ("SDXL", "SD3", "SD3.5", "Flux", "QwenImage")),
    "diffusers transformer.*": (r"^transformer\.", ("SD3", "SD3.5", "Flux", "QwenImage")),
    "OneTrainer lora_transformer_*": (r"^lora_transformer_", ("SD3", "SD3.5", "Flux")),
    "LyCORIS lycoris_*": (r"^lycoris_", ("SDXL", "SD3", "SD3.5", "Flux", "QwenImage")),
    "Flux linear1_qkv": (r"\.linear1_qkv$", ("Flux",)),
    "diffusers .processor.to_q": (r"^unet\..*\.processor\.", ("SDXL",)),
    "project peft unet.*": (None, ("SDXL",)),  # the project's own names (not in ComfyUI's map for attention)
}
ADAPTERS = ("lora", "locon", "loha", "lokr", "dora", "diff")


def _module_key(target) -> tuple[str, tuple | None, object]:
    if isinstance(target, str):
        return target, None, None
    return target[0], target[1], (target[2] if len(target) > 2 else None)


def _layer(model, key: str):
    path = key[len("diffusion_model."):].rsplit(".", 1)[0]
    try:
        return path, model.diffusion_model.get_submodule(path)
    except AttributeError:
        return path, None


def names_for(model, fmt: str) -> dict[str, object]:
    """``{module name: target}`` of one key format on ``model`` (Linear/Conv2d weights only)."""
    import comfy.lora
    import comfy.utils

    if fmt == "project peft unet.*":
        out = {}
        for diffusers_key, comfy_key in comfy.utils.unet_to_diffusers(model.model_config.unet_config).items():
            if diffusers_key.endswith(".weight") and comfy_key.endswith(".weight"):
                out["unet." + diffusers_key[: -len(".weight")]] = "diffusion_model." + comfy_key
    else:
        pattern = re.compile(FORMATS[fmt][0])
        out = {k: v for k, v in comfy.lora.model_lora_keys_unet(model, {}).items() if pattern.search(k)}
    kept = {}
    for name, target in out.items():
        key, offset, function = _module_key(target)
        if not key.endswith(".weight"):
            continue
        _, layer = _layer(model, key)
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            kept[name] = target
    return kept


def _slice_shape(layer, offset) -> tuple[int, ...]:
    shape = list(layer.weight.shape)
    if offset is not None:
        shape[offset[0]] = offset[2]
    return tuple(shape)


def _factors(g, out_f: int, in_f: int, rank: int, std: float):
    return torch.randn(out_f, rank, generator=g) * std, torch.randn(rank, in_f, generator=g) * std


def adapter_tensors(name: str, layer, offset, kind: str, g: torch.Generator, rank: int = 2, std: float = 0.15) -> dict:
    """The tensors of one module of adapter ``kind`` for ``layer`` (a slice of it when ``offset``)."""
    shape = _slice_shape(layer, offset)
    out_f, in_f = shape[0], shape[1]
    kernel = tuple(shape[2:])
    conv = len(shape) == 4
    flat_in = in_f * (kernel[0] * kernel[1] if conv else 1)
    t: dict[str, torch.Tensor] = {}
    alpha = torch.tensor(float(rank) * 0.5)
    if kind in ("lora", "dora", "locon"):
        up, down = _factors(g, out_f, flat_in, rank, std)
        if conv:  # the down factor carries the layer's kernel (LoCon; a plain LoRA only fits 1x1 convolutions)
            down = down.reshape(rank, in_f, *kernel)
            up = up[:, :, None, None]
        t[f"{name}.lora_up.weight"], t[f"{name}.lora_down.weight"], t[f"{name}.alpha"] = up, down, alpha
        if kind == "dora":
            t[f"{name}.dora_scale"] = (layer.weight.detach().float().reshape(layer.weight.shape[0], -1).norm(dim=1)
                                       [: out_f, None] * (1 + 0.2 * torch.rand(out_f, 1, generator=g)))
            if conv:
                t[f"{name}.dora_scale"] = t[f"{name}.dora_scale"][:, :, None, None]
    elif kind == "loha":
        t[f"{name}.hada_w1_a"], t[f"{name}.hada_w1_b"] = _factors(g, out_f, flat_in, rank, 0.5)
        t[f"{name}.hada_w2_a"], t[f"{name}.hada_w2_b"] = _factors(g, out_f, flat_in, rank, 0.5)
        t[f"{name}.alpha"] = alpha
    elif kind == "lokr":
        a = 2 if out_f % 2 == 0 else 1
        b = 2 if flat_in % 2 == 0 else 1
        t[f"{name}.lokr_w1"] = torch.randn(a, b, generator=g)
        t[f"{name}.lokr_w2"] = torch.randn(out_f // a, flat_in // b, generator=g) * std * 0.2
    elif kind == "diff":
        t[f"{name}.diff"] = torch.randn(*shape, generator=g) * std * 0.1
        if getattr(layer, "bias", None) is not None and offset is None:
            t[f"{name}.diff_b"] = torch.randn(out_f, generator=g) * std
    else:
        raise ValueError(kind)
    return t


def write_file(path: Path, model, fmt: str, kind: str = "lora", seed: int = 0, every: int = 1,
               metadata: dict | None = None, only: set[str] | None = None, rank: int = 2) -> Path:
    """A file of adapter ``kind`` of ``rank`` on every ``every``-th module of format ``fmt`` of
    ``model`` (those named in ``only``, if given).

    Plain LoRA files target every name, slices and key transforms included; DoRA is written on
    whole (unsliced, untransformed) layers only, LoCon on layers with a kernel."""
    g = torch.Generator().manual_seed(seed)
    names = names_for(model, fmt)
    tensors: dict[str, torch.Tensor] = {}
    for j, (name, target) in enumerate(sorted(names.items())):
        if j % every or (only is not None and name not in only):
            continue
        key, offset, function = _module_key(target)
        _, layer = _layer(model, key)
        if kind in ("dora", "locon", "diff") and (offset is not None or function is not None):
            continue
        if kind == "locon" and (layer.weight.ndim != 4 or tuple(layer.weight.shape[2:]) == (1, 1)):
            continue
        if kind == "lora" and layer.weight.ndim == 4 and tuple(layer.weight.shape[2:]) != (1, 1):
            continue
        tensors.update(adapter_tensors(name, layer, offset, kind, g, rank=rank))
    assert tensors, f"no module of format {fmt!r} takes a {kind} on this model"
    meta = {"db.alpha_ref": "0.5", "db.reward": "test", **(metadata or {})}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path
