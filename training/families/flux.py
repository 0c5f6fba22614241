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

from ..sampler import FlowSchedule
from .sd import _cat
from .transformer import TransformerPolicy

__all__ = ["FluxPolicy"]

#: T5 tokens per prompt (ComfyUI's Flux text encoder pads T5 to 256)
MAX_SEQUENCE_LENGTH = 256


class FluxPolicy(TransformerPolicy):
    family = "flux"
    pipeline_class = "FluxPipeline"

    def __init__(self, pipe, schedule: FlowSchedule, guidance: float, resolution: int, fingerprint: str):
        from diffusers import FluxPipeline

        super().__init__(pipe, schedule, guidance, resolution, fingerprint)
        self.latent_size = resolution // pipe.vae_scale_factor
        self.img_ids = FluxPipeline._prepare_latent_image_ids(1, self.latent_size // 2, self.latent_size // 2,
                                                              self.device, torch.float32)

    @classmethod
    def from_config(cls, cfg, device: torch.device | str = "cpu") -> "FluxPolicy":
        pipe = cls.load_pipeline(cfg)
        fingerprint = cls.prepare(pipe, cfg, device)
        tokens = (cfg.sampling.resolution // pipe.vae_scale_factor // 2) ** 2
        schedule = FlowSchedule.from_scheduler_config(dict(pipe.scheduler.config), cfg.sampling.steps,
                                                      cfg.sampling.eta, image_seq_len=tokens)
        return cls(pipe, schedule, cfg.sampling.guidance, cfg.sampling.resolution, fingerprint)

    def encode_prompt(self, prompt: str) -> dict:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt, prompt, device=next(self.pipe.text_encoder.parameters()).device,
                                                    max_sequence_length=MAX_SEQUENCE_LENGTH)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def encode(self, prompts: Sequence[str]) -> dict:
        return {"cond": _cat([self._encode_one(p) for p in prompts])}

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Packed noise ``(n, tokens, 64)``: the 16-channel latent's 2 x 2 patches, as the pipeline packs them."""
        from diffusers import FluxPipeline

        channels, size = self.network.config.in_channels // 4, self.latent_size
        noise = torch.randn(n, channels, size, size, generator=generator)
        return FluxPipeline._pack_latents(noise, n, channels, size, size).to(self.device)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: dict, network: torch.nn.Module | None = None) -> torch.Tensor:
        """The velocity at model time ``t / 1000`` with the guidance input (the chain's prediction;
        the method keeps the protocol's name)."""
        net = network or self.network
        inner = getattr(net, "module", net)
        c = cond["cond"]
        guidance = (torch.full((x.shape[0],), float(self.guidance), device=x.device)
                    if inner.config.guidance_embeds else None)
        txt_ids = torch.zeros(c["prompt_embeds"].shape[1], 3, device=x.device)
        return net(hidden_states=x.to(inner.x_embedder.weight.dtype), timestep=t.float() / 1000, guidance=guidance,
                   pooled_projections=c["pooled"], encoder_hidden_states=c["prompt_embeds"], txt_ids=txt_ids,
                   img_ids=self.img_ids.to(x.device)).sample.float()

    def vae_latents(self, x_0: torch.Tensor) -> torch.Tensor:
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(x_0, self.resolution, self.resolution, self.pipe.vae_scale_factor)

    def chain(self) -> dict[str, Any]:
        s = self.schedule
        return {"family": self.family, "sampler": "flow_ancestral", "eta": s.eta, "steps": s.num_steps,
                "shift": s.shift, "prediction": "flow", "guidance": self.guidance, "cfg": 1.0,
                "resolution": self.resolution, "max_sequence_length": MAX_SEQUENCE_LENGTH}
