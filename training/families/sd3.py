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

from ..sampler import FlowSchedule
from .sd import _cat, _expand
from .transformer import TransformerPolicy

__all__ = ["SD3Policy"]

#: T5 tokens per prompt (ComfyUI's SD3 text encoder pads T5 to 77 tokens too)
MAX_SEQUENCE_LENGTH = 77


class SD3Policy(TransformerPolicy):
    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"

    def __init__(self, pipe, schedule: FlowSchedule, guidance: float, resolution: int, fingerprint: str):
        super().__init__(pipe, schedule, guidance, resolution, fingerprint)
        self._uncond_one = self._encode_one("")

    @classmethod
    def from_config(cls, cfg, device: torch.device | str = "cpu") -> "SD3Policy":
        pipe = cls.load_pipeline(cfg)
        fingerprint = cls.prepare(pipe, cfg, device)
        schedule = FlowSchedule.from_scheduler_config(dict(pipe.scheduler.config), cfg.sampling.steps, cfg.sampling.eta)
        return cls(pipe, schedule, cfg.sampling.guidance, cfg.sampling.resolution, fingerprint)

    def encode_prompt(self, prompt: str) -> dict:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt, prompt, prompt, device=next(self.pipe.text_encoder.parameters()).device,
            do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def encode(self, prompts: Sequence[str]) -> dict:
        cond = _cat([self._encode_one(p) for p in prompts])
        if self.guidance == 1.0:
            return {"cond": cond, "model": cond}
        uncond = _expand(self._uncond_one, len(prompts))
        return {"cond": cond, "model": {k: torch.cat([uncond[k], cond[k]]) for k in cond}}

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        size = self.resolution // self.pipe.vae_scale_factor
        return torch.randn(n, self.network.config.in_channels, size, size, generator=generator).to(self.device)

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

    def chain(self) -> dict[str, Any]:
        s = self.schedule
        return {"family": self.family, "sampler": "flow_ancestral", "eta": s.eta, "steps": s.num_steps,
                "shift": s.shift, "prediction": "flow", "cfg": self.guidance, "resolution": self.resolution,
                "max_sequence_length": MAX_SEQUENCE_LENGTH}
