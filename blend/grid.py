"""Labelled image grids (for sweeps): one function used by the grid node and the sweep CLI."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["image_grid", "parse_labels"]


def parse_labels(text: str) -> list[str]:
    """Captions separated by new lines or ``|``; surrounding blanks are dropped."""
    text = text.strip()
    if not text:
        return []
    return [part.strip() for part in re.split(r"\n|\|", text)]


def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans when the system has it (Greek letters, etc.), else Pillow's own font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def image_grid(
    images: torch.Tensor,
    columns: int,
    captions: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    title: Sequence[str] = (),
) -> torch.Tensor:
    """Lay ``images`` ``(B, H, W, 3)`` (floats in [0, 1]) out row by row, ``columns`` per row,
    with ``captions[i]`` above cell i, ``row_labels[r]`` left of row r and the lines of ``title``
    above the whole grid.  Returns ``(H', W', 3)``."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected (B, H, W, 3), got {tuple(images.shape)}")
    b, h, w, _ = images.shape
    columns = max(1, min(columns, b))
    rows = -(-b // columns)
    font_size = int(min(32, max(10, h // 10)))
    font = _font(font_size)
    cap_h = font_size + 6 if captions else 0
    pad = 2
    label_w = 0
    if row_labels:
        label_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) for t in row_labels) + 10
    cell_w, cell_h = w + pad, h + cap_h + pad
    title_h = len(title) * (font_size + 4) + (4 if title else 0)
    width = label_w + columns * cell_w + pad
    if title:
        width = max(width, max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) for t in title) + 8)
    canvas = Image.new("RGB", (width, title_h + rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(title):
        draw.text((4, 4 + k * (font_size + 4)), text, fill=(0, 0, 0), font=font)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    for i in range(b):
        r, c = divmod(i, columns)
        x0, y0 = label_w + pad + c * cell_w, title_h + pad + r * cell_h
        if captions:
            draw.text((x0 + 2, y0 + 2), captions[i], fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(pixels[i]), (x0, y0 + cap_h))
    for r, text in enumerate(row_labels[:rows]):
        draw.text((4, title_h + pad + r * cell_h + cap_h + h // 2 - font_size // 2), text, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
