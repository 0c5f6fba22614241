"""A LoRA file as the blend's deltas on a diffusers pipeline's denoiser, resolved by diffusers itself.

Name resolution is the host's own, as in the ComfyUI adapter: the pipeline class's
``lora_state_dict`` converts whatever format diffusers reads (kohya, A1111/SGM block names, peft,
this project's exports, Flux's kohya/xlabs variants) into diffusers' keys
``<unet|transformer>.<module path>.lora_A/lora_B.weight`` and the network alphas; then every
module's update is ``scale * lora_B @ lora_A`` with ``scale = alpha / rank`` where diffusers found an
alpha and 1 otherwise -- what peft computes for ``pipe.load_lora_weights`` (``get_peft_kwargs``:
``lora_alpha`` defaults to the rank).  A file diffusers cannot read (LoHa, LoKr, DoRA, ...) is refused
with its name; the ComfyUI nodes take those.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..blend.lora_file import LoraFile, LoraFormatError, LoraModule
from ..blend.runtime import LayerDelta

__all__ = ["DENOISERS", "denoiser_of", "diffusers_deltas"]

#: the attribute of a pipeline that holds the network the blend wraps, in the order looked up
DENOISERS = ("unet", "transformer")

_DOWN = (".lora_A.weight",)
_UP = (".lora_B.weight",)


def denoiser_of(pipe) -> tuple[str, nn.Module]:
    """``(attribute name, module)`` of the pipeline's denoising network (``unet`` or ``transformer``)."""
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise TypeError(f"pipe: a {type(pipe).__name__} has no 'unet' or 'transformer' module; the blend wraps a "
                    "diffusers pipeline's denoiser (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux, ...)")


def _converted(pipe, lora: LoraFile) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``(state dict in diffusers' peft keys, {module key: alpha})`` of the file's non-text-encoder tensors."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    loader = getattr(type(pipe), "lora_state_dict", None)
    if loader is None:
        raise TypeError(f"pipe: {type(pipe).__name__} has no LoRA loader (lora_state_dict); the blend needs "
                        "diffusers' key conversion for its denoiser")
    tensors = {k: v for k, v in lora.tensors.items()}
    kwargs = {"return_alphas": True} if "return_alphas" in inspect.signature(loader).parameters else {}
    try:
        out = loader(tensors, **kwargs)
    except Exception as exc:  # diffusers raises ValueError/KeyError/... for keys it cannot map
        raise LoraFormatError(f"{lora.name}: diffusers cannot read this LoRA for a {type(pipe).__name__} "
                              f"({type(exc).__name__}: {exc}); LoHa/LoKr/DoRA and other non-low-rank files "
                              "work in the ComfyUI nodes") from None
    state, alphas = out if isinstance(out, tuple) else (out, None)
    alphas = dict(alphas or {})
    for key in [k for k in state if k.endswith(".alpha")]:  # diffusers leaves them in for some families
        alphas[key] = state.pop(key)
    # diffusers' own renaming of the old attention-processor keys to peft's (what load_lora_weights applies)
    state = convert_unet_state_dict_to_peft(state)
    module_alphas: dict[str, float] = {}
    for key, value in alphas.items():
        renamed = next(iter(convert_unet_state_dict_to_peft({key: value})))
        module = renamed.removesuffix(".alpha")
        for marker in (".lora_A", ".lora_B"):
            module = module.split(marker)[0]
        module_alphas[module] = float(torch.as_tensor(value).float().reshape(-1)[0])
    return state, module_alphas


def _split(key: str, suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def diffusers_deltas(pipe, lora: LoraFile) -> dict[str, LayerDelta]:
    """``{module path of the denoiser: LayerDelta}`` for one LoRA file on ``pipe``'s denoiser.

    Text-encoder modules are skipped (the blend mixes denoiser predictions).  Raises
    :class:`LoraFormatError` naming the file and the key for keys that match no Linear/Conv2d of the
    denoiser, shapes that do not fit it, and files with no denoiser module at all."""
    prefix, denoiser = denoiser_of(pipe)
    state, alphas = _converted(pipe, lora)
    alpha_of = {key.removeprefix(f"{prefix}."): value for key, value in alphas.items()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(f"{prefix}."):
            continue  # text encoders
        name = key[len(prefix) + 1:]
        down, up = _split(name, _DOWN), _split(name, _UP)
        if down is None and up is None:
            raise LoraFormatError(f"{lora.name}: key {key!r} (as diffusers converts the file) is not a low-rank "
                                  "lora_A/lora_B pair; the ComfyUI nodes read other adapters")
        parts.setdefault(down if down is not None else up, {})["down" if down is not None else "up"] = value
    if not parts:
        raise LoraFormatError(f"{lora.name}: no module of the {prefix} ({type(denoiser).__name__}) in this LoRA; "
                              f"is it for another model family?")
    deltas: dict[str, LayerDelta] = {}
    for path, pair in parts.items():
        if "down" not in pair or "up" not in pair:
            raise LoraFormatError(f"{lora.name}: module {path!r} has no {'up' if 'down' in pair else 'down'} matrix")
        try:
            module = denoiser.get_submodule(path)
        except AttributeError:
            raise LoraFormatError(f"{lora.name}: module {path!r} matches no layer of this {type(denoiser).__name__}; "
                                  "is the LoRA for another model family or size?") from None
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise LoraFormatError(f"{lora.name}: module {path!r} is a {type(module).__name__}; the blend adds "
                                  "deltas to Linear and Conv2d layers only")
        down, up = pair["down"], pair["up"]
        if isinstance(module, nn.Conv2d) and up.ndim == 2:
            up = up[:, :, None, None]
        alpha = alpha_of.get(path)
        deltas[path] = LayerDelta(low_rank=LoraModule(down=down, up=up, alpha=alpha))
    return deltas

