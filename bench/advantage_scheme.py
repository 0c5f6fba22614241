"""Raw advantages vs. a frozen reward scale, measured side by side through the shipped loop.

Problem: a Gaussian base (the toy family's MLP) and a linear reward, whose exact tilt at any
``alpha_ref`` is known (gain = Var(r) / alpha_ref).  The reward's scale is varied over 10^4 with
``alpha_ref`` scaled with it, so the *same* problem is posed in different units.  For every scheme
(``reward_scale: 1`` = raw advantages, DPOK's choice; ``reward_scale: auto`` = divided by the
base's reward std, measured once and frozen) and baseline (leave-one-out batch mean, value net):

* implied / stated alpha after training (both schemes keep the optimum: this is the check);
* steps until the batch reward first reaches 90 % of the target gain (convergence);
* the share of updates whose gradient norm hit ``max_grad_norm`` (the clip rescales by the reward's
  units when advantages are raw);
* the value net's final regression loss relative to the variance of its targets.

    python bench/advantage_scheme.py [--iterations 60] [--out out/bench]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffusion_blend.validation.fidelity import FidelitySettings, fit_gaussian_base, linear_case

ROOT = Path(__file__).resolve().parents[1]


def run(mlp, reward_std: float, scheme: str, baseline: str, s: FidelitySettings) -> dict:
    import diffusion_blend.validation.fidelity as fidelity

    captured = {}
    train = fidelity._train

    def keep(*args, **kwargs):  # keep the run's history (the loop's own log)
        result, stated = train(*args, **kwargs)
        captured["history"] = result.history
        return result, stated

    fidelity._train = keep
    try:
        t0 = time.perf_counter()
        row = linear_case(mlp, reward_std, s, **{"algorithm.reward_scale": scheme, "algorithm.advantage": baseline,
                                                 "algorithm.value_lr": 1e-3})
        seconds = time.perf_counter() - t0
    finally:
        fidelity._train = train
    history = captured["history"]
    base_mean = history[0]["reward_mean"]
    target = row["target_gain"]
    reach = next((e["step"] for e in history if e["reward_mean"] - base_mean >= 0.9 * target), None)
    clipped = sum(e["grad_norm"] > 1.0 for e in history) / len(history)
    # the value net regresses G / reward_scale: its targets' variance is about (std of r / scale)^2
    target_var = (history[0]["reward_std"] / history[0]["reward_scale"]) ** 2
    value = [e["value_loss"] / target_var for e in history if "value_loss" in e]
    return {"reward_std": reward_std, "scheme": "raw" if scheme == 1.0 else "frozen scale", "baseline": baseline,
            "implied_over_stated": row["implied_alpha"] / row["alpha_ref"], "steps_to_90pct": reach,
            "clipped_fraction": clipped, "final_value_loss_over_target_var": value[-1] if value else None,
            "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    s = FidelitySettings(iterations=args.iterations, steps=20, batch=512, eval_samples=8192)
    mlp = fit_gaussian_base(steps=s.base_fit_steps)
    rows = []
    print("| reward std | scheme | baseline | implied/stated alpha | steps to 90 % gain | updates clipped | value loss / target var |")
    print("|---|---|---|---|---|---|---|")
    for reward_std in (0.02, 2.0, 200.0):
        for baseline in ("batch", "value"):
            for scheme in (1.0, "auto"):
                with tempfile.TemporaryDirectory():
                    r = run(mlp, reward_std, scheme, baseline, s)
                rows.append(r)
                v = r["final_value_loss_over_target_var"]
                print(f"| {reward_std:g} | {r['scheme']} | {baseline} | {r['implied_over_stated']:.3f} | "
                      f"{r['steps_to_90pct']} | {r['clipped_fraction']:.2f} | {'-' if v is None else f'{v:.3g}'} |",
                      flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "advantage_scheme.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
