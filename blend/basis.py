"""A basis of the blend: one LoRA, its user weight and its reference KL weight."""

from __future__ import annotations

from dataclasses import dataclass

from .coefficients import BlendInputError
from .lora_file import LoraFile

__all__ = ["Basis", "make_basis"]


@dataclass(frozen=True)
class Basis:
    lora: LoraFile
    weight: float
    alpha_ref: float

    @property
    def name(self) -> str:
        return self.lora.name


def make_basis(lora: LoraFile, weight: float, alpha_ref: float = 0.0) -> Basis:
    """Basis from a parsed file; ``alpha_ref = 0`` means "read ``db.alpha_ref`` from the file"."""
    if alpha_ref < 0:
        raise BlendInputError(f"alpha_ref = {alpha_ref!r} for {lora.name}: expected > 0, or 0 to read the file's")
    if alpha_ref == 0:
        from_file = lora.alpha_ref
        if from_file is None:
            raise BlendInputError(
                f"alpha_ref: {lora.name} has no db.alpha_ref metadata; enter the KL weight it was "
                "trained with on the node (alpha_ref > 0)"
            )
        if not from_file > 0:
            raise BlendInputError(f"alpha_ref: {lora.name} stores db.alpha_ref = {from_file!r}; expected > 0")
        alpha_ref = from_file
    return Basis(lora=lora, weight=float(weight), alpha_ref=float(alpha_ref))
