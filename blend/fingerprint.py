"""A fingerprint of a base model's UNet weights that does not depend on key names or layout.

Training sees the UNet with diffusers names, ComfyUI with its own; both must agree on which base a
LoRA was made for.  Each tensor is hashed on its values cast to float16 (the precision checkpoints
are shared in) and the sorted digests are hashed again, so names and order do not matter.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

__all__ = ["weights_fingerprint"]


def weights_fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """``sha256`` (first 16 hex digits) over the sorted per-tensor digests of ``tensors``."""
    digests = []
    for t in tensors:
        data = t.detach().to("cpu", torch.float16).contiguous()
        h = hashlib.sha256(str(tuple(data.shape)).encode())
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        digests.append(h.hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:16]
