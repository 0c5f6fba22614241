"""Policy-gradient losses over denoising chains: pure functions of tensors, no I/O."""

from .ddpo import ddpo_loss
from .dpok import clipped_policy_loss, dpok_loss

ALGORITHMS = ("dpok", "ddpo")

__all__ = ["ALGORITHMS", "clipped_policy_loss", "ddpo_loss", "dpok_loss"]
