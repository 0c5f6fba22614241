"""Rule-based rewards (no weights).  The JPEG ones follow DDPO: file size in kB at quality 95.

Brightness and saturation are differentiable functions of the pixels (``differentiable = True``:
Adjoint Matching can train on them); the JPEG sizes are not (an encoder's byte count).
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["Brightness", "Saturation", "JpegCompressibility", "JpegIncompressibility", "to_uint8"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` floats in [0, 1] -> ``(B, H, W, 3)`` uint8."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def jpeg_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    sizes = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes)


class JpegIncompressibility:
    """JPEG size in kB (larger files = more detail)."""

    differentiable = False

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        return jpeg_kb(images)


class JpegCompressibility:
    """Negative JPEG size in kB (smaller files score higher)."""

    differentiable = False

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        return -jpeg_kb(images)


class Brightness:
    """Mean pixel value in [0, 1] (differentiable)."""

    differentiable = True

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        return images.float().clamp(0, 1).flatten(1).mean(1).cpu()


class Saturation:
    """Mean HSV saturation ``(max - min) / max`` in [0, 1] (differentiable almost everywhere)."""

    differentiable = True

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        x = images.float().clamp(0, 1)
        mx, mn = x.max(1).values, x.min(1).values
        sat = torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-8), torch.zeros_like(mx))
        return sat.flatten(1).mean(1).cpu()
