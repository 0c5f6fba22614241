"""Run under ``accelerate launch``: train once per algorithm named on the command line (``dpok``,
``adjoint_matching``), recording a digest of the chains this rank sampled; then each rank writes a
digest of its LoRA weights (``rank{i}.{algorithm}.sha``) and of its samples (``.samples``)."""

import dataclasses
import hashlib
import sys
from pathlib import Path

import torch

import diffusion_blend.training.train as train
from diffusion_blend.training.config import load_config

base_cfg = load_config(sys.argv[1])
from accelerate import PartialState  # noqa: E402

state = PartialState()
sampled = hashlib.sha256()
sample_round = train._sample_round


def recording(*args, **kwargs):
    rd = sample_round(*args, **kwargs)
    sampled.update(rd.traj.latents.detach().float().cpu().contiguous().numpy().tobytes())
    return rd


train._sample_round = recording
for algorithm in sys.argv[2:] or ["dpok"]:
    sampled = hashlib.sha256()
    out = Path(base_cfg.output_dir, algorithm)
    cfg = dataclasses.replace(base_cfg, output_dir=str(out),
                              algorithm=dataclasses.replace(base_cfg.algorithm, name=algorithm))
    result = train.run_training(cfg, progress=False)
    h = hashlib.sha256()
    for name, p in sorted(result.policy.network.named_parameters()):
        if "lora_" in name:
            h.update(name.encode())
            h.update(p.detach().float().contiguous().numpy().tobytes())
    (out / f"rank{state.process_index}.sha").write_text(h.hexdigest())
    (out / f"rank{state.process_index}.samples").write_text(sampled.hexdigest())
    (out / f"rank{state.process_index}.world").write_text(str(state.num_processes))
    torch.distributed.barrier() if torch.distributed.is_initialized() else None
