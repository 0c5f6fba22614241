"""The blend as a ComfyUI ``APPLY_MODEL`` wrapper (keyed, so it stacks with other packs').

ComfyUI calls ``BaseModel.apply_model(x, t, c_concat, c_crossattn, control, transformer_options,
**kwargs)`` below CFG and every guider, for cond and uncond chunks batched together, and returns
the denoised ``x0``.  The wrapper evaluates the blend's models there -- several of them in one
forward by repeating every batched input -- and combines their ``x0`` (see ``blend.runtime``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

import comfy.model_management
import comfy.utils

from ..blend.lora_file import LoraFile, index_module_names
from ..blend.runtime import LowRankBank, Mode, evaluate_plan, make_plan, repeat_batch

WRAPPER_KEY = "diffusion_blend"


def module_name_index(base_model) -> dict[str, str]:
    """Every LoRA module name (kohya, diffusers/peft, ComfyUI) -> module path in ``diffusion_model``."""
    pairs: list[tuple[str, str]] = []
    unet_config = getattr(base_model.model_config, "unet_config", {}) or {}
    for diffusers_key, comfy_key in comfy.utils.unet_to_diffusers(unet_config).items():
        if diffusers_key.endswith(".weight") and comfy_key.endswith(".weight"):
            pairs.append((diffusers_key[: -len(".weight")], comfy_key[: -len(".weight")]))
    for name, module in base_model.diffusion_model.named_modules():
        if name and hasattr(module, "weight"):
            pairs.append((name, name))
    return index_module_names(pairs)


def bind_bank(base_model, loras: Sequence[LoraFile]) -> LowRankBank:
    return LowRankBank(loras, module_name_index(base_model), base_model.diffusion_model)


def _fresh_lists(control):
    """A shallow copy of ComfyUI's control dict ``{"input": [...], "middle": [...], "output": [...]}``."""
    if isinstance(control, dict):
        return {name: list(v) if isinstance(v, list) else v for name, v in control.items()}
    return control


def _segments_that_fit(base_model, x: torch.Tensor, wanted: int) -> int:
    """How many copies of the batch fit one forward, by ComfyUI's own memory estimate."""
    if wanted <= 1:
        return 1
    free = comfy.model_management.get_free_memory(x.device)
    for k in range(wanted, 1, -1):
        if base_model.memory_required([x.shape[0] * k, *x.shape[1:]]) * 1.5 < free:
            return k
    return 1


@dataclass
class BlendWrapper:
    """``WrappersMP.APPLY_MODEL`` wrapper evaluating the blend with coefficients ``coefficients``."""

    bank: LowRankBank
    coefficients: tuple[float, ...]
    mode: Mode
    sigma_start: float  # the blend acts for sigma_end <= sigma <= sigma_start
    sigma_end: float
    seed: int = 0
    #: Stack several models in one forward?  ``None`` (auto): on accelerators yes, as many as fit
    #: ComfyUI's memory estimate; on the CPU no -- there a batch of k*B costs more than k forwards of
    #: B in time and memory (bench/blend_speed.py), and the result is the same.
    batch_segments: bool | None = None

    def segments_per_call(self, base_model, x: torch.Tensor, wanted: int) -> int:
        if self.mode == "sequential":
            return 1
        batch = self.batch_segments if self.batch_segments is not None else x.device.type != "cpu"
        return _segments_that_fit(base_model, x, wanted) if batch else 1

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = float(t.reshape(-1)[0])
        if not (self.sigma_end <= sigma <= self.sigma_start):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        plan = make_plan(self.mode, self.coefficients, seed=self.seed, sigma=sigma)
        batch = x.shape[0]

        def run(k: int) -> torch.Tensor:
            if k == 1:  # the UNet pops control residuals off their lists: give every forward its own
                return executor(x, t, c_concat, c_crossattn, _fresh_lists(control), transformer_options, **kwargs)
            options = dict(transformer_options)
            # Keep ComfyUI's batch contract: one 0/1 entry per chunk of the batch.
            for key in ("cond_or_uncond", "uuids"):
                if key in options:
                    options[key] = list(options[key]) * k
            rep = lambda v: repeat_batch(v, k, batch)  # noqa: E731
            return executor(rep(x), rep(t), rep(c_concat), rep(c_crossattn), rep(control), options,
                            **{name: rep(v) for name, v in kwargs.items()})

        per_call = self.segments_per_call(executor.class_obj, x, len(plan.segments))
        return evaluate_plan(plan, self.bank, executor.class_obj.diffusion_model, run, batch, per_call)
