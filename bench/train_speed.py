"""Benchmark: DPOK training on the tiny bases (SD1.5, SDXL, SD3, Flux-dev), and its cost relative to plain sampling.

Reports samples/s and seconds per optimizer step, split into sampling, reward and update
(the reference pass now runs during sampling, its means kept for the update), and the ratio of one training iteration to plain sampling
(the same stochastic sampler and VAE decode) of the same batch, measured side by side.

    python bench/train_speed.py [--steps 5] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "training"))
import tiny_fixtures  # noqa: E402
from trainkit import tiny_config  # noqa: E402

from diffusion_blend.training.sampler import sample_trajectory  # noqa: E402
from diffusion_blend.training.train import run_training  # noqa: E402


def measure(base_dir: Path, args) -> dict:
    """One family's training run and plain sampling of the same batch (the base, same sampler, decode)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_config(base_dir, Path(tmp), **{"steps": args.steps, "batch_size": args.batch,
                                                  "sampling.steps": args.sampling_steps,
                                                  "algorithm.advantage": "value"})
        result = run_training(cfg, progress=False)
    hist = result.history[1:] or result.history  # the first step includes warm-up
    policy = result.policy

    def mean(key):
        return statistics.mean(h[key] for h in hist)

    step_s = mean("time_sampling") + mean("time_reward") + mean("time_update")
    cond = policy.encode(["a cat"] * args.batch)
    plain = []
    with policy.reference(), torch.no_grad():
        for rep in range(3):
            g = torch.Generator().manual_seed(rep)
            x = policy.initial_noise(args.batch, g)
            t0 = time.perf_counter()
            traj = sample_trajectory(lambda x_t, t: policy.eps(x_t, t, cond), policy.schedule, x, g)
            policy.decode(traj.final)
            plain.append(time.perf_counter() - t0)
    return {"cfg": cfg, "step_s": step_s, "plain_s": min(plain), "sampling": mean("time_sampling"),
            "reward": mean("time_reward"), "update": mean("time_update")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sampling-steps", type=int, default=10)
    args = ap.parse_args(argv)
    comfy = Path(os.environ.get("COMFYUI_DIR") or ROOT / ".cache" / "comfyui")
    bases = {"SD1.5 (tiny)": tiny_fixtures.build_tiny_base(comfy)["diffusers"],
             "SDXL (tiny)": tiny_fixtures.build_tiny_sdxl(comfy),
             "SD3 (tiny, flow chain)": tiny_fixtures.build_tiny_sd3(comfy),
             "Flux-dev (tiny, flow chain)": tiny_fixtures.build_tiny_flux(comfy)}
    rows = {name: measure(path, args) for name, path in bases.items()}
    cfg = next(iter(rows.values()))["cfg"]
    print(f"tiny bases, {cfg.sampling.resolution}x{cfg.sampling.resolution}, {cfg.sampling.steps} chain steps (eta 1), "
          f"CFG {cfg.sampling.guidance}, batch {args.batch}, value-network advantage, threads {torch.get_num_threads()}")
    print("| family | samples/s | s per step | sampling | reward | update | plain sampling + decode | "
          "iteration ÷ plain |\n|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        step = r["step_s"]
        print(f"| {name} | {args.batch / step:.2f} | {step:.2f} | {r['sampling']:.2f} s ({r['sampling'] / step:.0%}) | "
              f"{r['reward']:.2f} s ({r['reward'] / step:.0%}) | {r['update']:.2f} s ({r['update'] / step:.0%}) | "
              f"{r['plain_s']:.2f} s | {step / r['plain_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
