"""The blend in diffusers: the same core as the ComfyUI nodes, a second host for scripts and services.

Never imports ComfyUI; :mod:`..blend` never imports diffusers.

- :class:`.blend.DiffusionBlend` -- make a pipeline's ``unet``/``transformer`` predict the blend
  (weights, ``kl_scale``, ``normalize``, modes, a step window); ``remove()`` gives it back untouched.
- :func:`.smc.smc_sample` -- DB-SMC: the blend as the proposal of the pipeline's stochastic chain,
  reweighted toward the exact tilted target ``p_base exp(R / alpha)``.
- :func:`.loras.diffusers_deltas` -- a LoRA file as deltas on the denoiser, keys resolved by
  diffusers' own ``lora_state_dict``.
"""

from .blend import DiffusionBlend
from .loras import denoiser_of, diffusers_deltas
from .smc import smc_sample

__all__ = ["DiffusionBlend", "denoiser_of", "diffusers_deltas", "smc_sample"]
