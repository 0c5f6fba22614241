"""Stable Diffusion 1.x/2.x (a diffusers folder or a single file + its configs): the UNet with a
peft LoRA, classifier-free guidance, the DDIM chain read from the model's scheduler config."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ...blend.fingerprint import weights_fingerprint
from ...blend.lora_file import LoraModule
from ..export import lora_modules_from_unet
from ..pipeline import (DTYPES, DiffusionModel, add_lora, decode_latents, encode_prompts, guidance_cond, guided_eps,
                        load_base, lora_parameters)
from ..sampler import DDIMSchedule
from . import peft_adapters_off, peft_lora_layers

__all__ = ["SDPolicy"]


def _expand(cond: Any, n: int) -> Any:
    """A batch-1 conditioning (nested dicts of tensors) repeated to batch ``n``."""
    if torch.is_tensor(cond):
        return cond.expand(n, *cond.shape[1:])
    if isinstance(cond, dict):
        return {k: _expand(v, n) for k, v in cond.items()}
    return cond


def _cat(conds: list[dict]) -> dict:
    """Batch-1 conditionings (nested dicts of tensors) concatenated along the batch."""
    first = conds[0]
    if torch.is_tensor(first):
        return torch.cat(conds)
    return {k: _cat([c[k] for c in conds]) for k in first}


class SDPolicy:
    family = "sd"

    def __init__(self, model: DiffusionModel, schedule: DDIMSchedule, guidance: float, resolution: int,
                 fingerprint: str):
        self.model = model
        self.network = model.unet
        self.schedule = schedule
        self.guidance = guidance
        self.resolution = resolution
        self.fingerprint = fingerprint
        self._prompt_cache: dict[str, dict] = {}  # prompt -> its batch-1 conditioning, on the UNet's device
        self._uncond_one = self._encode_one("")
        self._lora_layers = peft_lora_layers(model.unet)

    @classmethod
    def from_config(cls, cfg, device: torch.device | str = "cpu") -> "SDPolicy":
        model = load_base(cfg.base.path, cfg.base.single_file_config, DTYPES[cfg.base.dtype])
        fingerprint = weights_fingerprint(model.unet.state_dict().values())
        torch.manual_seed(cfg.seed)  # LoRA A initialisation
        add_lora(model.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.rslora)
        for p in lora_parameters(model.unet):
            p.data = p.data.float()
        for m in [model.unet, model.vae, *model.text_encoders]:
            m.to(device)
        if cfg.gradient_checkpointing:  # recompute activations in the backward pass: memory for time
            model.unet.enable_gradient_checkpointing()
        schedule = DDIMSchedule.from_scheduler_config(model.scheduler_config, cfg.sampling.steps, cfg.sampling.eta)
        return cls(model, schedule, cfg.sampling.guidance, cfg.sampling.resolution, fingerprint)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.network.named_parameters() if "lora_" in n}

    def _encode_one(self, prompt: str) -> dict:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = encode_prompts(self.model, [prompt], self.resolution, self.resolution)
        return self._prompt_cache[prompt]

    def encode(self, prompts: Sequence[str]) -> dict:
        """The conditioning of ``prompts``; each distinct prompt goes through the text encoders once."""
        cond = _cat([self._encode_one(p) for p in prompts])
        return {"cond": cond, "unet": guidance_cond(cond, _expand(self._uncond_one, len(prompts)), self.guidance)}

    def offload_text_encoders(self, prompts: Sequence[str], device: torch.device | str = "cpu") -> None:
        """Encode ``prompts`` now and move the text encoders to ``device`` (the CPU): a run with a fixed
        prompt list never needs them on the accelerator again (new prompts are encoded there, slowly)."""
        for p in prompts:
            self._encode_one(p)
        for encoder in self.model.text_encoders:
            encoder.to(device)

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        size = self.resolution // self.model.vae_scale
        device = next(self.network.parameters()).device
        return torch.randn(n, self.model.latent_channels, size, size, generator=generator).to(device)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: dict, network: torch.nn.Module | None = None) -> torch.Tensor:
        out = guided_eps(network or self.network, x, t, cond["unet"], self.guidance)
        return self.schedule.eps_from_output(t, x, out)

    def reference(self):
        return peft_adapters_off(self._lora_layers)

    def decode(self, x_0: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.model, x_0)

    def text_features(self, cond: dict) -> torch.Tensor:
        return cond["cond"]["encoder_hidden_states"]

    def export_modules(self) -> dict[str, LoraModule]:
        return lora_modules_from_unet(self.network)

    def chain(self) -> dict[str, Any]:
        s = self.schedule
        return {"sampler": "ddim", "eta": s.eta, "steps": s.num_steps, "spacing": s.spacing,
                "prediction": s.prediction_type, "cfg": self.guidance, "resolution": self.resolution}
