"""Benchmark: DPOK training on the tiny base, and its cost relative to plain sampling.

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

from diffusion_blend.training.pipeline import decode_latents, encode_prompts, guided_eps_fn  # noqa: E402
from diffusion_blend.training.sampler import DDIMSchedule, sample_trajectory  # noqa: E402
from diffusion_blend.training.train import run_training  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sampling-steps", type=int, default=10)
    args = ap.parse_args(argv)
    comfy = Path(os.environ.get("COMFYUI_DIR") or ROOT / ".cache" / "comfyui")
    base = tiny_fixtures.build_tiny_base(comfy)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_config(base["diffusers"], Path(tmp), **{"steps": args.steps, "batch_size": args.batch,
                                                           "sampling.steps": args.sampling_steps,
                                                           "algorithm.advantage": "value"})
        result = run_training(cfg, progress=False)
    hist = result.history[1:] or result.history  # the first step includes warm-up
    model = result.policy.model

    def mean(key):
        return statistics.mean(h[key] for h in hist)

    step_s = mean("time_sampling") + mean("time_reward") + mean("time_update")
    # plain sampling of the same batch with the same sampler, decode included
    schedule = DDIMSchedule.stable_diffusion(cfg.sampling.steps, cfg.sampling.eta)
    res = cfg.sampling.resolution
    prompts = ["a cat"] * args.batch
    cond = encode_prompts(model, prompts, res, res)
    uncond = encode_prompts(model, [""] * args.batch, res, res)
    model.unet.eval()
    plain = []
    for rep in range(3):
        g = torch.Generator().manual_seed(rep)
        x = torch.randn(args.batch, 4, res // 8, res // 8, generator=g)
        t0 = time.perf_counter()
        traj = sample_trajectory(guided_eps_fn(model.unet, cond, uncond, cfg.sampling.guidance), schedule, x, g)
        decode_latents(model, traj.final)
        plain.append(time.perf_counter() - t0)
    plain_s = min(plain)
    print(f"tiny base, {res}x{res}, {cfg.sampling.steps} DDIM steps (eta 1), CFG {cfg.sampling.guidance}, "
          f"batch {args.batch}, value-network advantage, threads {torch.get_num_threads()}")
    print("| quantity | value |\n|---|---|")
    print(f"| samples/s (training) | {args.batch / step_s:.2f} |")
    print(f"| s per optimizer step | {step_s:.2f} |")
    print(f"| — sampling (policy + reference forward per step) | {mean('time_sampling'):.2f} s "
          f"({mean('time_sampling') / step_s:.0%}) |")
    print(f"| — reward (VAE decode + reward) | {mean('time_reward'):.2f} s ({mean('time_reward') / step_s:.0%}) |")
    print(f"| — update (policy forward, backward, value net) | {mean('time_update'):.2f} s "
          f"({mean('time_update') / step_s:.0%}) |")
    print(f"| plain sampling + decode of the same batch | {plain_s:.2f} s |")
    print(f"| training iteration ÷ plain sampling | {step_s / plain_s:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
