"""Flux (a diffusers ``FluxPipeline`` folder; Flux-dev's guidance embedding): the transformer with a
peft LoRA on the flow chain of :class:`..sampler.FlowSchedule`, shifted for the image's token count.

The chain runs on Flux's packed latents (2 x 2 patches of the 16-channel latent as tokens of 64): the
Gaussian transitions are elementwise, so packing changes nothing but the layout.  Flux-dev is
guidance-distilled: ``sampling.guidance`` is its guidance *input* (ComfyUI's ``FluxGuidance``), with
one forward per step and no classifier-free guidance.  The network predicts the velocity at model time
``sigma`` (diffusers' pipeline divides the scheduler's ``1000 sigma`` by 1000; so does :meth:`eps`).
The exported LoRA uses diffusers' ``transformer.*`` keys, which ComfyUI's loader maps onto its Flux.
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
from .sd import _cat

__all__ = ["FluxPolicy"]

#: T5 tokens per prompt (ComfyUI's Flux text encoder pads T5 to 256; shorter here keeps tiny runs small)
MAX_SEQUENCE_LENGTH = 256


class FluxPolicy:
    family = "flux"

    def __init__(self, pipe, schedule: FlowSchedule, guidance: float, resolution: int, fingerprint: str):
        from diffusers import FluxPipeline

        self.pipe = pipe
        self.network = pipe.transformer
        self.schedule = schedule
        self.guidance = guidance
        self.resolution = resolution
        self.fingerprint = fingerprint
        self.latent_size = resolution // pipe.vae_scale_factor
        device = next(self.network.parameters()).device
        self.img_ids = FluxPipeline._prepare_latent_image_ids(1, self.latent_size // 2, self.latent_size // 2,
                                                              device, torch.float32)
        self._prompt_cache: dict[str, dict] = {}
        self._lora_layers = peft_lora_layers(self.network)

    @classmethod
    def from_config(cls, cfg, device: torch.device | str = "cpu") -> "FluxPolicy":
        from diffusers import FluxPipeline

        try:
            pipe = FluxPipeline.from_pretrained(cfg.base.path, torch_dtype=DTYPES[cfg.base.dtype], local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BaseModelError(f"base.path: cannot load {cfg.base.path} from local files: {exc}") from None
        for m in [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]:
            m.requires_grad_(False).eval()
        fingerprint = weights_fingerprint(pipe.transformer.state_dict().values())
        torch.manual_seed(cfg.seed)  # LoRA A initialisation
        add_lora(pipe.transformer, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.rslora)
        for p in lora_parameters(pipe.transformer):
            p.data = p.data.float()
        pipe.to(device)
        if cfg.gradient_checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        tokens = (cfg.sampling.resolution // pipe.vae_scale_factor // 2) ** 2
        schedule = FlowSchedule.from_scheduler_config(dict(pipe.scheduler.config), cfg.sampling.steps,
                                                      cfg.sampling.eta, image_seq_len=tokens)
        return cls(pipe, schedule, cfg.sampling.guidance, cfg.sampling.resolution, fingerprint)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.network.named_parameters() if "lora_" in n}

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> dict:
        if prompt not in self._prompt_cache:
            device = next(self.network.parameters()).device
            embeds, pooled, _ = self.pipe.encode_prompt(prompt, prompt, device=next(self.pipe.text_encoder.parameters()).device,
                                                        max_sequence_length=MAX_SEQUENCE_LENGTH)
            self._prompt_cache[prompt] = {"prompt_embeds": embeds.to(device), "pooled": pooled.to(device)}
        return self._prompt_cache[prompt]

    def encode(self, prompts: Sequence[str]) -> dict:
        return {"cond": _cat([self._encode_one(p) for p in prompts])}

    def offload_text_encoders(self, prompts: Sequence[str], device: torch.device | str = "cpu") -> None:
        for p in prompts:
            self._encode_one(p)
        for encoder in self.text_encoders:
            encoder.to(device)

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Packed noise ``(n, tokens, 64)``: the 16-channel latent's 2 x 2 patches, as the pipeline packs them."""
        from diffusers import FluxPipeline

        channels, size = self.network.config.in_channels // 4, self.latent_size
        noise = torch.randn(n, channels, size, size, generator=generator)
        device = next(self.network.parameters()).device
        return FluxPipeline._pack_latents(noise, n, channels, size, size).to(device)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: dict, network: torch.nn.Module | None = None) -> torch.Tensor:
        """The velocity at model time ``t / 1000`` with the guidance input (the chain's prediction;
        the method keeps the protocol's name)."""
        net = network or self.network
        inner = getattr(net, "module", net)
        dtype = inner.x_embedder.weight.dtype
        c = cond["cond"]
        guidance = (torch.full((x.shape[0],), float(self.guidance), device=x.device)
                    if inner.config.guidance_embeds else None)
        txt_ids = torch.zeros(c["prompt_embeds"].shape[1], 3, device=x.device)
        return net(hidden_states=x.to(dtype), timestep=t.float() / 1000, guidance=guidance,
                   pooled_projections=c["pooled"], encoder_hidden_states=c["prompt_embeds"], txt_ids=txt_ids,
                   img_ids=self.img_ids.to(x.device)).sample.float()

    def reference(self):
        return peft_adapters_off(self._lora_layers)

    @torch.no_grad()
    def decode(self, x_0: torch.Tensor) -> torch.Tensor:
        from diffusers import FluxPipeline

        vae = self.pipe.vae
        latents = FluxPipeline._unpack_latents(x_0, self.resolution, self.resolution, self.pipe.vae_scale_factor)
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return ((vae.decode(latents).sample.float() + 1) / 2).clamp(0, 1)

    def text_features(self, cond: dict) -> torch.Tensor:
        return cond["cond"]["prompt_embeds"]

    def export_modules(self) -> dict[str, LoraModule]:
        return lora_modules_from_unet(self.network)

    def chain(self) -> dict[str, Any]:
        s = self.schedule
        return {"family": self.family, "sampler": "flow_ancestral", "eta": s.eta, "steps": s.num_steps,
                "shift": s.shift, "prediction": "flow", "guidance": self.guidance, "cfg": 1.0,
                "resolution": self.resolution, "max_sequence_length": MAX_SEQUENCE_LENGTH}
