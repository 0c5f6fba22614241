"""Run under ``accelerate launch``: train, then each rank writes a digest of its LoRA weights."""

import hashlib
import sys
from pathlib import Path

import torch

from diffusion_blend.training.config import load_config
from diffusion_blend.training.train import run_training

cfg = load_config(sys.argv[1])
result = run_training(cfg, progress=False)
from accelerate import PartialState  # noqa: E402

state = PartialState()
h = hashlib.sha256()
for name, p in sorted(result.policy.network.named_parameters()):
    if "lora_" in name:
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
Path(cfg.output_dir, f"rank{state.process_index}.sha").write_text(h.hexdigest())
Path(cfg.output_dir, f"rank{state.process_index}.world").write_text(str(state.num_processes))
