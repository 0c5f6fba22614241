"""Model families behind one small protocol, so one training loop serves them all.

A family owns its chain's *network* (what the policy predicts at a state) and nothing of the
objective: the loop (:mod:`..train`) samples with :func:`..sampler.sample_trajectory`, rewards,
forms advantages (:mod:`..objective`) and updates, whichever family it holds.

* :mod:`.sd`  -- Stable Diffusion 1.x/2.x UNets from a diffusers folder (eps or v prediction,
  the schedule read from the model's scheduler config), classifier-free guidance;
* :mod:`.toy` -- an MLP noise predictor on points in R^d (the validation problems with a known
  optimum run through the very loop the CLI runs).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Protocol, Sequence

import torch

from ...blend.lora_file import LoraModule
from ..sampler import DDIMSchedule

__all__ = ["ChainPolicy", "load_policy"]


class ChainPolicy(Protocol):
    """What the training loop needs from a model family."""

    family: str
    schedule: DDIMSchedule  # the chain: DDIM with the model's own betas and prediction type
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
    """The family of ``cfg.base.path`` with a fresh adapter (only SD is read from files today)."""
    from .sd import SDPolicy

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
