"""Pure-torch core of Diffusion Blend.  Never imports ComfyUI.

- :mod:`.coefficients` -- the blend formula (user weights, KL scale -> affine coefficients).
- :mod:`.lora_file`    -- reading/writing LoRA safetensors (kohya, peft/diffusers, ComfyUI keys).
- :mod:`.plan`         -- what a blend evaluates: segments (models) per call and how their outputs combine.
- :mod:`.deltas`       -- one basis' change to one layer and the arithmetic that applies it.
- :mod:`.runtime`      -- the bank of deltas bound to a network, and per layer how a delta reaches it:
  :mod:`.weight_functions` (per-call weight), :mod:`.output_hooks` (output rows), :mod:`.swap`
  (merged copies swapped in), or merged at load by the host.
- :mod:`.smc`          -- DB-SMC: the blend as the proposal of a sequential Monte Carlo sampler.
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
