"""Benchmark: what a basis LoRA costs with DPOK and with Adjoint Matching, side by side in one run.

1. **Problems with a known optimum** (the Gaussian-linear and quadratic cases of
   ``validation/fidelity.py``, 20-step chains): for each algorithm a ladder of run sizes (updates x
   chains per update), each a fresh run through the shipped loop with two seeds; the cheapest that
   reaches, with both, equal fidelity -- >= 95 % of the target gain with implied alpha within 3 % of the stated one --
   on every reading it promises (DPOK: its training chain; Adjoint Matching: DDPM, the DDIM ODE,
   the flow Euler and ancestral steps, see ``validation/samplers.py``).  Counted: reward
   evaluations (one per chain and update; AM also back-propagates through each), network passes
   (each forward of the noise model, +1 when it runs with gradients: its backward; batched calls and
   per sample), wall time of the training.
   The goal: >= 10x fewer reward evaluations for AM.
2. **Per-iteration time and peak memory** of one optimizer step on the tiny SD1.5, SDXL, SD3 and Flux
   pipelines (CPU: the process's peak RSS), or with ``--full-size --device cuda`` on the published
   sizes at the shipped configs (``bench/train_memory.py``'s random-weight models; CUDA peak).

    python bench/train_efficiency.py [--quick] [--out out/bench]
    python bench/train_efficiency.py --full-size --device cuda --only pipelines

Writes ``out/bench/train_efficiency.json``: ``rows`` (``problem``, ``algorithm``, ``iterations``,
``batch``, ``reward_evals``, ``passes``, ``seconds`` (per run), ``implied_alpha_ratio`` (the worst
reading of both seeds), ``gain_fraction`` (the lowest), ``meets``, ``runs``), ``cheapest`` per problem and algorithm, ``ratio``
(DPOK's reward evaluations over AM's), and ``pipelines``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import diffusion_blend.validation.fidelity as fidelity  # noqa: E402
from diffusion_blend.training.families.toy import EpsMLP  # noqa: E402
from diffusion_blend.validation.fidelity import FidelitySettings, fit_gaussian_base, linear_rows, quadratic_rows  # noqa: E402
from diffusion_blend.validation.samplers import SAMPLERS  # noqa: E402

#: (iterations, chains per update, learning rate), in increasing reward evaluations (at equal cost: more
#: updates of smaller batches first, each algorithm at the toy's learning rate 3e-3 and at 1e-2).  DPOK
#: is at its best at 3e-3 (1e-2 is noisier: implied/stated 0.94-1.16 on these rungs), AM converges
#: in fewer reward calls at 1e-2 (its regression target has little variance).
LADDERS = {
    "dpok": [(100, 32, 3e-3), (200, 16, 3e-3), (100, 32, 1e-2), (200, 16, 1e-2), (25, 256, 3e-3), (100, 64, 3e-3),
             (200, 32, 3e-3), (100, 64, 1e-2), (200, 32, 1e-2), (50, 256, 3e-3), (100, 128, 3e-3), (50, 512, 3e-3),
             (100, 256, 3e-3), (100, 512, 3e-3), (200, 512, 3e-3)],
    "adjoint_matching": [(100, 4, 3e-3), (100, 4, 1e-2), (50, 8, 1e-2), (100, 8, 3e-3), (200, 4, 3e-3),
                         (50, 16, 3e-3), (25, 32, 3e-3), (100, 8, 1e-2), (100, 16, 3e-3), (200, 8, 3e-3),
                         (50, 32, 3e-3), (100, 32, 3e-3), (50, 64, 3e-3), (100, 64, 3e-3), (200, 64, 3e-3)],
}
QUICK_LADDERS = {"dpok": [(100, 64, 3e-3), (200, 32, 3e-3)], "adjoint_matching": [(100, 4, 1e-2), (100, 8, 1e-2)]}
#: every rung is run with each seed (LoRA initialisation and chains); it meets only if every run does
SEEDS = (0, 1)
GAIN_FRACTION, ALPHA_TOLERANCE = 0.95, 0.03


@contextlib.contextmanager
def count_passes():
    """Count the noise model's forwards (+1 for each run with gradients: it is back-propagated), as
    calls (``passes``) and as per-sample passes (``sample_passes``: a call on B chains counts B)."""
    counts = {"passes": 0, "sample_passes": 0}
    forward = EpsMLP.forward

    def counted(self, x, t):
        n = 2 if torch.is_grad_enabled() else 1
        counts["passes"] += n
        counts["sample_passes"] += n * x.shape[0]
        return forward(self, x, t)

    EpsMLP.forward = counted
    try:
        yield counts
    finally:
        EpsMLP.forward = forward


def run_problem(problem: str, algorithm: str, iterations: int, batch: int, lr: float, mlp, seed: int) -> dict:
    """One run of the shipped loop at this size and its readings; passes and seconds of the training
    alone (``fidelity._train`` wrapped), not of the readings."""
    settings = FidelitySettings(iterations=iterations, batch=batch, steps=20, lr=lr, eval_samples=8192)
    samplers = SAMPLERS if algorithm == "adjoint_matching" else ("ddpm",)
    overrides = {"algorithm.name": algorithm}
    cost = {"passes": 0, "sample_passes": 0, "seconds": 0.0}
    train = fidelity._train

    def counted_train(*args, **kwargs):
        t0 = time.perf_counter()
        with count_passes() as counts:
            out = train(*args, **kwargs)
        cost["passes"] += counts["passes"]
        cost["sample_passes"] += counts["sample_passes"]
        cost["seconds"] += time.perf_counter() - t0
        return out

    fidelity._train = counted_train
    try:
        if problem == "linear":
            readings = linear_rows(mlp, 0.2, settings, seed=seed, samplers=samplers, **overrides)
        else:
            readings = quadratic_rows(mlp, settings, seed=seed, samplers=samplers, **overrides)
    finally:
        fidelity._train = train
    ratios = [r["implied_alpha"] / r["alpha_ref"] for r in readings]
    fractions = [r["reached_gain"] / r["target_gain"] for r in readings]
    return {"seed": seed, "passes": cost["passes"], "sample_passes": cost["sample_passes"], "seconds": cost["seconds"],
            "implied_alpha_ratio": max(ratios, key=lambda x: abs(x - 1)), "gain_fraction": min(fractions),
            "readings": [{k: r[k] for k in ("sampler", "target", "implied_alpha", "alpha_ref", "target_gain",
                                            "reached_gain")} for r in readings]}


def run_rung(problem: str, algorithm: str, iterations: int, batch: int, lr: float, mlp) -> dict:
    """A rung of the ladder: one run per seed; the worst reading of all of them decides."""
    runs = [run_problem(problem, algorithm, iterations, batch, lr, mlp, seed) for seed in SEEDS]
    worst = max((r["implied_alpha_ratio"] for r in runs), key=lambda x: abs(x - 1))
    fraction = min(r["gain_fraction"] for r in runs)
    return {"problem": problem, "algorithm": algorithm, "iterations": iterations, "batch": batch, "lr": lr,
            "reward_evals": iterations * batch, "passes": max(r["passes"] for r in runs),
            "sample_passes": max(r["sample_passes"] for r in runs),
            "seconds": sum(r["seconds"] for r in runs) / len(runs), "implied_alpha_ratio": worst,
            "gain_fraction": fraction,
            "meets": abs(worst - 1) <= ALPHA_TOLERANCE and fraction >= GAIN_FRACTION, "runs": runs}


def problems_section(quick: bool) -> tuple[list[dict], dict, dict]:
    torch.set_num_threads(2)
    mlp = fit_gaussian_base(steps=FidelitySettings().base_fit_steps)
    ladders = QUICK_LADDERS if quick else LADDERS
    rows, cheapest = [], {}
    for problem in ("linear", "quadratic"):
        for algorithm, ladder in ladders.items():
            for iterations, batch, lr in ladder:
                row = run_rung(problem, algorithm, iterations, batch, lr, mlp)
                rows.append(row)
                print(f"{problem:<9} {algorithm:<17} {iterations:>4} x {batch:<4} lr {lr:<6g} reward evals {row['reward_evals']:>7} "
                      f"passes {row['passes']:>6} ({row['sample_passes']:>9} per sample) {row['seconds']:6.1f} s  implied/stated {row['implied_alpha_ratio']:.3f}  "
                      f"gain {row['gain_fraction']:.3f}  {'meets' if row['meets'] else '-'}", flush=True)
                if row["meets"]:
                    cheapest[f"{problem} {algorithm}"] = row
                    break  # the ladder rises in cost: the first that meets is the cheapest
    ratio = {}
    for problem in ("linear", "quadratic"):
        dpok, am = cheapest.get(f"{problem} dpok"), cheapest.get(f"{problem} adjoint_matching")
        if dpok and am:
            ratio[problem] = {key: dpok[key] / am[key] for key in ("reward_evals", "passes", "sample_passes", "seconds")}
    return rows, cheapest, ratio


PIPELINES = [("sd15", "sd15_saturation.yaml"), ("sdxl", "sdxl_saturation.yaml"), ("sd35", "sd35_saturation.yaml"),
             ("flux", "flux_saturation.yaml")]


def pipeline_row(k: int, algorithm: str, device: str, full_size: bool, sampling_steps: int) -> dict:
    """One optimizer step (in a child process: accelerate's state is set once per process)."""
    import train_memory

    family, config = PIPELINES[k]
    row = train_memory.measure(family, config, device, sampling_steps, not full_size,
                               ["--algorithm.name", algorithm])
    row["algorithm"] = algorithm
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def pipelines_section(device: str, full_size: bool, sampling_steps: int, only: str) -> list[dict]:
    rows = []
    for k, (family, _) in enumerate(PIPELINES):
        if only and family not in only.split(","):
            continue
        for algorithm in ("dpok", "adjoint_matching"):
            child = subprocess.run([sys.executable, __file__, "--pipeline-row", str(k), "--algorithm", algorithm,
                                    "--device", device, "--sampling-steps", str(sampling_steps),
                                    *(["--full-size"] if full_size else [])], capture_output=True, text=True)
            lines = [line for line in child.stdout.splitlines() if line.startswith("ROW ")]
            if child.returncode or not lines:
                raise SystemExit(f"{family} {algorithm}: the child failed\n{child.stderr[-3000:]}")
            row = json.loads(lines[-1][4:])
            rows.append(row)
            peak = row["peak_gib"] if device == "cuda" else row["peak_rss_gib"]
            print(f"{family:<5} {algorithm:<17} {row['seconds']:7.2f} s per iteration ({sampling_steps} chain steps, "
                  f"batch {row['batch']})  peak {peak:.2f} GiB ({'CUDA' if device == 'cuda' else 'process RSS'})",
                  flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a shorter ladder (the cheapest rungs that met in full runs)")
    ap.add_argument("--only", choices=("problems", "pipelines"), default=None)
    ap.add_argument("--families", default="", help="comma-separated pipeline families (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full-size", action="store_true", help="published model sizes at the shipped configs (GPU)")
    ap.add_argument("--sampling-steps", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--pipeline-row", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--algorithm", default="dpok", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pipeline_row is not None:
        print("ROW " + json.dumps(pipeline_row(args.pipeline_row, args.algorithm, args.device, args.full_size,
                                               args.sampling_steps)))
        return 0
    result: dict = {"device": args.device, "full_size": args.full_size}
    if args.only != "pipelines":
        rows, cheapest, ratio = problems_section(args.quick)
        result.update(rows=rows, cheapest=cheapest, ratio=ratio)
        for problem, r in ratio.items():
            print(f"{problem}: Adjoint Matching reaches equal fidelity with {r['reward_evals']:.1f}x fewer reward "
                  f"evaluations than DPOK ({r['sample_passes']:.1f}x fewer per-sample network passes, "
                  f"{r['passes']:.1f}x fewer batched passes, {r['seconds']:.1f}x less time)")
        missing = [k for k in (f"{p} {a}" for p in ("linear", "quadratic") for a in ("dpok", "adjoint_matching"))
                   if k not in cheapest]
        if missing:
            print(f"no rung met the fidelity for: {', '.join(missing)}")
    if args.only != "problems":
        result["pipelines"] = pipelines_section(args.device, args.full_size, args.sampling_steps, args.families)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "train_efficiency.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "train_efficiency.json")
    print(f"wrote {out / 'train_efficiency.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
