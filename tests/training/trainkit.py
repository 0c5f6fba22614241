"""A tiny, fast training configuration on the tiny base (CPU, seconds per step)."""

from __future__ import annotations

from pathlib import Path

from diffusion_blend.training.config import TrainConfig, load_config

PROMPTS = ["a cat", "a dog"]


def tiny_config(base_dir: Path, output_dir: Path, **overrides) -> TrainConfig:
    items = {
        "base.path": str(base_dir), "lora.rank": 4, "lora.alpha": 4.0,
        "sampling.steps": 4, "sampling.guidance": 3.0, "sampling.resolution": 64,
        "algorithm.name": "dpok", "algorithm.alpha_ref": 0.001,
        "algorithm.clip_range": 0.2, "algorithm.advantage": "per_prompt",
        "rewards": {"brightness": 1.0}, "prompts": PROMPTS, "batch_size": 8, "grad_accum": 1, "lr": 0.003,
        "max_grad_norm": 1.0, "steps": 12, "output_dir": str(output_dir), "checkpoint_every": 100,
        "image_every": 100, "log_every": 1,
    }
    items.update(overrides)
    args = []
    for k, v in items.items():
        args += [f"--{k}", repr(v) if not isinstance(v, str) else v]
    return load_config(None, args)


def write_yaml(cfg: TrainConfig, path: Path) -> Path:
    import yaml

    from diffusion_blend.training.config import to_dict

    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path
