"""The MLP head the LAION aesthetic predictor and ImageReward share (its own module, so that
``learned`` and ``imagereward`` import it without importing each other)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AestheticMLP"]


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor v2 head: five linear layers, no activations (keys ``layers.{0,2,4,6,7}``)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)
