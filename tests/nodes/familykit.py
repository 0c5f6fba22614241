"""Shared pieces of the training-to-ComfyUI parity tests (SDXL, SD3, Flux)."""

from __future__ import annotations

from pathlib import Path

import torch

from test_blend_inprocess import blended


def apply_cond(patcher, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
    """One ``apply_model`` call as ComfyUI's sampler makes it (patches and wrappers applied), with the
    family's conditioning keywords (``c_crossattn``, ``y``, ``guidance``)."""
    import comfy.model_management
    import comfy.patcher_extension

    comfy.model_management.load_models_gpu([patcher])
    options = comfy.patcher_extension.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
    options.update({"wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers),
                    "cond_or_uncond": [0] * x.shape[0], "uuids": [object() for _ in range(x.shape[0])],
                    "sigmas": sigma[:1]})
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, transformer_options=options, **cond).float()


def stock_and_blend(base, lora_path: Path, name: str):
    """``(stock, blend, patches)``: ``base`` with the LoRA through ComfyUI's stock loader at strength 1,
    and through the blend node at w = e_1, lambda = 1; ``patches`` the layers ComfyUI mapped."""
    import comfy.lora
    import comfy.utils
    import folder_paths

    sd = comfy.utils.load_torch_file(str(lora_path))
    patches = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(base.model, {}), log_missing=False)
    stock = base.clone()
    stock.add_patches(patches, 1.0)
    folder = lora_path.parent / "loras"
    folder.mkdir(exist_ok=True)
    # ComfyUI resolves a LoRA name through every registered folder in turn: unique per run
    linked = folder / f"{Path(name).stem}_{lora_path.parent.parent.name}_{lora_path.parent.name}.safetensors"
    linked.write_bytes(lora_path.read_bytes())
    folder_paths.add_model_folder_path("loras", str(folder))
    return stock, blended(base, [linked], [1.0], 1.0), patches
