"""Export a trained peft LoRA as a kohya-keyed safetensors file with ``db.*`` metadata.

ComfyUI (and kohya) scale a LoRA by ``alpha / rank``; peft by ``lora_alpha / r`` (rsLoRA:
``lora_alpha / sqrt(r)``).  We write ``alpha = scaling * rank`` so both give the same update.
The file is written by :func:`diffusion_blend.blend.lora_file.write_lora`, the project's one writer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import torch

from ..blend.lora_file import LoraModule, write_lora

__all__ = ["peft_scaling", "lora_modules_from_unet", "lora_modules_from_tensors", "lora_metadata", "run_metadata",
           "export_lora"]


def peft_scaling(rank: int, lora_alpha: float, rslora: bool) -> float:
    return lora_alpha / (math.sqrt(rank) if rslora else rank)


def lora_modules_from_unet(unet: torch.nn.Module, adapter: str = "default") -> dict[str, LoraModule]:
    """``{diffusers module path: LoraModule}`` of the peft adapter ``adapter`` on ``unet``."""
    modules = {}
    for name, module in unet.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or adapter not in lora_a:
            continue
        down = lora_a[adapter].weight.detach().float().cpu()
        up = module.lora_B[adapter].weight.detach().float().cpu()
        modules[name] = LoraModule(down=down, up=up, alpha=module.scaling[adapter] * down.shape[0])
    return modules


def lora_modules_from_tensors(tensors: Mapping[str, torch.Tensor], rank: int, lora_alpha: float, rslora: bool,
                              adapter: str = "default") -> dict[str, LoraModule]:
    """The same from named parameters (``<path>.lora_A.<adapter>.weight``), e.g. a checkpoint."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for role, marker in (("down", f".lora_A.{adapter}.weight"), ("up", f".lora_B.{adapter}.weight")):
            if key.endswith(marker):
                parts.setdefault(key[: -len(marker)], {})[role] = value.float()
    alpha = peft_scaling(rank, lora_alpha, rslora) * rank
    return {path: LoraModule(down=p["down"], up=p["up"], alpha=alpha) for path, p in parts.items()}


def lora_metadata(*, rewards: Mapping[str, float], algorithm: str, alpha_ref: float, reward_scale: float,
                  advantage: str, steps: int, base_fingerprint: str, rank: int, alpha: float,
                  chain: Mapping[str, object]) -> dict[str, str]:
    """``db.*`` (+ kohya ``ss_*``) metadata.  ``db.alpha_ref`` is the KL weight in raw reward units
    (DPOK and Adjoint Matching: DDPO has no KL term), ``db.reward_scale`` the constant the objective was divided
    by, ``db.chain`` how the LoRA was trained to be sampled (JSON)."""
    reward = next(iter(rewards)) if len(rewards) == 1 else ",".join(f"{k}:{v:g}" for k, v in rewards.items())
    meta = {
        "db.reward": reward,
        "db.algorithm": algorithm,
        "db.reward_scale": repr(float(reward_scale)),
        "db.advantage": advantage,
        "db.steps": str(int(steps)),
        "db.base_fingerprint": base_fingerprint,
        "db.chain": json.dumps(dict(chain), sort_keys=True),
        "ss_network_dim": str(rank),
        "ss_network_alpha": repr(float(alpha)),
        "ss_network_module": "networks.lora",
    }
    if algorithm in ("dpok", "adjoint_matching"):
        meta["db.alpha_ref"] = repr(float(alpha_ref))
    return meta


def run_metadata(cfg, *, steps: int, base_fingerprint: str, reward_scale: float, chain: Mapping[str, object],
                 modules: Mapping[str, LoraModule]) -> dict[str, str]:
    """The metadata of a run's LoRA from its config (training and ``export`` share it)."""
    from .config import alpha_ref_of

    return lora_metadata(rewards=cfg.rewards, algorithm=cfg.algorithm.name, alpha_ref=alpha_ref_of(cfg.algorithm),
                         reward_scale=reward_scale, steps=steps,
                         advantage="none" if cfg.algorithm.name == "adjoint_matching" else cfg.algorithm.advantage,
                         base_fingerprint=base_fingerprint, rank=cfg.lora.rank,
                         alpha=next(iter(modules.values())).alpha, chain=chain)


#: the key format ComfyUI's loader maps for each family's module names (``db.chain``'s ``family``)
KEY_FORMATS = {"sd3": "transformer", "flux": "transformer"}


def export_lora(modules: Mapping[str, LoraModule], path: str | Path, metadata: Mapping[str, str],
                dtype: torch.dtype = torch.float32) -> Path:
    """Write the LoRA in the keys ComfyUI maps for its family: kohya ``lora_unet_*`` for UNets,
    diffusers ``transformer.*`` for the SD3 and Flux transformers (the family is read from ``db.chain``)."""
    family = json.loads(metadata.get("db.chain", "{}")).get("family", "sd")
    write_lora(path, modules, metadata, key_format=KEY_FORMATS.get(family, "kohya"), dtype=dtype)
    return Path(path)
