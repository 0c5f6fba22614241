"""Policy-gradient losses over denoising chains: pure functions of tensors, no I/O."""

from .advantages import normalize_per_prompt
from .ddpo import ddpo_loss
from .dpok import dpok_loss

ALGORITHMS = ("dpok", "ddpo")

__all__ = ["ALGORITHMS", "ddpo_loss", "dpok_loss", "normalize_per_prompt"]
