"""Model families behind one small protocol, so one training loop serves them all.

A family owns its chain's *network* (what the policy predicts at a state) and nothing of the
objective: the loop (:mod:`..train`) samples with :func:`..sampler.sample_trajectory`, rewards,
forms advantages (:mod:`..objective`) and updates, whichever family it holds.

* :mod:`.sd`  -- Stable Diffusion 1.x/2.x and SDXL UNets from a diffusers folder (eps or v
  prediction, the DDIM chain read from the model's scheduler config), classifier-free guidance;
* :mod:`.sd3` -- SD3/SD3.5 MMDiT transformers (velocity prediction, the flow chain of
  :class:`..sampler.FlowSchedule`), classifier-free guidance;
* :mod:`.flux` -- Flux transformers (velocity on packed latents, the flow chain shifted for the
  image's token count, the guidance embedding instead of classifier-free guidance);
* :mod:`.toy` -- an MLP noise predictor on points in R^d (the validation problems with a known
  optimum run through the very loop the CLI runs).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Protocol, Sequence

import torch

from ...blend.lora_file import LoraModule
from ..sampler import DDIMSchedule, FlowSchedule

__all__ = ["ChainPolicy", "load_policy"]


class ChainPolicy(Protocol):
    """What the training loop needs from a model family."""

    family: str
    schedule: DDIMSchedule | FlowSchedule  # the chain: DDIM (the model's betas) or the flow chain
    network: torch.nn.Module  # the module holding the trainable adapter (what DDP wraps)
    fingerprint: str  # of the frozen base weights (db.base_fingerprint)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]: ...

    def encode(self, prompts: Sequence[str]) -> Any:
        """Conditioning of a batch (opaque to the loop)."""

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor: ...

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Any, network: torch.nn.Module | None = None) -> torch.Tensor:
        """The guided noise prediction of the policy (``network`` overrides the forward module,
        e.g. its DDP wrapper); inside :meth:`reference` it is the frozen base's."""

    def reference(self) -> ContextManager[None]: ...

    def decode(self, x_0: torch.Tensor) -> torch.Tensor:
        """What the rewards score (images in [0, 1] for image models)."""

    def text_features(self, cond: Any) -> torch.Tensor | None:
        """``(B, tokens, dim)`` for the value network, or None."""

    def export_modules(self) -> dict[str, LoraModule]: ...

    def chain(self) -> dict[str, Any]:
        """How the LoRA was trained to be sampled (written as ``db.chain``)."""


def load_policy(cfg, device: torch.device | str = "cpu") -> ChainPolicy:
    """The family of ``cfg.base.path`` (read from its ``model_index.json``) with a fresh adapter."""
    from pathlib import Path

    from ..pipeline import BaseModelError, pipeline_class
    from .flux import FluxPolicy
    from .sd import SDPolicy
    from .sd3 import SD3Policy

    folder = Path(cfg.base.path) if Path(cfg.base.path).is_dir() else Path(cfg.base.single_file_config or "")
    transformers = {"StableDiffusion3Pipeline": SD3Policy, "FluxPipeline": FluxPolicy}
    family = transformers.get(pipeline_class(folder))
    if family is not None:
        if not Path(cfg.base.path).is_dir():
            raise BaseModelError(f"base.path: {cfg.base.path}: {family.family} trains from a diffusers folder, "
                                 "not a single file")
        return family.from_config(cfg, device)
    return SDPolicy.from_config(cfg, device)


def peft_lora_layers(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft LoRA layers of ``network`` (found once; :func:`peft_adapters_off` runs every step)."""
    return [m for m in network.modules() if hasattr(m, "lora_A") and hasattr(m, "enable_adapters")]


@contextlib.contextmanager
def peft_adapters_off(layers: list[torch.nn.Module]):
    """The frozen base: the given peft LoRA layers switched off inside the block."""
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
