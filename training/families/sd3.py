"""Stable Diffusion 3 / 3.5 (a diffusers ``StableDiffusion3Pipeline`` folder): the MMDiT transformer
with a peft LoRA, classifier-free guidance, the flow-matching chain of :class:`..sampler.FlowSchedule`.

The network predicts the velocity ``v = eps - x_0`` at model time ``1000 sigma``; the chain reads
``x_0 = x - sigma v`` from it.  Prompts are encoded by the pipeline's own ``encode_prompt`` (CLIP-L and
CLIP-G penultimate states padded to T5's width and joined with T5's tokens; the pooled CLIP
projections), each distinct prompt once.  The exported LoRA uses diffusers' ``transformer.*`` keys,
which ComfyUI's loader maps onto its MMDiT.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ...blend.fingerprint import weights_fingerprint
from ...blend.lora_file import LoraModule
from ..export import lora_modules_from_unet
from ..pipeline import DTYPES, BaseModelError, add_lora, lora_parameters
from ..sampler import FlowSchedule
from . import peft_adapters_off, peft_lora_layers
from .sd import _cat, _expand

__all__ = ["SD3Policy"]

#: T5 tokens per prompt (ComfyUI's SD3 text encoder pads T5 to 77 tokens too)
MAX_SEQUENCE_LENGTH = 77


class SD3Policy:
    family = "sd3"

    def __init__(self, pipe, schedule: FlowSchedule, guidance: float, resolution: int, fingerprint: str):
        self.pipe = pipe
        self.network = pipe.transformer
        self.schedule = schedule
        self.guidance = guidance
        self.resolution = resolution
        self.fingerprint = fingerprint
        self._prompt_cache: dict[str, dict] = {}
        self._uncond_one = self._encode_one("")
        self._lora_layers = peft_lora_layers(self.network)

    @classmethod
    def from_config(cls, cfg, device: torch.device | str = "cpu") -> "SD3Policy":
        from diffusers import StableDiffusion3Pipeline

        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(cfg.base.path, torch_dtype=DTYPES[cfg.base.dtype],
                                                            local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BaseModelError(f"base.path: cannot load {cfg.base.path} from local files: {exc}") from None
        encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if e is not None]
        for m in [pipe.transformer, pipe.vae, *encoders]:
            m.requires_grad_(False).eval()
        fingerprint = weights_fingerprint(pipe.transformer.state_dict().values())
        torch.manual_seed(cfg.seed)  # LoRA A initialisation
        add_lora(pipe.transformer, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.rslora)
        for p in lora_parameters(pipe.transformer):
            p.data = p.data.float()
        pipe.to(device)
        if cfg.gradient_checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        schedule = FlowSchedule.from_scheduler_config(dict(pipe.scheduler.config), cfg.sampling.steps, cfg.sampling.eta)
        return cls(pipe, schedule, cfg.sampling.guidance, cfg.sampling.resolution, fingerprint)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3) if e is not None]

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.network.named_parameters() if "lora_" in n}

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> dict:
        if prompt not in self._prompt_cache:
            device = next(self.network.parameters()).device
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt, prompt, prompt, device=next(self.pipe.text_encoder.parameters()).device,
                do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH)
            self._prompt_cache[prompt] = {"prompt_embeds": embeds.to(device), "pooled": pooled.to(device)}
        return self._prompt_cache[prompt]

    def encode(self, prompts: Sequence[str]) -> dict:
        cond = _cat([self._encode_one(p) for p in prompts])
        if self.guidance == 1.0:
            return {"cond": cond, "model": cond}
        uncond = _expand(self._uncond_one, len(prompts))
        return {"cond": cond, "model": {k: torch.cat([uncond[k], cond[k]]) for k in cond}}

    def offload_text_encoders(self, prompts: Sequence[str], device: torch.device | str = "cpu") -> None:
        for p in prompts:
            self._encode_one(p)
        for encoder in self.text_encoders:
            encoder.to(device)

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        size = self.resolution // self.pipe.vae_scale_factor
        device = next(self.network.parameters()).device
        channels = self.network.config.in_channels
        return torch.randn(n, channels, size, size, generator=generator).to(device)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: dict, network: torch.nn.Module | None = None) -> torch.Tensor:
        """The guided velocity (the chain's prediction; the method keeps the protocol's name)."""
        net = network or self.network
        dtype = getattr(net, "module", net).pos_embed.proj.weight.dtype
        both = cond["model"]
        if self.guidance == 1.0:
            return net(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=both["prompt_embeds"],
                       pooled_projections=both["pooled"]).sample.float()
        out = net(hidden_states=torch.cat([x, x]).to(dtype), timestep=torch.cat([t, t]),
                  encoder_hidden_states=both["prompt_embeds"], pooled_projections=both["pooled"]).sample.float()
        v_uncond, v_cond = out.chunk(2)
        return v_uncond + self.guidance * (v_cond - v_uncond)

    def reference(self):
        return peft_adapters_off(self._lora_layers)

    @torch.no_grad()
    def decode(self, x_0: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = x_0.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return ((vae.decode(latents).sample.float() + 1) / 2).clamp(0, 1)

    def text_features(self, cond: dict) -> torch.Tensor:
        return cond["cond"]["prompt_embeds"]

    def export_modules(self) -> dict[str, LoraModule]:
        return lora_modules_from_unet(self.network)

    def chain(self) -> dict[str, Any]:
        s = self.schedule
        return {"family": self.family, "sampler": "flow_ancestral", "eta": s.eta, "steps": s.num_steps,
                "shift": s.shift, "prediction": "flow", "cfg": self.guidance, "resolution": self.resolution,
                "max_sequence_length": MAX_SEQUENCE_LENGTH}
