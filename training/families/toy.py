"""The toy family: an MLP noise predictor on points in R^d with a peft LoRA on its Linear layers.

It is a family like SD (same protocol, same loop, same export), so the validation problems with a
known optimum (``validation/``) test the code the CLI runs.  Rewards score the final points.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from torch import nn

from ...blend.fingerprint import weights_fingerprint
from ...blend.lora_file import LoraModule
from ..export import lora_modules_from_unet
from ..sampler import DDIMSchedule
from . import peft_adapters_off, peft_lora_layers

__all__ = ["EpsMLP", "ToyPolicy"]


class EpsMLP(nn.Module):
    """``eps(x_t, t)`` for points in R^d: an MLP on ``[x_t, sinusoidal(t)]``."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, t_features: int = 32):
        super().__init__()
        self.dim = dim
        self.t_features = t_features
        layers: list[nn.Module] = [nn.Linear(dim + t_features, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.t_features // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=x.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.net(torch.cat([x.float(), args.sin(), args.cos()], dim=-1))


class ToyPolicy:
    family = "toy"

    def __init__(self, base: EpsMLP, schedule: DDIMSchedule, rank: int = 4, lora_alpha: float | None = None,
                 seed: int = 0):
        from peft import LoraConfig, inject_adapter_in_model

        self.fingerprint = weights_fingerprint(base.state_dict().values())
        self.schedule = schedule
        torch.manual_seed(seed)  # LoRA A initialisation
        network = copy.deepcopy(base)
        targets = [name for name, m in network.named_modules() if isinstance(m, nn.Linear)]
        config = LoraConfig(r=rank, lora_alpha=rank if lora_alpha is None else lora_alpha, target_modules=targets,
                            init_lora_weights="gaussian")
        self.network = inject_adapter_in_model(config, network)
        self._lora_layers = peft_lora_layers(self.network)
        for n, p in self.network.named_parameters():
            p.requires_grad_("lora_" in n)

    @classmethod
    def from_config(cls, base: EpsMLP, cfg) -> "ToyPolicy":
        schedule = DDIMSchedule.stable_diffusion(cfg.sampling.steps, cfg.sampling.eta)
        return cls(base, schedule, cfg.lora.rank, cfg.lora.alpha, cfg.seed)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.network.named_parameters() if "lora_" in n}

    def encode(self, prompts: Sequence[str]) -> None:
        return None

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        device = next(self.network.parameters()).device
        return torch.randn(n, self.network.dim, generator=generator).to(device)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None, network: nn.Module | None = None) -> torch.Tensor:
        return (network or self.network)(x, t)

    def reference(self):
        return peft_adapters_off(self._lora_layers)

    def decode(self, x_0: torch.Tensor) -> torch.Tensor:
        return x_0

    def text_features(self, cond: Any) -> None:
        return None

    def export_modules(self) -> dict[str, LoraModule]:
        return lora_modules_from_unet(self.network)

    def chain(self) -> dict[str, Any]:
        s = self.schedule
        return {"sampler": "ddim", "eta": s.eta, "steps": s.num_steps, "spacing": s.spacing,
                "prediction": s.prediction_type}
