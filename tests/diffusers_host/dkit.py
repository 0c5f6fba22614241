"""The four pipeline families of the diffusers host, each with one denoiser call in ComfyUI's terms.

For every family: the tiny diffusers pipeline (``scripts/tiny_fixtures.py``), two seeded basis LoRAs in
a format diffusers' own ``load_lora_weights`` reads (kohya for the UNets; diffusers' ``transformer.*``
keys for SD3, without ``.alpha`` since diffusers' SD3 loader refuses those, and with it for Flux),
ComfyUI's model of the same weights (``scripts/tiny_families.py``), and one set of inputs given to both
hosts: the diffusers network's prediction (eps for the UNets, the velocity for the flow models) and
ComfyUI's ``(x - denoised) / sigma`` are the same quantity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

import tiny_fixtures

FAMILIES = ("SD1.5", "SDXL", "SD3", "SD3.5", "Flux")
#: layers the test LoRAs adapt: attention projections (fused slices in ComfyUI's SD3/Flux), and for the
#: UNets the 1x1 convolutions and a 3x3 resnet convolution
UNET_TARGETS = tiny_fixtures.DEFAULT_LORA_TARGETS
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj")


@dataclass
class Case:
    family: str
    pipe: object
    loras: list[Path]
    #: ``predict(network, x, sigma)``: the network's prediction at ComfyUI's ``x`` and ``sigma``
    predict: Callable[[torch.nn.Module, torch.Tensor, float], torch.Tensor]
    #: ``comfy_cond``: ComfyUI's conditioning keywords for ``apply_model`` of the same inputs
    comfy_cond: dict
    x: torch.Tensor
    sigma: float
    folder: Path  # the LoRAs'
    folder_path: Path  # the pipeline's

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, "unet", None) or self.pipe.transformer


def load_pipe(family: str, folder: Path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = {"SD1.5": StableDiffusionPipeline, "SDXL": StableDiffusionXLPipeline, "SD3": StableDiffusion3Pipeline,
           "SD3.5": StableDiffusion3Pipeline, "Flux": FluxPipeline}[family]
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family == "SD1.5" else {}
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def without_alpha(path: Path) -> Path:
    """The file as diffusers' ``save_lora_weights`` writes it: the scale folded into ``lora_B``, no ``.alpha``."""
    tensors = load_file(str(path))
    with __import__("safetensors").safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    out = {}
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            continue
        if key.endswith(".lora_B.weight"):
            module = key[: -len(".lora_B.weight")]
            rank = tensors[f"{module}.lora_A.weight"].shape[0]
            value = (value.float() * (float(tensors[f"{module}.alpha"]) / rank)).to(value.dtype)
        out[key] = value
    save_file(out, str(path), metadata=metadata)
    return path


def make_loras(family: str, denoiser: torch.nn.Module, folder: Path, alpha_refs=(1e-4, 3e-4)) -> list[Path]:
    paths = []
    for i, alpha_ref in enumerate(alpha_refs):
        path = folder / f"db_{family.replace('.', '')}_{i + 1}.safetensors"
        unet = family in ("SD1.5", "SDXL")
        tiny_fixtures.make_basis_lora(denoiser, path, seed=10 + i, alpha_ref=alpha_ref, reward=f"reward{i + 1}",
                                      key_format="kohya" if unet else "transformer",
                                      targets=UNET_TARGETS if unet else TRANSFORMER_TARGETS)
        paths.append(without_alpha(path) if family.startswith("SD3") else path)
    return paths


def export_like_trainer(family: str, denoiser: torch.nn.Module, path: Path, seed: int = 30) -> Path:
    """A LoRA written by the training package's own export (``training.export.export_lora``: kohya keys for
    UNets, ``transformer.*`` keys with ``.alpha`` for SD3/Flux -- a file diffusers' own SD3 loader refuses),
    rank 4 at alpha 2 (scale 0.5), on the test targets."""
    import json

    from diffusion_blend.blend.lora_file import LoraModule
    from diffusion_blend.training.export import export_lora

    unet = family in ("SD1.5", "SDXL")
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for p in tiny_fixtures.lora_target_paths(denoiser, UNET_TARGETS if unet else TRANSFORMER_TARGETS):
        w = denoiser.get_submodule(p).weight
        down = torch.randn(4, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], 4, *((1, 1) if w.ndim == 4 else ()), generator=g) * float(w.std()) * w[0].numel() ** 0.5
        modules[p] = LoraModule(down=down.half().float(), up=up.half().float(), alpha=2.0)
    chain = {"family": "sd" if unet else ("flux" if family == "Flux" else "sd3")}
    return export_lora(modules, path, {"db.chain": json.dumps(chain), "db.alpha_ref": "0.0001",
                                       "db.reward": "brightness"})


def build_case(family: str, folder: Path, lora_dir: Path, comfy_base=None) -> Case:
    """The case on a fresh pipeline; ``comfy_base`` (SD1.5 only: the checkpoint ComfyUI loaded) or
    ComfyUI's model built from the pipeline's own weights for the others (``comfy_model``)."""
    pipe = load_pipe(family, folder)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    lora_dir.mkdir(parents=True, exist_ok=True)
    loras = make_loras(family, denoiser, lora_dir)
    g = torch.Generator().manual_seed(11)
    if family in ("SD1.5", "SDXL"):
        t = 500  # a step of the discrete schedule: ComfyUI's timestep(sigma) is the nearest one
        abar = float(pipe.scheduler.alphas_cumprod[t])
        sigma = math.sqrt((1 - abar) / abar)
        x = torch.randn(2, 4, 8, 8, generator=g) * sigma
        width = 768 if family == "SD1.5" else 64
        context = torch.randn(2, 77, width, generator=g)
        pooled = torch.randn(2, 32, generator=g)

        def predict(network, x, sigma):
            added = None
            if family == "SDXL":
                added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * x.shape[0])}
            return network(x / math.sqrt(sigma**2 + 1), torch.tensor(t), encoder_hidden_states=context,
                           added_cond_kwargs=added).sample

        cond = {"c_crossattn": context}
        if family == "SDXL":
            cond["y"] = ("sdxl_adm", pooled)  # filled by comfy_cond() on ComfyUI's model
    elif family.startswith("SD3"):
        sigma = 0.6
        x = torch.randn(2, 16, 8, 8, generator=g)
        context, pooled = torch.randn(2, 20, 64, generator=g), torch.randn(2, 64, generator=g)

        def predict(network, x, sigma):
            return network(hidden_states=x, timestep=torch.full((x.shape[0],), sigma * 1000),
                           encoder_hidden_states=context, pooled_projections=pooled).sample

        cond = {"c_crossattn": context, "y": pooled}
    else:  # Flux
        from diffusers import FluxPipeline

        sigma = 0.55
        x = torch.randn(2, 16, 8, 8, generator=g)
        context, pooled = torch.randn(2, 12, 32, generator=g), torch.randn(2, 32, generator=g)
        guidance = torch.full((2,), 3.5)

        def predict(network, x, sigma):
            b, c, h, w = x.shape
            packed = FluxPipeline._pack_latents(x, b, c, h, w)
            ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
            out = network(hidden_states=packed, timestep=torch.full((b,), sigma), guidance=guidance,
                          pooled_projections=pooled, encoder_hidden_states=context,
                          txt_ids=torch.zeros(context.shape[1], 3), img_ids=ids).sample
            return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)

        cond = {"c_crossattn": context, "y": pooled, "guidance": guidance}
    return Case(family, pipe, loras, predict, cond, x, sigma, lora_dir, Path(folder))


def comfy_model(case: Case, comfy_base=None):
    """ComfyUI's ``ModelPatcher`` of the case's weights (``comfy_base`` given for SD1.5)."""
    import tiny_families

    if case.family == "SD1.5":
        return comfy_base
    builder = {"SDXL": tiny_families.sdxl_from_diffusers, "SD3": tiny_families.sd3_from_diffusers,
               "SD3.5": tiny_families.sd3_from_diffusers, "Flux": tiny_families.flux_from_diffusers}[case.family]
    return builder(case.denoiser)


def comfy_cond(case: Case, patcher) -> dict:
    cond = dict(case.comfy_cond)
    if isinstance(cond.get("y"), tuple):  # SDXL: ComfyUI's own adm of the pooled output at 64 x 64
        cond["y"] = patcher.model.encode_adm(pooled_output=cond["y"][1], width=64, height=64, target_width=64,
                                             target_height=64, crop_w=0, crop_h=0)
    return cond
