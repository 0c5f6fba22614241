"""What the flow-matching families (:mod:`.sd3`, :mod:`.flux`) share: a diffusers pipeline whose
transformer carries the peft LoRA, each distinct prompt encoded once (the encoders can then leave the
accelerator), the flow chain, VAE decoding with the latent scale and shift, and the export of the
adapter.  A family adds its prompt encoding, its forward (:meth:`eps`), its latent layout and its
``db.chain``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...blend.fingerprint import weights_fingerprint
from ...blend.lora_file import LoraModule
from ..export import lora_modules_from_unet
from ..pipeline import DTYPES, BaseModelError, add_lora, lora_parameters
from ..sampler import FlowSchedule
from . import peft_adapters_off, peft_lora_layers

__all__ = ["TransformerPolicy"]


class TransformerPolicy:
    family = ""
    pipeline_class = ""  # the diffusers pipeline class name

    def __init__(self, pipe, schedule: FlowSchedule, guidance: float, resolution: int, fingerprint: str):
        self.pipe = pipe
        self.network = pipe.transformer
        self.schedule = schedule
        self.guidance = guidance
        self.resolution = resolution
        self.fingerprint = fingerprint
        self._prompt_cache: dict[str, dict] = {}
        self._lora_layers = peft_lora_layers(self.network)

    @classmethod
    def load_pipeline(cls, cfg):
        import diffusers

        try:
            return getattr(diffusers, cls.pipeline_class).from_pretrained(
                cfg.base.path, torch_dtype=DTYPES[cfg.base.dtype], local_files_only=True)
        except (OSError, ValueError) as exc:
            raise BaseModelError(f"base.path: cannot load {cfg.base.path} from local files: {exc}") from None

    @staticmethod
    def prepare(pipe, cfg, device: torch.device | str) -> str:
        """Freeze the pipeline, attach the trainable LoRA (float32) and move it to ``device``; returns
        the fingerprint of the frozen transformer."""
        encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        for m in [pipe.transformer, pipe.vae, *[e for e in encoders if e is not None]]:
            m.requires_grad_(False).eval()
        fingerprint = weights_fingerprint(pipe.transformer.state_dict().values())
        torch.manual_seed(cfg.seed)  # LoRA A initialisation
        add_lora(pipe.transformer, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.rslora)
        for p in lora_parameters(pipe.transformer):
            p.data = p.data.float()
        pipe.to(device)
        if cfg.gradient_checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        return fingerprint

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
                if e is not None]

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.network.named_parameters() if "lora_" in n}

    def encode_prompt(self, prompt: str) -> dict:
        """``{"prompt_embeds": (1, tokens, dim), "pooled": (1, dim)}`` of one prompt, on the encoders' device."""
        raise NotImplementedError

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> dict:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = {k: v.to(self.device) for k, v in self.encode_prompt(prompt).items()}
        return self._prompt_cache[prompt]

    def offload_text_encoders(self, prompts: Sequence[str], device: torch.device | str = "cpu") -> None:
        """Encode ``prompts`` now and move the text encoders to ``device`` (the CPU)."""
        for p in prompts:
            self._encode_one(p)
        for encoder in self.text_encoders:
            encoder.to(device)

    def reference(self):
        return peft_adapters_off(self._lora_layers)

    def vae_latents(self, x_0: torch.Tensor) -> torch.Tensor:
        """The chain's state as the VAE's ``(B, C, H, W)`` latent (before scale and shift)."""
        return x_0

    def decode(self, x_0: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (differentiable where gradients are enabled)."""
        vae = self.pipe.vae
        latents = self.vae_latents(x_0).to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return ((vae.decode(latents).sample.float() + 1) / 2).clamp(0, 1)

    def text_features(self, cond: dict) -> torch.Tensor:
        return cond["cond"]["prompt_embeds"]

    def export_modules(self) -> dict[str, LoraModule]:
        return lora_modules_from_unet(self.network)
