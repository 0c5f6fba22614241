"""Tiny SDXL and Flux-dev model files in the layouts ComfyUI's stock loaders read, for running the
big-family workflows end to end on the test server.

Built from the tiny diffusers pipelines the training tests use (``tiny_fixtures.build_tiny_sdxl`` /
``build_tiny_flux``), converted with ComfyUI's own key maps (``tiny_families.sdxl_from_diffusers`` /
``flux_from_diffusers``), cached under ``.cache/fixtures`` (never committed):

* SDXL: one checkpoint (``CheckpointLoaderSimple``) -- the UNet, CLIP-L and CLIP-G stand-ins
  (``tiny_fixtures.tiny_clip`` with 3 layers, transformers layout under SDXL's
  ``conditioner.embedders.{0,1}`` prefixes, which ComfyUI's SDXL config maps) and the tiny SD1.5 checkpoint's VAE (ComfyUI builds SD VAEs at
  their full size);
* Flux-dev: the diffusion model (``UNETLoader``), a CLIP-L stand-in and the pipeline's T5
  (``DualCLIPLoader``), and a full-size random 16-channel VAE (``VAELoader``; ComfyUI builds it
  from a fixed config).

ComfyUI recognises these families by full-size shapes; the test server loads
``tests/host_plugins/db_tiny_families``, which registers the shrunk shapes (see its docstring).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import tiny_families
import tiny_fixtures

VERSION = "3"
SDXL_FILES = {"checkpoint": "tiny-sdxl.safetensors"}
FLUX_FILES = {"diffusion_model": "tiny-flux-dev.safetensors", "clip_l": "tiny-flux-clip-l.safetensors",
              "t5": "tiny-flux-t5.safetensors", "vae": "tiny-flux-ae.safetensors"}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _cached(out_dir: Path, name: str, files: dict[str, str], seed: int) -> tuple[dict[str, Path], Path | None]:
    """The cached files' paths, and the stamp to touch once built (None: cached)."""
    paths = {k: out_dir / v for k, v in files.items()}
    stamp = out_dir / f".{name}-v{VERSION}-seed{seed}"
    done = stamp.exists() and all(p.exists() for p in paths.values())
    out_dir.mkdir(parents=True, exist_ok=True)
    return paths, None if done else stamp


def _clip(projection: bool, seed: int):
    """``tiny_fixtures.tiny_clip`` with 3 layers (``tests/host_plugins/db_tiny_families.TINY_CLIP``):
    ComfyUI takes SDXL's penultimate layer and requires more than two layers for it."""
    return tiny_fixtures.tiny_clip(projection, seed, layers=3)


def _clip_g_checkpoint_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModelWithProjection`` under SDXL's CLIP-G prefix: ComfyUI's SDXL
    config maps ``conditioner.embedders.1.model.`` to ``clip_g.`` and moves the projection."""
    return {f"conditioner.embedders.1.model.{'' if k.startswith('text_projection') else 'transformer.'}{k}": v
            for k, v in state.items()}


def build_sdxl_checkpoint(comfy_dir, out_dir=tiny_fixtures.DEFAULT_OUT, seed: int = 0) -> dict[str, Path]:
    """``{"checkpoint": path}``: the tiny SDXL pipeline as one ComfyUI checkpoint (cached)."""
    out_dir = Path(out_dir)
    paths, stamp = _cached(tiny_fixtures.host_dir(out_dir, comfy_dir), "tiny-comfy-sdxl", SDXL_FILES, seed)
    if stamp is None:
        return paths
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    tiny_fixtures.comfy_on_path(comfy_dir)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_fixtures.build_tiny_sdxl(comfy_dir, out_dir, seed),
                                                     torch_dtype=torch.float32)
    unet = tiny_families.sdxl_from_diffusers(pipe.unet).model.diffusion_model
    sd15 = load_file(str(tiny_fixtures.build_tiny_base(comfy_dir, out_dir, seed)["checkpoint"]))
    tensors = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in _clip(False, seed + 2).state_dict().items()})
    tensors.update(_clip_g_checkpoint_keys(_clip(True, seed + 3).state_dict()))
    tensors.update({k: v for k, v in sd15.items() if k.startswith("first_stage_model.")})
    _save(tensors, paths["checkpoint"])
    stamp.touch()
    return paths


def _flux_vae_state(seed: int) -> dict[str, torch.Tensor]:
    """A random VAE of Flux's shape (16 latent channels, 128-512 channels, 2 blocks a level), in
    ComfyUI's layout (``comfy.diffusers_convert.convert_vae_state_dict``)."""
    import comfy.diffusers_convert
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**dict(tiny_fixtures.VAE_CONFIG, latent_channels=16, use_quant_conv=False,
                               use_post_quant_conv=False))
    return comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict())


def build_flux_files(comfy_dir, out_dir=tiny_fixtures.DEFAULT_OUT, seed: int = 0) -> dict[str, Path]:
    """``{"diffusion_model", "clip_l", "t5", "vae"}`` paths: the tiny Flux-dev pipeline as ComfyUI's
    separate files (cached)."""
    out_dir = Path(out_dir)
    paths, stamp = _cached(tiny_fixtures.host_dir(out_dir, comfy_dir), "tiny-comfy-flux", FLUX_FILES, seed)
    if stamp is None:
        return paths
    from diffusers import FluxPipeline

    tiny_fixtures.comfy_on_path(comfy_dir)
    pipe = FluxPipeline.from_pretrained(tiny_fixtures.build_tiny_flux(comfy_dir, out_dir, seed), torch_dtype=torch.float32)
    transformer = tiny_families.flux_from_diffusers(pipe.transformer).model.diffusion_model
    _save(transformer.state_dict(), paths["diffusion_model"])
    _save(_clip(False, seed + 2).state_dict(), paths["clip_l"])
    _save(pipe.text_encoder_2.state_dict(), paths["t5"])
    _save(_flux_vae_state(seed + 5), paths["vae"])
    stamp.touch()
    return paths
