"""A basis of the blend: one LoRA, its user weight and its reference KL weight."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from .coefficients import BlendInputError
from .lora_file import LoraFile

__all__ = ["Basis", "make_basis", "chain_mismatch"]


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


#: the keys of ``db.chain`` that say how to sample (not what was tilted): a LoRA trained by Adjoint
#: Matching (``sampler: any``, the tilted score at every noise level) holds for every value of them
SAMPLER_KEYS = ("sampler", "eta", "steps", "spacing", "shift", "memoryless_chain")


def chain_mismatch(bases: Sequence[Basis]) -> str | None:
    """A message when the bases were trained on different sampling chains (``db.chain``), else None.

    Each DPOK LoRA is the tilt of the base *for the chain it was trained on*; blending LoRAs of
    different chains (steps, eta, guidance, schedule) mixes tilts of different path measures.  An
    Adjoint Matching LoRA (``sampler: any``) is the tilted score for any sampler: only what it was
    tilted under (guidance, resolution, prediction, family) must agree with the others."""
    chains = [(f"basis {i + 1} ({b.name})", b.lora.chain) for i, b in enumerate(bases) if b.lora.chain is not None]
    keys = sorted({k for _, c in chains for k in c})

    def differs(key):
        held = [c for _, c in chains if key not in SAMPLER_KEYS or c.get("sampler") != "any"]
        return len({json.dumps(c.get(key)) for c in held}) > 1

    differing = [k for k in keys if differs(k)]
    if not differing:
        return None
    detail = "; ".join(f"{name}: " + ", ".join(f"{k}={c.get(k)}" for k in differing) for name, c in chains)
    return (f"the bases were trained on different sampling chains ({', '.join(differing)} differ): {detail}. "
            "Each LoRA is the tilt for its own chain; sample with one chain, ideally the one they share.")
