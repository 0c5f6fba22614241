"""A small value network ``V(x_t, t, prompt)``: DPOK's baseline.

It is regressed onto the return still to come, ``G_i / reward_scale`` (the final reward minus the
KL still to come, in the objective's units), and the advantage of the transition out of ``x_i``
is ``G_i / reward_scale - V(x_i, t_i, c)``: the same units on both sides.
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


class _TokenMean(nn.Module):
    def __init__(self, per_token: nn.Module):
        super().__init__()
        self.per_token = per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.per_token(x).mean(1)


class ValueNet(nn.Module):
    """Image latents ``(B, C, H, W)`` go through a small conv, token sequences ``(B, N, C)`` through a
    per-token layer and a mean; points ``(B, d)`` are used as they are.
    ``text_dim = 0`` for an unconditional family."""

    def __init__(self, latent_shape: tuple[int, ...], text_dim: int, hidden: int = 256):
        super().__init__()
        if len(latent_shape) == 3:
            self.encoder: nn.Module = nn.Sequential(
                nn.Conv2d(latent_shape[0], 32, 3, padding=1), nn.SiLU(),
                nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.SiLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
            features = 32
        elif len(latent_shape) == 2:  # token sequences (Flux's packed latents): per-token features, mean-pooled
            self.encoder = _TokenMean(nn.Sequential(nn.Linear(latent_shape[1], 32), nn.SiLU()))
            features = 32
        else:
            self.encoder = nn.Flatten()
            features = math.prod(latent_shape)
        self.text_dim = text_dim
        self.mlp = nn.Sequential(nn.Linear(features + 32 + text_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """``text``: prompt embeddings ``(B, tokens, dim)`` (mean-pooled here), or None."""
        parts = [self.encoder(x_t.float()), timestep_features(t)]
        if self.text_dim:
            parts.append(text.float().mean(1))
        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)
