"""A small value network ``V(x_t, t, prompt)`` predicting the final reward (DPOK's baseline).

The advantage of the transition out of ``x_t`` is ``r - V(x_t, t, c)``; ``V`` is regressed onto
the observed rewards with an MSE loss after every sampling round.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ValueNet"]


def timestep_features(t: torch.Tensor, dim: int = 32) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class ValueNet(nn.Module):
    def __init__(self, latent_channels: int, text_dim: int, hidden: int = 256):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(latent_channels, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.mlp = nn.Sequential(nn.Linear(32 + 32 + text_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``text``: prompt embeddings ``(B, tokens, dim)`` (mean-pooled here)."""
        h = torch.cat([self.conv(x_t.float()), timestep_features(t), text.float().mean(1)], dim=-1)
        return self.mlp(h).squeeze(-1)
