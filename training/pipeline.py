"""The base model for training: diffusers components, a peft LoRA on the UNet, and the pieces the
sampler needs (prompt encoding, a guided ``eps_fn``, VAE decoding).

One UNet is held in memory: the frozen base with a LoRA adapter.  The KL reference is the same
UNet with the adapter switched off (``families.peft_adapters_off``), never a second copy.

SD1.x is tested; SDXL's second text encoder and added conditions go through the same functions
(:func:`encode_prompts` returns the UNet's extra keyword arguments), not through special cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["BaseModelError", "DiffusionModel", "DTYPES", "load_base", "add_lora", "encode_prompts", "guided_eps_fn",
           "guided_eps", "guidance_cond", "base_dtype",
           "decode_latents", "lora_parameters", "read_scheduler_config"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BaseModelError(ValueError):
    """The base model cannot be loaded from local files; the message names what is missing."""


@dataclass
class DiffusionModel:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    is_sdxl: bool = False
    source: str = ""
    #: the model's own ``scheduler/scheduler_config.json`` (betas, prediction type, spacing)
    scheduler_config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def check_base(path: str | Path, single_file_config: str | Path | None = None) -> None:
    """Fail fast (before any compute) when the base model's files are not all there."""
    p = Path(path)
    if not p.exists():
        raise BaseModelError(f"base.path: {p} does not exist")
    if p.is_dir():
        flow = _check_pipeline_class(p) in FLOW_PIPELINES
        needed = ["model_index.json", "transformer/config.json" if flow else "unet/config.json", "vae/config.json",
                  "text_encoder/config.json", "tokenizer", "scheduler/scheduler_config.json"]
        if (p / "model_index.json").is_file():  # every component the pipeline names (SDXL: the second encoder)
            index = json.loads((p / "model_index.json").read_text())
            needed += [name for name, spec in index.items() if not name.startswith("_") and isinstance(spec, list)
                       and spec and spec[0] is not None and name not in needed and f"{name}/config.json" not in needed
                       and name != "scheduler"]
        missing = [n for n in needed if not (p / n).exists()]
        if missing:
            raise BaseModelError(f"base.path: {p} is not a diffusers folder; missing {', '.join(missing)}")
        from .sampler import DDIMSchedule, FlowSchedule, ScheduleError

        try:  # the chain this model was trained for must be one the sampler can run
            if flow:
                FlowSchedule.from_scheduler_config(read_scheduler_config(p), 1, image_seq_len=256)
            else:
                DDIMSchedule.from_scheduler_config(read_scheduler_config(p), 1)
        except ScheduleError as exc:
            raise BaseModelError(f"base.path: {p / 'scheduler/scheduler_config.json'}: {exc}") from None
        return
    if p.suffix not in (".safetensors",):
        raise BaseModelError(f"base.path: {p.name}: expected a diffusers folder or a .safetensors checkpoint")
    if single_file_config is None:
        raise BaseModelError(
            f"base.single_file_config: {p.name} is a single-file checkpoint; give a local diffusers folder with "
            "its configs (model_index.json, */config.json, tokenizer/) -- nothing is downloaded")
    check_base(single_file_config)


#: the diffusers pipelines the trainer reads (the family comes from the base, not from the config)
TRAINABLE_PIPELINES = {"StableDiffusionPipeline": "SD1.x/2.x", "StableDiffusionXLPipeline": "SDXL",
                       "StableDiffusion3Pipeline": "SD3/SD3.5", "FluxPipeline": "Flux"}
#: those that are flow-matching models (a transformer, the flow chain)
FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


def pipeline_class(folder: str | Path) -> str:
    """``_class_name`` of a diffusers folder's ``model_index.json`` ("" when there is none)."""
    index = Path(folder) / "model_index.json"
    return json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""


def _check_pipeline_class(folder: Path) -> str:
    """The pipeline class; a diffusers folder of a family the trainer does not drive (Flux, ...) is
    refused by name."""
    index = folder / "model_index.json"
    if not index.is_file():
        return ""  # reported with the other missing files
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except ValueError as exc:
        raise BaseModelError(f"base.path: {index} is not valid JSON ({exc})") from None
    if name and name not in TRAINABLE_PIPELINES:
        supported = ", ".join(f"{k} ({v})" for k, v in TRAINABLE_PIPELINES.items())
        raise BaseModelError(f"base.path: {folder} is a {name}; the trainer drives {supported} -- other "
                             "families (Qwen-Image, ...) are blended at inference but not trained yet")
    return name


def read_scheduler_config(folder: str | Path) -> dict:
    """``<folder>/scheduler/scheduler_config.json`` as a dict."""
    return json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())


def load_base(path: str | Path, single_file_config: str | Path | None = None,
              dtype: torch.dtype = torch.float32) -> DiffusionModel:
    """Load a base from a local diffusers folder, or a single-file checkpoint plus a local config folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    check_base(path, single_file_config)
    p = Path(path)
    index = (p if p.is_dir() else Path(single_file_config)) / "model_index.json"
    is_sdxl = TRAINABLE_PIPELINES.get(json.loads(index.read_text()).get("_class_name", "")) == "SDXL"
    cls = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    try:
        if p.is_dir():
            pipe = cls.from_pretrained(p, torch_dtype=dtype, local_files_only=True, safety_checker=None)
        else:
            pipe = cls.from_single_file(str(p), config=str(single_file_config), torch_dtype=dtype,
                                        local_files_only=True, safety_checker=None)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"base.path: cannot load {p} from local files: {exc}") from None
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_sdxl else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if is_sdxl else [])
    for m in [pipe.unet, pipe.vae, *text_encoders]:
        m.requires_grad_(False).eval()
    config_folder = p if p.is_dir() else Path(single_file_config)
    return DiffusionModel(pipe.unet, pipe.vae, text_encoders, tokenizers, is_sdxl, str(p),
                          read_scheduler_config(config_folder))


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, targets: Sequence[str], rslora: bool = False,
             adapter_name: str = "default") -> None:
    """Attach a trainable peft LoRA to ``unet`` (B initialised to zero: the policy starts at the base)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian",
                        use_rslora=rslora)
    unet.add_adapter(config, adapter_name=adapter_name)


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n]


@torch.no_grad()
def encode_prompts(model: DiffusionModel, prompts: Sequence[str], height: int, width: int) -> dict:
    """UNet conditioning for ``prompts``: ``encoder_hidden_states`` (+ SDXL's ``added_cond_kwargs``)."""
    device = next(model.unet.parameters()).device  # the encoders may be offloaded elsewhere
    hidden, pooled = [], None
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        max_length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
        ids = tokenizer(list(prompts), padding="max_length", max_length=max_length,
                        truncation=True, return_tensors="pt").input_ids.to(next(encoder.parameters()).device)
        out = encoder(ids, output_hidden_states=model.is_sdxl)
        if model.is_sdxl:
            hidden.append(out.hidden_states[-2].to(device))
            pooled = out[0].to(device)  # the projection of the last encoder (CLIPTextModelWithProjection)
        else:
            hidden.append(out[0].to(device))
    cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1)}
    if model.is_sdxl:
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=pooled.dtype)
        cond["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}
    return cond


def _cat_cond(uncond: dict, cond: dict) -> dict:
    out = {"encoder_hidden_states": torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]])}
    if "added_cond_kwargs" in cond:
        out["added_cond_kwargs"] = {k: torch.cat([uncond["added_cond_kwargs"][k], v])
                                    for k, v in cond["added_cond_kwargs"].items()}
    return out


def guidance_cond(cond: dict, uncond: dict, guidance: float) -> dict:
    """The UNet conditioning :func:`guided_eps` takes: ``[uncond; cond]`` stacked along the batch
    (computed once per batch, not per step), or ``cond`` alone without guidance."""
    return _cat_cond(uncond, cond) if guidance != 1.0 else cond


def base_dtype(unet: torch.nn.Module) -> torch.dtype:
    """The dtype of the frozen UNet weights (the LoRA may be float32 on a float16/bfloat16 base)."""
    return getattr(unet, "module", unet).conv_in.weight.dtype


def guided_eps(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, both: dict, guidance: float) -> torch.Tensor:
    """Classifier-free guidance with one UNet call on the doubled batch (``both``: :func:`guidance_cond`).

    The input is cast to the base's dtype (a bfloat16/float16 base runs without autocast too); the
    prediction comes back in float32, so the chain's means and log-probabilities are float32."""
    x = x.to(base_dtype(unet))
    if guidance == 1.0:
        return unet(x, t, **both).sample.float()
    eps_uncond, eps_cond = unet(torch.cat([x, x]), torch.cat([t, t]), **both).sample.float().chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def guided_eps_fn(unet: torch.nn.Module, cond: dict, uncond: dict, guidance: float):
    """``eps_fn(x, t)`` with classifier-free guidance."""
    both = guidance_cond(cond, uncond, guidance)
    return lambda x, t: guided_eps(unet, x, t, both, guidance)


def decode_latents(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images ``(B, 3, H, W)`` in [0, 1] (differentiable where gradients are enabled:
    Adjoint Matching's reward gradient flows back through the VAE decoder)."""
    vae = model.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return ((images.float() + 1) / 2).clamp(0, 1)
