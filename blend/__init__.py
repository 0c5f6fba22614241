"""Pure-torch core of Diffusion Blend.  Never imports ComfyUI.

- :mod:`.coefficients` -- the blend formula (user weights, KL scale -> affine coefficients).
- :mod:`.lora_file`    -- reading/writing LoRA safetensors (kohya, peft/diffusers, ComfyUI keys).
- :mod:`.runtime`      -- evaluating several LoRAs on one shared network (batched, sequential,
  merged, stochastic) and combining the predictions.
"""

from .coefficients import BlendInputError, blend_coefficients, affine_coefficients
from .lora_file import LoraFormatError, LoraModule, LoraFile, read_lora, write_lora

__all__ = [
    "BlendInputError",
    "blend_coefficients",
    "affine_coefficients",
    "LoraFormatError",
    "LoraModule",
    "LoraFile",
    "read_lora",
    "write_lora",
]
