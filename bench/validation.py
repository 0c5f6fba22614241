"""Validation report: Diffusion Blend against the exact target on a Gaussian-mixture problem.

Base: a 4-component mixture in R^8 (pictures: 3 components in R^2) under SD1.5's noise schedule.
Rewards: r1, r2 quadratic (pull toward two components), r3 linear.  For w on a simplex grid
(m = 2 and m = 3) and kl_scale in {0.25, 0.5, 1, 2, 4}:

* exact bases (the exact tilted score at alpha_ref,i): DB (exact blend), DB-LS (stochastic),
  and the exact target (its own score, same sampler) -- the blend's own error, the Jensen gap;
* learned bases (an MLP noise model + LoRAs trained by the project's training loop, the toy
  family of ``run_training``): DB, DB-LS and the Rewarded-Soup weight merge through the blend
  runtime, plus the MORL oracle (a LoRA trained on the weighted reward) at a few points (full run).

Training fidelity (``training.json``): every LoRA the loop trains is compared with the exact tilt
at the ``db.alpha_ref`` its file states -- linear rewards on a Gaussian base at reward scales 100x
apart, a quadratic reward (closed-form optimum of the objective), and the mixture LoRAs above --
DPOK's on the chain it was trained on (``target: chain``), Adjoint Matching's read by every sampler
of :mod:`diffusion_blend.validation.samplers` against the exact tilted score through that sampler
(``target: score``).  The blend on the AM LoRAs joins the exact-target report ("DB (AM LoRA)").

Metrics per method: E[r_i], the error relative to the alignment gain
``|E_m[r_i] - E_*[r_i]| / |E_*[r_i] - E_base[r_i]|``, the fraction of the gain
``(E_m - E_base) / (E_* - E_base)``, and MMD^2 to the target's samples.

    python bench/validation.py [--quick] [--out out/validation]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from diffusion_blend.blend.coefficients import BlendInputError, blend_coefficients
from diffusion_blend.blend.runtime import LowRankBank, evaluate_plan, make_plan
from diffusion_blend.training.sampler import DDIMSchedule
from diffusion_blend.validation.fidelity import (FidelitySettings, fit_gaussian_base, linear_rows, path_alpha,
                                                  quadratic_rows, score_gain)
from diffusion_blend.validation.samplers import SAMPLERS, sample_chain
from diffusion_blend.validation.gmm import GMM, expected_reward, tilt
from diffusion_blend.validation.problems import mixture_problem as problem
from diffusion_blend.validation.methods import (exact_model, mmd2, sample, sample_code, sample_db, sample_db_ls,
                                                 sample_db_smc, sample_rgg, weighted_error)
from diffusion_blend.validation.toy import fit_base, lora_file_of, merged_copy, mlp_model, train_dpok_lora

ROOT = Path(__file__).resolve().parents[1]
LAMBDAS = (0.25, 0.5, 1.0, 2.0, 4.0)


def simplex(m: int, step: float):
    n = round(1 / step)
    return [tuple(k / n for k in c) for c in itertools.product(range(n + 1), repeat=m) if sum(c) == n]


def lora_blend_model(mlp, files, coefficients, mode, schedule, seed):
    bank = LowRankBank(files, {p: p for f in files for p in f.modules}, mlp)

    @torch.no_grad()
    def eps(x, i):
        t = schedule.timesteps[i].expand(x.shape[0])
        plan = make_plan(mode, coefficients, seed=seed, sigma=float(i))
        return evaluate_plan(plan, bank, mlp, lambda k: mlp(torch.cat([x] * k), torch.cat([t] * k)), x.shape[0]).double()

    return eps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "out" / "validation"))
    ap.add_argument("--only", choices=("smc", "training"),
                    help="run one section alone (smc: DB-SMC, smc.json; training: the training-fidelity rows, training.json)")
    ap.add_argument("--docs", action="store_true",
                    help="also write the tables into docs/validation.md (between its smc-table and training-table markers)")
    ap.add_argument("--skip-smc", action="store_true",
                    help="leave the DB-SMC section out of the report (the CI's quick report; --only smc runs it)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --only smc: re-read OUT/smc.json instead of sampling (tables, plots, --docs)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    torch.set_num_threads(2)
    n = 1024 if args.quick else 2048
    schedule = DDIMSchedule.stable_diffusion(50 if args.quick else 100, steps_offset=0)
    dim = 8
    base, rewards, alpha_refs = problem(dim)
    g = torch.Generator().manual_seed(0)
    exact_base = exact_model(base, schedule)
    exact_bases = [exact_model(tilt(base, [r], [1.0], a), schedule) for r, a in zip(rewards, alpha_refs)]
    e_base = [expected_reward(base, r) for r in rewards]
    iters, batch = MIXTURE_ITERATIONS[args.quick], MIXTURE_BATCH[args.quick]
    if args.only == "smc" and args.reuse:
        smc_rows = json.loads((out / "smc.json").read_text())
        write_smc_outputs(smc_rows, out, args.docs)
        return 0
    if args.only == "smc":
        mlp = fit_base(base, steps=2000 if args.quick else 4000)
        loras = [train_dpok_lora(mlp, r, a, iterations=iters, batch=batch, seed=i, **MIXTURE_SETTINGS)
                 for i, (r, a) in enumerate(zip(rewards, alpha_refs))]
        smc_rows = smc_section(args.quick, base, rewards, alpha_refs, schedule, n, dim, e_base, {
            "exact": (exact_base, exact_bases, SMC_PARTICLES[args.quick]),
            "lora": (mlp_model(mlp, schedule), [mlp_model(m, schedule) for m in loras], SMC_PARTICLES_LORA[args.quick])})
        (out / "smc.json").write_text(json.dumps(smc_rows, indent=1))
        write_smc_outputs(smc_rows, out, args.docs)
        print(f"[validation {time.monotonic() - t_start:5.0f}s] wrote {out / 'smc.json'}", flush=True)
        if not args.quick:
            hard = hard_cells_section(base, rewards, alpha_refs, schedule, n, dim, e_base, exact_base, exact_bases)
            (out / "smc_hard_cells.json").write_text(json.dumps(hard, indent=1))
            write_hard_cells(hard, out)
            print(f"[validation {time.monotonic() - t_start:5.0f}s] wrote {out / 'smc_hard_cells.json'}", flush=True)
        return 0

    print(f"[validation {time.monotonic() - t_start:5.0f}s] training fidelity on problems with a known optimum", flush=True)
    training_rows = fidelity_rows(args.quick)
    print(f"[validation {time.monotonic() - t_start:5.0f}s] fitting the MLP base and training {len(rewards)} DPOK LoRAs", flush=True)
    mlp = fit_base(base, steps=2000 if args.quick else 4000)
    loras = [train_dpok_lora(mlp, r, a, iterations=iters, batch=batch, seed=i, **MIXTURE_SETTINGS)
             for i, (r, a) in enumerate(zip(rewards, alpha_refs))]
    files = [lora_file_of(m, f"lora_r{i + 1}") for i, m in enumerate(loras)]
    chain = loras[0].chain  # the chain the LoRAs were trained on (one config for all)
    base_samples = sample(mlp_model(mlp, chain), chain, 131072, dim, g)
    training_rows += [mixture_row(i, m, mlp, base, r, base_samples, g) for i, (m, r) in enumerate(zip(loras, rewards))]
    del base_samples
    print(f"[validation {time.monotonic() - t_start:5.0f}s] training {len(rewards)} Adjoint Matching LoRAs", flush=True)
    am_loras = [train_dpok_lora(mlp, r, a, iterations=AM_MIXTURE_ITERATIONS[args.quick], batch=AM_BATCH, seed=i,
                                **MIXTURE_SETTINGS, **AM)
                for i, (r, a) in enumerate(zip(rewards, alpha_refs))]
    training_rows += [row for i, (m, r) in enumerate(zip(am_loras, rewards))
                      for row in mixture_score_rows(i, m, mlp, base, r, n_eval=16384 if args.quick else 65536,
                                                    implied=not args.quick)]
    (out / "training.json").write_text(json.dumps(training_rows, indent=1))
    print_training(training_rows)
    if args.docs:
        write_docs_block(TRAINING_BEGIN, TRAINING_END, training_table(training_rows))
        print(f"wrote the training-fidelity table into {DOCS}")
    if args.only == "training":
        print(f"[validation {time.monotonic() - t_start:5.0f}s] wrote {out / 'training.json'}", flush=True)
        return 0
    am_files = [lora_file_of(m, f"am_lora_r{i + 1}") for i, m in enumerate(am_loras)]

    rows = []
    for m in (2, 3):
        idx = list(range(m))
        grid = simplex(m, 0.25 if m == 2 else 1 / 3)
        if args.quick:
            grid = grid[:: max(1, len(grid) // 3)]
        for w in grid:
            for lam in LAMBDAS:
                wt = [w[i] for i in idx]
                r_sub = [rewards[i] for i in idx]
                a_sub = [alpha_refs[i] for i in idx]
                alpha = sum(x * a for x, a in zip(wt, a_sub)) / lam
                target = tilt(base, r_sub, wt, alpha)
                e_target = [expected_reward(target, r) for r in r_sub]
                target_samples = sample(exact_model(target, schedule), schedule, n, dim, g)
                c = blend_coefficients(wt, a_sub, lam)
                methods = {
                    "DB (exact bases)": lambda: sample_db(wt, a_sub, lam, exact_base, [exact_bases[i] for i in idx], schedule, n, dim, g),
                    "DB-LS (exact bases)": lambda: sample_db_ls(wt, a_sub, lam, exact_base, [exact_bases[i] for i in idx], schedule, n, dim, g),
                    "target (same sampler)": lambda: target_samples,
                    "DB (LoRA)": lambda: sample(lora_blend_model(mlp, [files[i] for i in idx], c, "exact", schedule, 0), schedule, n, dim, g),
                    "DB-LS (LoRA)": lambda: sample(lora_blend_model(mlp, [files[i] for i in idx], c, "stochastic", schedule, 0), schedule, n, dim, g),
                    "RS merge (LoRA)": lambda: sample(lora_blend_model(mlp, [files[i] for i in idx], c, "merged", schedule, 0), schedule, n, dim, g),
                    "DB (AM LoRA)": lambda: sample(lora_blend_model(mlp, [am_files[i] for i in idx], c, "exact", schedule, 0), schedule, n, dim, g),
                }
                for name, fn in methods.items():
                    try:
                        xs = fn()
                    except BlendInputError:
                        continue  # DB-LS needs non-negative coefficients (kl_scale * sum w <= 1)
                    e = [float(r(xs).mean()) for r in r_sub]
                    rows.append(metrics(m, wt, lam, name, e, e_target, [e_base[i] for i in idx],
                                        mmd2(xs[:1024], target_samples[:1024]) if name != "target (same sampler)" else 0.0))
            print(f"[validation {time.monotonic() - t_start:5.0f}s] m={m} w={tuple(round(x, 2) for x in w)} done", flush=True)

    # MORL oracle (a LoRA trained on the weighted reward) at a few points; the full run only (one more
    # LoRA, 36 s of the quick run that CI's time budget does not have; the loop is exercised above)
    morl_points = [((0.5, 0.5), 1.0), ((0.25, 0.75), 0.5)] if not args.quick else []
    for w, lam in morl_points:
        alpha = sum(x * a for x, a in zip(w, alpha_refs[:2])) / lam
        weighted = lambda x, w=w: sum(wi * r(x) for wi, r in zip(w, rewards[:2]))  # noqa: E731
        model = train_dpok_lora(mlp, weighted, alpha, iterations=iters, batch=batch, seed=10,
                                **MIXTURE_SETTINGS)
        xs = sample(mlp_model(merged_copy(model), schedule), schedule, n, dim, g)
        target = tilt(base, rewards[:2], list(w), alpha)
        e_t = [expected_reward(target, r) for r in rewards[:2]]
        e = [float(r(xs).mean()) for r in rewards[:2]]
        rows.append(metrics(2, list(w), lam, "MORL oracle (LoRA)", e, e_t, e_base[:2],
                            mmd2(xs[:1024], sample(exact_model(target, schedule), schedule, 1024, dim, g))))

    smc_rows = []
    if not args.skip_smc:
        print(f"[validation {time.monotonic() - t_start:5.0f}s] DB-SMC on exact bases", flush=True)
        smc_rows = smc_section(args.quick, base, rewards, alpha_refs, schedule, n, dim, e_base, {
            "exact": (exact_base, exact_bases, SMC_PARTICLES[args.quick]),
            "lora": (mlp_model(mlp, schedule), [mlp_model(m, schedule) for m in loras], SMC_PARTICLES_LORA[args.quick])})
        (out / "smc.json").write_text(json.dumps(smc_rows, indent=1))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    write_report(rows, out, time.monotonic() - t_start)
    with open(out / "report.md", "a") as fh:
        fh.write("\n## Training fidelity (training.json)\n\n" + "\n".join(training_table(training_rows)) + "\n")
        if smc_rows:
            fh.write("\n## DB-SMC on exact bases (smc.json)\n\n" + "\n".join(smc_table(smc_rows)) + "\n")
    plot_pareto(rows, out)
    plot_scatter(out, schedule)
    if smc_rows:
        write_smc_outputs(smc_rows, out, args.docs)
    print(f"[validation {time.monotonic() - t_start:5.0f}s] wrote {out / 'report.md'}", flush=True)
    return 0


SMC_PARTICLES = {False: (8, 16, 32, 64, 128), True: (8, 64)}
SMC_PARTICLES_LORA = {False: (16, 64), True: (64,)}
VARIANT_PARTICLES = 64
CODE_CANDIDATES = 8  # CoDe: candidates per block of 5 steps
#: the strong-tilt variants of blend/smc.py, all with the potential on the blend's x̂_0 (the node's):
#: method name -> sample_db_smc options.  DB-SMC-tempered is the ComfyUI node's default.
SMC_VARIANTS = {
    "DB-SMC-tempered": dict(potential_on="blend", temper=True),
    "DB-SMC-tempered residual": dict(potential_on="blend", temper=True, resampling="residual"),
    "DB-SMC-tempered multinomial": dict(potential_on="blend", temper=True, resampling="multinomial"),
    "DB-SMC-adaptive": dict(potential_on="blend", temper="adaptive"),
    "DB-SMC-adaptive move2": dict(potential_on="blend", temper="adaptive", moves=2),
}
SMC_VARIANTS_QUICK = ("DB-SMC-tempered", "DB-SMC-adaptive move2")


def smc_section(quick, base, rewards, alpha_refs, schedule, n, dim, e_base, model_sets) -> list[dict]:
    """DB-SMC (the blend as proposal, corrected toward the exact tilt) with N particles against plain
    DB, the strong-tilt variants (:data:`SMC_VARIANTS`: resampling schemes, adaptive tempering,
    resample-move), and the paper's other inference-time baselines on the base model (CoDe: soft
    blockwise best-of-N; RGG: reward-gradient guidance), over the report's grid: weighted relative
    error, wall time per run and the cost in denoise calls (blend + base) per kept sample.
    ``model_sets``: ``{"exact" | "lora": (base eps model, basis eps models, particle counts)}``; on
    LoRA bases the SMC corrects toward the tilt of the LoRAs' own base (the MLP), the error is against
    the true mixture's, as for every LoRA row."""
    g = torch.Generator().manual_seed(1)
    rows = []
    variants = {k: v for k, v in SMC_VARIANTS.items() if not quick or k in SMC_VARIANTS_QUICK}
    for m in (2, 3):
        grid = simplex(m, 0.25 if m == 2 else 1 / 3)
        if quick:
            grid = grid[:: max(1, len(grid) // 3)]
        for w in grid:
            for lam in LAMBDAS:
                wt, r_sub, a_sub = list(w), rewards[:m], alpha_refs[:m]
                alpha = sum(x * a for x, a in zip(wt, a_sub)) / lam
                target = tilt(base, r_sub, wt, alpha)
                e_target = [expected_reward(target, r) for r in r_sub]
                runs = []
                for kind, (eps_base, eps_bases, counts) in model_sets.items():
                    runs.append((kind, "DB", None, {}, lambda st, eb=eps_base, ebs=eps_bases: sample_db(
                        wt, a_sub, lam, eb, ebs[:m], schedule, n, dim, g)))
                    runs += [(kind, "DB-SMC", k, {}, lambda st, k=k, eb=eps_base, ebs=eps_bases: sample_db_smc(
                        wt, a_sub, lam, eb, ebs[:m], schedule, n, dim, g, r_sub, particles=k, stats=st))
                        for k in counts]
                    for method, options in variants.items():
                        if kind == "exact" or method == "DB-SMC-adaptive move2":
                            runs.append((kind, method, VARIANT_PARTICLES, options,
                                         lambda st, o=options, eb=eps_base, ebs=eps_bases: sample_db_smc(
                                             wt, a_sub, lam, eb, ebs[:m], schedule, n, dim, g, r_sub,
                                             particles=VARIANT_PARTICLES, stats=st, **o)))
                    if kind == "exact":  # the paper's other inference-time baselines: base model + rewards only
                        runs.append((kind, "CoDe", CODE_CANDIDATES, {}, lambda st, eb=eps_base: sample_code(
                            wt, a_sub, lam, eb, schedule, n, dim, g, r_sub, candidates=CODE_CANDIDATES)))
                        runs.append((kind, "RGG", None, {}, lambda st, eb=eps_base: sample_rgg(
                            wt, a_sub, lam, eb, schedule, n, dim, g, r_sub)))
                for kind, method, k, options, fn in runs:
                    stats = {}
                    t0 = time.perf_counter()
                    xs = fn(stats)
                    seconds = time.perf_counter() - t0
                    e = [float(r(xs).mean()) for r in r_sub]
                    rows.append({"method": method, "bases": kind, "lambda": lam, "w": wt, "particles": k,
                                 "weighted_rel_error": weighted_error(wt, e, e_target, e_base[:m]), "seconds": seconds,
                                 "denoise_per_sample": stats.get("denoise_per_sample"),
                                 "lineages": stats.get("lineages"),
                                 "options": {key: str(v) for key, v in options.items()},
                                 "m": m, "E_r": e, "E_target": e_target})
        print(f"[validation] DB-SMC m={m} done", flush=True)
    return rows


#: the cells where DB-SMC stays far from the target at N <= 128 (docs/validation.md): lambda = 4 in the
#: middle of the simplex; error against particles and moves there
HARD_CELLS = [([0.5, 0.5], 4.0), ([1 / 3, 1 / 3, 1 / 3], 4.0)]
HARD_PARTICLES = (8, 32, 64, 256, 1024)
HARD_MOVES = (0, 2, 8)


def hard_cells_section(base, rewards, alpha_refs, schedule, n, dim, e_base, exact_base, exact_bases) -> list[dict]:
    """DB-SMC with the blend's potential, adaptive tempering and k pCN moves per resampling at
    :data:`HARD_CELLS`, for every particle count and move count: the error, the cost in denoise calls
    per kept sample and the lineages left per group."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for w, lam in HARD_CELLS:
        m = len(w)
        r_sub, a_sub = rewards[:m], alpha_refs[:m]
        target = tilt(base, r_sub, w, sum(x * a for x, a in zip(w, a_sub)) / lam)
        e_target = [expected_reward(target, r) for r in r_sub]
        db = sample_db(w, a_sub, lam, exact_base, exact_bases[:m], schedule, n, dim, g)
        rows.append({"method": "DB", "w": w, "lambda": lam, "particles": None, "moves": None,
                     "weighted_rel_error": weighted_error(w, [float(r(db).mean()) for r in r_sub], e_target, e_base[:m]),
                     "denoise_per_sample": schedule.num_steps, "lineages": None})
        for moves in HARD_MOVES:
            for k in HARD_PARTICLES:
                stats = {}
                t0 = time.perf_counter()
                xs = sample_db_smc(w, a_sub, lam, exact_base, exact_bases[:m], schedule, n, dim, g, r_sub, particles=k,
                                   potential_on="blend", temper="adaptive", moves=moves, stats=stats)
                rows.append({"method": f"DB-SMC-adaptive move{moves}", "w": w, "lambda": lam, "particles": k,
                             "moves": moves, "weighted_rel_error": weighted_error(
                                 w, [float(r(xs).mean()) for r in r_sub], e_target, e_base[:m]),
                             "denoise_per_sample": stats["denoise_per_sample"], "lineages": stats["lineages"],
                             "seconds": time.perf_counter() - t0})
        print(f"[validation] hard cell w={[round(x, 2) for x in w]} done", flush=True)
    return rows


def write_hard_cells(rows, out: Path) -> None:
    """``smc_hard_cells.md`` (error / denoise calls per sample / lineages) and ``smc_hard_cells.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys((tuple(round(x, 3) for x in r["w"]), r["lambda"]) for r in rows))
    lines = ["| w | λ | moves | " + " | ".join(f"N={k}" for k in HARD_PARTICLES) + " | DB |",
             "|---|---|---|" + "---|" * (len(HARD_PARTICLES) + 1)]
    fig, axes = plt.subplots(1, len(cells), figsize=(5.5 * len(cells), 4), sharey=True, squeeze=False)
    for ax, (w, lam) in zip(axes[0], cells):
        here = [r for r in rows if tuple(round(x, 3) for x in r["w"]) == w and r["lambda"] == lam]
        db = next(r["weighted_rel_error"] for r in here if r["method"] == "DB")
        for j, moves in enumerate(HARD_MOVES):
            cell = {r["particles"]: r for r in here if r["moves"] == moves}
            lines.append(f"| {w} | {lam:g} | {moves} | " + " | ".join(
                f"{cell[k]['weighted_rel_error']:.3f} ({cell[k]['denoise_per_sample']}, {cell[k]['lineages']:.0f})"
                for k in HARD_PARTICLES) + f" | {db:.3f} |")
            ax.plot(HARD_PARTICLES, [cell[k]["weighted_rel_error"] for k in HARD_PARTICLES], "-o", color=f"C{j}",
                    label=f"{moves} moves per resampling")
        ax.axhline(db, color="k", ls="--", label="DB")
        ax.axhline(0.08, color="r", ls=":", label="goal 0.08")
        ax.set_xscale("log")
        ax.set_xlabel("particles per group N")
        ax.set_title(f"w = {w}, λ = {lam:g}")
    axes[0][0].set_ylabel("weighted relative error")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("DB-SMC (adaptive tempering) where the tilt is strong: error vs particles and moves")
    fig.tight_layout()
    fig.savefig(out / "smc_hard_cells.png", dpi=110)
    plt.close(fig)
    lines.append("")
    lines.append("Cells: weighted relative error (denoise calls per kept sample, lineages left per group).")
    (out / "smc_hard_cells.md").write_text("\n".join(lines) + "\n")


DOCS = ROOT / "docs" / "validation.md"
DOCS_BEGIN, DOCS_END = "<!-- smc-table:begin (bench/validation.py --docs) -->", "<!-- smc-table:end -->"
TRAINING_BEGIN, TRAINING_END = "<!-- training-table:begin (bench/validation.py --docs) -->", "<!-- training-table:end -->"


def write_smc_outputs(rows, out: Path, docs: bool) -> None:
    """``smc.md`` and the plots from the DB-SMC rows; with ``docs`` the tables replace the block
    between the markers of docs/validation.md (written atomically)."""
    lines = smc_table(rows)
    (out / "smc.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_smc(rows, out)
    if docs:
        write_docs_block(DOCS_BEGIN, DOCS_END, lines)
        print(f"wrote the DB-SMC tables into {DOCS}")


def write_docs_block(begin: str, end: str, lines: list[str]) -> None:
    """Replace the block between the markers ``begin`` and ``end`` of docs/validation.md (atomically)."""
    text = DOCS.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"--docs: {DOCS} has no block {begin} ... {end} to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    tmp = DOCS.with_suffix(".md.tmp")
    tmp.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)
    tmp.replace(DOCS)


def smc_table(rows) -> list[str]:
    import statistics

    lines = ["| bases | method | particles N | runs | median weighted rel. error | worst | worst at λ ≤ 2 | "
             "median s per run | denoise calls per sample |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["bases"], r["method"], r["particles"]) for r in rows))

    def errors(key, lam=None):
        return [r["weighted_rel_error"] for r in rows if (r["bases"], r["method"], r["particles"]) == key
                and (lam is None or r["lambda"] == lam)]

    for key in keys:
        errs = errors(key)
        seconds = statistics.median(r["seconds"] for r in rows if (r["bases"], r["method"], r["particles"]) == key)
        moderate = [r["weighted_rel_error"] for r in rows
                    if (r["bases"], r["method"], r["particles"]) == key and r["lambda"] <= 2]
        calls = [r.get("denoise_per_sample") for r in rows if (r["bases"], r["method"], r["particles"]) == key]
        calls = [c for c in calls if c is not None]
        cost = f"{statistics.median(calls):.0f}" if calls else "–"
        lines.append(f"| {key[0]} | {key[1]} | {key[2] or '–'} | {len(errs)} | {statistics.median(errs):.3f} | "
                     f"{max(errs):.3f} | {max(moderate, default=float('nan')):.3f} | {seconds:.2f} | {cost} |")
    lines += ["", "| λ | " + " | ".join(f"{b} {m}{f' N={k}' if k else ''}" for b, m, k in keys) + " |",
              "|---|" + "---|" * len(keys)]
    for lam in LAMBDAS:
        lines.append(f"| {lam:g} | " + " | ".join(f"{statistics.median(errors(key, lam)):.3f}" for key in keys) + " |")
    return lines


#: the mixture LoRAs: rank 16, lr 3e-3 decayed by a cosine to 10 %, 512 chains x 50 steps per update
#: the mixture LoRAs: rank 64, lr 6e-3 decayed by a cosine to 10 %, 50-step chains.  What sets their
#: fidelity is the number of updates (docs/validation.md: implied/stated alpha of r1 1.18 after 150,
#: 1.09 after 400, 1.03 after 1000-1500; a 4x larger batch does not replace updates), so the full run
#: takes 1000 updates of 256 chains and --quick 150 of 256 (512 read the same: gain 0.978-0.999, at 2.7x the time).
MIXTURE_SETTINGS = {"rank": 64, "lora.alpha": 64.0, "lr": 6e-3, "lr_schedule": "cosine"}
MIXTURE_ITERATIONS = {True: 150, False: 1000}
MIXTURE_BATCH = {True: 256, False: 256}


#: Adjoint Matching: 64 chains per update (an eighth of DPOK's 512 on the Gaussian cases), the mixture
#: LoRAs with DPOK's adapter and learning rate
AM = {"algorithm.name": "adjoint_matching"}
AM_BATCH = 64
AM_MIXTURE_ITERATIONS = {True: 150, False: 400}


def fidelity_rows(quick: bool) -> list[dict]:
    """Gaussian base: linear rewards at reward scales 100x apart, and a quadratic reward; DPOK on its
    training chain (target ``chain``), Adjoint Matching read by every sampler (target ``score``)."""
    s = FidelitySettings(iterations=100, steps=20, eval_samples=8192) if quick else FidelitySettings(iterations=300)
    am = FidelitySettings(iterations=100 if quick else 300, batch=AM_BATCH, steps=s.steps, eval_samples=s.eval_samples)
    mlp = fit_gaussian_base(steps=s.base_fit_steps)
    rows = []
    for settings, samplers, overrides in ((s, ("ddpm",), {}), (am, SAMPLERS, AM)):
        rows += linear_rows(mlp, 0.2, settings, samplers=samplers, **overrides)
        rows += linear_rows(mlp, 20.0, settings, samplers=samplers, **overrides)
        rows += quadratic_rows(mlp, settings, samplers=samplers, **overrides)
    return rows


#: the samplers the AM mixture LoRAs are read by (flow_euler is DDIM exactly: the Gaussian rows show it)
MIXTURE_SAMPLERS = ("ddpm", "ddim", "flow_ancestral")


def mixture_score_rows(i, model, mlp, base: GMM, reward, n_eval: int, implied: bool = True) -> list[dict]:
    """One Adjoint Matching mixture LoRA read by the samplers of ``MIXTURE_SAMPLERS`` against the exact
    tilted mixture's score through the same sampler (target ``score``; the MLP's distillation error of
    the mixture is in it).  The target gain is measured on ``2 n_eval`` chains of common random numbers
    (the mixture's mode choice makes it noisy: 2 % apart between 4 096 and 16 384 chains).  With
    ``implied`` (the full run), the implied alpha: the one whose exact tilt moves the reward as much,
    by bisection in log alpha within a factor 10 either way on ``n_eval / 4`` chains -- an indication
    only: for these mode-seeking rewards the gain is nearly flat in alpha, a 1 % shortfall in gain
    reads as tens of percent in alpha (docs/adjoint_matching.md)."""
    stated, chain = model.stated_alpha_ref, model.chain
    merged = merged_copy(model)  # the same function at the base MLP's cost
    rows = []
    for sampler in MIXTURE_SAMPLERS:
        g = torch.Generator().manual_seed(100 + i)
        x_T = torch.randn(n_eval, base.dim, generator=g)
        state = g.get_state()
        with torch.no_grad():
            x = sample_chain(lambda x, t: merged(x, t), chain, sampler, x_T, g).double()
            g.set_state(state)
            x_base = sample_chain(lambda x, t: mlp(x, t), chain, sampler, x_T, g).double()
        reached = float((reward(x) - reward(x_base)).mean())

        def gain_at(alpha, sampler=sampler, n=n_eval // 4):
            return score_gain(chain, sampler, base, tilt(base, [reward], [1.0], alpha), reward, n, 200 + i)

        implied_alpha = None
        if implied:
            lo, hi = stated / 10, stated * 10
            for _ in range(16):
                mid = (lo * hi) ** 0.5
                lo, hi = (mid, hi) if gain_at(mid) > reached else (lo, mid)
            implied_alpha = (lo * hi) ** 0.5
        rows.append({"case": f"mixture r{i + 1}", "algorithm": "adjoint_matching", "sampler": sampler,
                     "target": "score", "alpha_ref": stated, "implied_alpha": implied_alpha,
                     "target_gain": gain_at(stated, n=2 * n_eval), "reached_gain": reached,
                     "chain_steps": chain.num_steps})
    return rows


def mixture_row(i, model, mlp, base: GMM, reward, base_samples: torch.Tensor, g) -> dict:
    """One mixture LoRA against the exact tilt *of its own base* (the MLP it was trained on) at the
    alpha its file states, both sampled with the chain the LoRA was trained on (``model.chain``: the
    promise holds for that chain): ``E_tilt[r] = E_base[r e^{r/alpha}] / E_base[e^{r/alpha}]`` over
    ``base_samples`` of the MLP base on that chain (self-normalised; its effective sample size is
    reported).  The implied alpha inverts the gain; ``implied_alpha_2se`` is its interval for the
    gain +- 2 standard errors (the gain is flat in alpha for mode-seeking rewards, so even small
    Monte-Carlo errors move it).  The tilt of the true mixture (``target_gain_mixture``) adds the
    MLP's distillation error on top."""
    stated, chain = model.stated_alpha_ref, model.chain
    n = base_samples.shape[0]
    merged = merged_copy(model)  # the same function at the base MLP's cost
    r_lora = reward(sample(mlp_model(merged, chain), chain, n, base_samples.shape[1], g))
    r_base = reward(base_samples)
    reached = float(r_lora.mean() - r_base.mean())
    w = torch.softmax(r_base / stated, 0)
    # reached vs target gain share r_base's mean; what differs: the LoRA's sample mean and the
    # self-normalised importance estimate of E_tilt[r] (delta method)
    se = float((r_lora.var() / n + (w**2 * (r_base - (w * r_base).sum()) ** 2).sum()) ** 0.5)

    def gain_at(alpha):
        w = torch.softmax(r_base / alpha, 0)
        return float((w * r_base).sum() - r_base.mean())

    def implied(gain):
        lo, hi = stated / 100, stated * 100  # the gain falls as alpha grows
        for _ in range(80):
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if gain_at(mid) > gain else (lo, mid)
        return (lo * hi) ** 0.5

    e_mix = expected_reward(base, reward)
    with torch.no_grad():
        x_T = torch.randn(16384, base_samples.shape[1], generator=g)
        from_path = path_alpha(lambda x, t: merged(x, t), lambda x, t: mlp(x, t), chain, reward, x_T, g)
    return {"case": f"mixture r{i + 1}", "algorithm": "dpok", "sampler": "ddpm", "target": "chain",
            "alpha_ref": stated, "implied_alpha": implied(reached),
            "implied_alpha_2se": [implied(reached + 2 * se), implied(reached - 2 * se)], "gain_se": se,
            "implied_alpha_path": from_path, "target_gain": gain_at(stated), "reached_gain": reached,
            "importance_ess": float(1 / (w**2).sum()), "chain_steps": chain.num_steps,
            "target_gain_mixture": expected_reward(tilt(base, [reward], [1.0], stated), reward) - e_mix}


def training_table(rows) -> list[str]:
    lines = ["| case | algorithm | sampler | target | alpha_ref (file) | implied alpha | implied / stated (gain ± 2 SE) | "
             "target gain | reached gain | fraction |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["implied_alpha"] is None:  # not measured (the AM mixture rows of a quick run)
            lines.append(f"| {r['case']} | {r['algorithm']} | {r['sampler']} | {r['target']} | {r['alpha_ref']:.4g} | "
                         f"– | – | {r['target_gain']:.4g} | {r['reached_gain']:.4g} | "
                         f"{r['reached_gain'] / r['target_gain']:.3f} |")
            continue
        ratio = f"{r['implied_alpha'] / r['alpha_ref']:.3f}"
        if "implied_alpha_2se" in r:
            lo, hi = (a / r["alpha_ref"] for a in r["implied_alpha_2se"])
            ratio += f" ({lo:.3f}–{hi:.3f})"
        lines.append(f"| {r['case']} | {r['algorithm']} | {r['sampler']} | {r['target']} | {r['alpha_ref']:.4g} | "
                     f"{r['implied_alpha']:.4g} | {ratio} | "
                     f"{r['target_gain']:.4g} | {r['reached_gain']:.4g} | {r['reached_gain'] / r['target_gain']:.3f} |")
    return lines


def print_training(rows) -> None:
    print("\n".join(training_table(rows)), flush=True)


def metrics(m, w, lam, name, e, e_target, e_base, mmd) -> dict:
    """Per-reward errors relative to that reward's alignment gain, for the rewards being aligned
    (w_i > 0; a reward with w_i = 0 may barely move, making its ratio meaningless), and the error
    of the weighted objective sum_i w_i E[r_i] relative to its gain."""
    gains = [b - c for b, c in zip(e_target, e_base)]
    rel = [abs(a - b) / abs(gn) for a, b, gn, wi in zip(e, e_target, gains, w) if wi > 0]
    frac = [(a - c) / gn for a, c, gn, wi in zip(e, e_base, gains, w) if wi > 0]
    weighted_gain = sum(wi * gn for wi, gn in zip(w, gains))
    weighted_err = abs(sum(wi * (a - b) for wi, a, b in zip(w, e, e_target))) / abs(weighted_gain)
    return {"m": m, "w": list(w), "kl_scale": lam, "method": name, "E_r": e, "E_target": e_target, "E_base": e_base,
            "rel_err": rel, "gain_fraction": frac, "weighted_rel_err": weighted_err, "mmd2": mmd}


def write_report(rows, out: Path, seconds: float) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["# Diffusion Blend vs. the exact target (Gaussian mixture in R^8)", "",
             f"{len(rows)} method runs in {seconds:.0f} s. Relative error of E[r_i] = |E_m[r_i] - E_*[r_i]| / "
             "|E_*[r_i] - E_base[r_i]| over the rewards with w_i > 0; weighted = the same for sum_i w_i r_i; "
             "gain fraction = (E_m - E_base) / (E_* - E_base).", "",
             "| method | runs | worst rel. error E[r_i] | median | worst weighted rel. error | median weighted | median gain fraction | median MMD² |",
             "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name in methods:
        rs = [r for r in rows if r["method"] == name]
        errs = sorted(e for r in rs for e in r["rel_err"])
        gains = sorted(x for r in rs for x in r["gain_fraction"] if x == x)
        mmds = sorted(r["mmd2"] for r in rs)
        werr = sorted(r["weighted_rel_err"] for r in rs)
        summary[name] = {"worst": errs[-1], "median": errs[len(errs) // 2], "worst_weighted": werr[-1],
                         "median_weighted": werr[len(werr) // 2]}
        lines.append(f"| {name} | {len(rs)} | {errs[-1]:.3f} | {errs[len(errs) // 2]:.3f} | {werr[-1]:.3f} | "
                     f"{werr[len(werr) // 2]:.3f} | {gains[len(gains) // 2]:.3f} | {mmds[len(mmds) // 2]:.4f} |")
    lines += ["", "## By KL scale (exact bases: the blend's own error)", "", "| kl_scale | DB worst rel. error | DB median | DB-LS worst |", "|---|---|---|---|"]
    for lam in LAMBDAS:
        db = sorted(e for r in rows if r["method"] == "DB (exact bases)" and r["kl_scale"] == lam for e in r["rel_err"])
        ls = sorted(e for r in rows if r["method"] == "DB-LS (exact bases)" and r["kl_scale"] == lam for e in r["rel_err"])
        lines.append(f"| {lam} | {db[-1]:.3f} | {db[len(db) // 2]:.3f} | {ls[-1]:.3f} |" if ls else
                     f"| {lam} | {db[-1]:.3f} | {db[len(db) // 2]:.3f} | n/a (negative coefficients) |")
    lines += ["", "## All runs", "", "| m | w | λ | method | E[r] | E*[r] | rel. error | MMD² |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['m']} | {', '.join(f'{x:.2f}' for x in r['w'])} | {r['kl_scale']} | {r['method']} | "
                     f"{', '.join(f'{x:.3f}' for x in r['E_r'])} | {', '.join(f'{x:.3f}' for x in r['E_target'])} | "
                     f"{', '.join(f'{x:.3f}' for x in r['rel_err'])} | {r['mmd2']:.4f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines[:6 + len(methods)]))


def plot_pareto(rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LAMBDAS), figsize=(4 * len(LAMBDAS), 4), sharey=True)
    for ax, lam in zip(axes, LAMBDAS):
        sel = [r for r in rows if r["m"] == 2 and r["kl_scale"] == lam]
        exact = sorted((r["w"][0], r["E_target"]) for r in sel if r["method"] == "DB (exact bases)")
        ax.plot([e[1][0] for e in exact], [e[1][1] for e in exact], "k-o", label="exact target", lw=2)
        for name, style in (("DB (exact bases)", "C0--s"), ("DB (LoRA)", "C1--^"), ("RS merge (LoRA)", "C2:v"),
                            ("DB-LS (exact bases)", "C3-.x"), ("MORL oracle (LoRA)", "C4*")):
            pts = sorted((r["w"][0], r["E_r"]) for r in sel if r["method"] == name)
            if pts:
                ax.plot([p[1][0] for p in pts], [p[1][1] for p in pts], style, label=name, ms=6)
        ax.set_title(f"kl_scale λ = {lam}")
        ax.set_xlabel("E[r1]")
    axes[0].set_ylabel("E[r2]")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Pareto fronts, m = 2 (w1 from 0 to 1)")
    fig.tight_layout()
    fig.savefig(out / "pareto_m2.png", dpi=110)
    plt.close(fig)


def plot_smc(rows, out: Path) -> None:
    """``smc_error_vs_n.png``: median weighted error against the particle count, one line per λ (DB's
    error dashed in the same colour), exact and LoRA bases; ``smc_fronts_m2.png``: the m = 2 fronts of
    the exact target, DB, DB-SMC (largest N), CoDe and RGG."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["bases"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        counts = sorted({r["particles"] for r in rows if r["bases"] == kind and r["method"] == "DB-SMC"})
        for j, lam in enumerate(LAMBDAS):
            def med(method, k=None):
                errs = [r["weighted_rel_error"] for r in rows if r["bases"] == kind and r["method"] == method
                        and r["lambda"] == lam and (k is None or r["particles"] == k)]
                return statistics.median(errs) if errs else float("nan")

            ax.plot(counts, [med("DB-SMC", k) for k in counts], "-o", color=f"C{j}", label=f"DB-SMC λ = {lam:g}")
            ax.axhline(med("DB"), color=f"C{j}", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("particles N")
        ax.set_title(f"{kind} bases (dashed: DB without correction)")
    axes[0][0].set_ylabel("median weighted relative error")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "smc_error_vs_n.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(LAMBDAS), figsize=(4 * len(LAMBDAS), 4), squeeze=False)
    largest = {kind: max((r["particles"] for r in rows if r["bases"] == kind and r["method"] == "DB-SMC"),
                         default=None) for kind in kinds}
    for ax, lam in zip(axes[0], LAMBDAS):
        sel = [r for r in rows if r.get("m") == 2 and r["lambda"] == lam]
        target = sorted((r["w"][0], r["E_target"]) for r in sel if r["method"] == "DB" and r["bases"] == "exact")
        ax.plot([t[1][0] for t in target], [t[1][1] for t in target], "k-o", lw=2, label="exact target")
        styles = [("exact", "DB", None, "C0--s"), ("exact", "DB-SMC", largest.get("exact"), "C3-D"),
                  ("exact", "CoDe", CODE_CANDIDATES, "C2:v"), ("exact", "RGG", None, "C4-.x"),
                  ("lora", "DB", None, "C1--^"), ("lora", "DB-SMC", largest.get("lora"), "C5-P")]
        for kind, method, k, style in styles:
            pts = sorted((r["w"][0], r["E_r"]) for r in sel
                         if r["bases"] == kind and r["method"] == method and r["particles"] == k)
            if pts:
                label = f"{method}{f' N={k}' if method == 'DB-SMC' else ''} ({kind})"
                ax.plot([p[1][0] for p in pts], [p[1][1] for p in pts], style, ms=5, label=label)
        ax.set_title(f"λ = {lam:g}")
        ax.set_xlabel("E[r1]")
    axes[0][0].set_ylabel("E[r2]")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle("m = 2 fronts with DB-SMC (w1 from 0 to 1)")
    fig.tight_layout()
    fig.savefig(out / "smc_fronts_m2.png", dpi=110)
    plt.close(fig)


def plot_scatter(out: Path, _schedule) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, rewards, alpha_refs = problem(2)
    schedule = DDIMSchedule.stable_diffusion(100, steps_offset=0)
    g = torch.Generator().manual_seed(5)
    exact_base = exact_model(base, schedule)
    bases = [exact_model(tilt(base, [r], [1.0], a), schedule) for r, a in zip(rewards[:2], alpha_refs[:2])]
    cases = [((0.5, 0.5), 0.5), ((0.5, 0.5), 1.0), ((0.5, 0.5), 2.0), ((0.8, 0.2), 1.0)]
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 4), sharex=True, sharey=True)
    for ax, (w, lam) in zip(axes, cases):
        alpha = sum(x * a for x, a in zip(w, alpha_refs[:2])) / lam
        target = tilt(base, rewards[:2], list(w), alpha)
        ts = target.sample(1500, g)
        db = sample_db(list(w), alpha_refs[:2], lam, exact_base, bases, schedule, 1500, 2, g)
        ax.scatter(ts[:, 0], ts[:, 1], s=3, alpha=0.4, label="exact target")
        ax.scatter(db[:, 0], db[:, 1], s=3, alpha=0.4, label="Diffusion Blend")
        ax.set_title(f"w = {w}, λ = {lam}")
    axes[0].legend(markerscale=4)
    fig.tight_layout()
    fig.savefig(out / "scatter_2d.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
