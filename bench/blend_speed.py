"""Benchmark: the cost of Diffusion Blend against plain sampling, measured side by side in one run.

On the tiny SD1.5 base at 256x256 (32x32 latent), 10 euler steps, CFG 7 (batch 2 = cond + uncond),
for m = 1, 2, 4, 8 basis LoRAs:

* ``exact / (k x plain)``: k = number of non-zero affine coefficients (m+1 at kl_scale 0.5, m at 1);
  1.0 means no overhead beyond the unavoidable evaluations;
  with merged copies of the adapted weights swapped in (the CPU's default) and in the hooks;
* ``sequential / (k x plain)``, ``merged / plain``, ``stochastic / plain``;
* peak RSS of a process that blends minus one that samples plainly, against the LoRA files' size,
  and against the paper's approach of holding m full UNet copies -- with the CPU's default of
  merged copies of the adapted weights swapped in (``DIFFUSION_BLEND_SWAP_MB``), and without
  (``DIFFUSION_BLEND_SWAP_MB=0``: the LoRA factors alone).

``--host diffusers`` times the same blends on the diffusers host (``diffusion_blend.diffusers_host``:
the tiny SD1.5 pipeline of the same weights, Euler, the prompt encoded once) and prints its table
beside ComfyUI's, both measured in this run.

    python bench/blend_speed.py [--quick] [--host comfyui|diffusers] [--out out/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import tiny_fixtures  # noqa: E402

COMFY_DIR = Path(os.environ.get("COMFYUI_DIR") or ROOT / ".cache" / "comfyui")
STEPS, CFG, SIZE = 10, 7.0, 256
MEMORY_STEPS, MEMORY_REPEATS = 3, 3


def load(lora_dir: Path):
    tiny_fixtures.comfy_on_path(COMFY_DIR)
    import comfy.sd
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(lora_dir))
    base = tiny_fixtures.build_tiny_base(COMFY_DIR)
    model, clip = comfy.sd.load_checkpoint_guess_config(str(base["checkpoint"]), output_vae=False)[:2]
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return model, pos, neg


def make_loras(lora_dir: Path, m_max: int) -> list[Path]:
    base = tiny_fixtures.build_tiny_base(COMFY_DIR)
    unet = None
    paths = []
    for i in range(m_max):
        p = lora_dir / f"bench_{i}.safetensors"
        if not p.exists():
            unet = unet or tiny_fixtures.load_diffusers_unet(base["diffusers"])
            tiny_fixtures.make_basis_lora(unet, p, seed=500 + i)
        paths.append(p)
    return paths


def blended(model, paths, kl_scale, mode):
    """The node's model, with a swap pool of its own at the node's default budget: the configs
    timed side by side alternate, and a shared pool would make each evict the others' copies."""
    import comfy.patcher_extension

    from diffusion_blend.nodes.blend_nodes import add_basis, blend_model
    from diffusion_blend.nodes.comfy_wrapper import WRAPPER_KEY

    basis = None
    for p in paths:
        basis = add_basis(p.name, 1.0, 0.0, basis)
    patched = blend_model(model, basis, kl_scale, True, mode)
    for wrapper in patched.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        wrapper.bank.swap_budget_bytes = wrapper.bank.swap_budget_bytes  # a pool of its own
    return patched


def in_the_hooks(model):
    """``model`` with no merged copies swapped in (swap budget 0): every delta added per call."""
    import comfy.patcher_extension

    from diffusion_blend.nodes.comfy_wrapper import WRAPPER_KEY

    for wrapper in model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        wrapper.bank.swap_budget_bytes = 0
    return model


def sample(model, pos, neg, seed=0, steps=STEPS):
    import comfy.sample
    import torch

    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, CFG, "euler", "normal", pos, neg, latent, disable_pbar=True)


def diffusers_load():
    """The tiny SD1.5 as a diffusers pipeline (Euler, as ComfyUI's ``euler``) and its prompt embeddings."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    base = tiny_fixtures.build_tiny_base(COMFY_DIR)
    pipe = StableDiffusionPipeline.from_pretrained(base["diffusers"], torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pos, neg = pipe.encode_prompt("a photo of a cat", "cpu", 1, True, "")
    return pipe, pos, neg


def diffusers_sample(pipe, pos, neg, seed=0, steps=STEPS):
    import torch

    with torch.no_grad():
        return pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=steps, guidance_scale=CFG,
                    height=SIZE, width=SIZE, output_type="latent", generator=torch.Generator().manual_seed(seed)).images


def diffusers_configs(pipe, paths):
    """``{name: (configure, restore)}`` of the timed blends on one DiffusionBlend: each config sets the
    blend before its run; the hooks variant turns the swapped copies off for its run only."""
    from diffusion_blend.blend.runtime import SwapPool
    from diffusion_blend.diffusers_host import DiffusionBlend

    blend = DiffusionBlend(pipe, paths, [1.0] * len(paths), 0.5)
    pool = blend.bank.swap_pool
    budget = pool.budget_bytes if pool is not None else 0
    own_pool = blend.bank.swap_pool = SwapPool(budget) if budget else None  # a pool of its own, as the ComfyUI rows

    def config(kl_scale, mode, hooks=False):
        def set_up():
            blend.configure(kl_scale=kl_scale, mode=mode)
            if hooks:
                blend.bank.swap_pool = None

        def tear_down():
            blend.bank.swap_pool = own_pool
        return set_up, tear_down

    return blend, {"exact_05": config(0.5, "exact"), "exact_05_hooks": config(0.5, "exact", hooks=True),
                   "exact_1": config(1.0, "exact"), "sequential_05": config(0.5, "sequential"),
                   "merged_05": config(0.5, "merged"), "stochastic_05": config(0.5, "stochastic")}


def diffusers_rows(ms, paths, repeats) -> list[dict]:
    """The speed table on the diffusers host (plain = the pipeline without a blend)."""
    pipe, pos, neg = diffusers_load()
    diffusers_sample(pipe, pos, neg, steps=1)
    rows = []
    for m in ms:
        blend, configs = diffusers_configs(pipe, paths[:m])
        blend.remove()
        best = {name: float("inf") for name in ("plain", *configs)}
        for round_ in range(repeats + 1):  # round 0 warms up: factors cast and cached, copies made
            for name in best:
                if name == "plain":
                    t = timed(lambda: diffusers_sample(pipe, pos, neg), 1)
                else:
                    set_up, tear_down = configs[name]
                    blend.install()
                    set_up()
                    t = timed(lambda: diffusers_sample(pipe, pos, neg), 1)
                    tear_down()
                    blend.remove()
                if round_:
                    best[name] = min(best[name], t)
        rows.append(_ratios(m, best))
    return rows


def _ratios(m, best) -> dict:
    plain = best["plain"]
    return {"m": m, "plain_s": plain,
            "exact_05_ratio": best["exact_05"] / ((m + 1) * plain),
            "exact_05_hooks_ratio": best["exact_05_hooks"] / ((m + 1) * plain),
            "exact_1_ratio": best["exact_1"] / (m * plain),
            "sequential_05_ratio": best["sequential_05"] / ((m + 1) * plain),
            "merged_ratio": best["merged_05"] / plain,
            "stochastic_ratio": best["stochastic_05"] / plain}


def _print_row(row) -> None:
    print(f"| {row['m']} | {row['plain_s']:.3f} | {row['exact_05_ratio']:.3f} | {row['exact_05_hooks_ratio']:.3f} | "
          f"{row['exact_1_ratio']:.3f} | {row['sequential_05_ratio']:.3f} | {row['merged_ratio']:.3f} | "
          f"{row['stochastic_ratio']:.3f} |", flush=True)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(mode: str, m: int, lora_dir: str) -> None:
    """Run one configuration; print RSS before sampling and the peak RSS during sampling (kB).

    The high-water mark is reset (``/proc/self/clear_refs``) after loading and a 1-step warm-up,
    so the peak is that of sampling alone, with the model (and LoRA factors) resident.  Every step
    reaches the same peak, so 3 steps suffice.
    """
    import torch

    torch.set_num_threads(1)
    paths = sorted(Path(lora_dir).glob("bench_*.safetensors"))[:m]
    model, pos, neg = load(Path(lora_dir))
    if mode != "plain":
        model = blended(model, paths, 0.5, mode)
    sample(model, pos, neg, steps=1)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    sample(model, pos, neg, steps=MEMORY_STEPS)
    print(json.dumps({"before_kb": before, "peak_kb": _status_kb("VmHWM")}))


def diffusers_memory_child(mode: str, m: int, lora_dir: str) -> None:
    """:func:`memory_child` on the diffusers host."""
    import torch

    torch.set_num_threads(1)
    paths = sorted(Path(lora_dir).glob("bench_*.safetensors"))[:m]
    pipe, pos, neg = diffusers_load()
    if mode != "plain":
        from diffusion_blend.diffusers_host import DiffusionBlend

        DiffusionBlend(pipe, paths, [1.0] * len(paths), 0.5, mode=mode)
    diffusers_sample(pipe, pos, neg, steps=1)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    diffusers_sample(pipe, pos, neg, steps=MEMORY_STEPS)
    print(json.dumps({"before_kb": before, "peak_kb": _status_kb("VmHWM")}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="m = 1, 2 only, one repeat")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--memory-only", action="store_true", help="only the memory table (skips the speed rows)")
    ap.add_argument("--ms", default=None, help="numbers of basis LoRAs, comma separated (default 1,2,4,8; --quick 1,2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; --quick 1)")
    ap.add_argument("--host", choices=("comfyui", "diffusers"), default="comfyui",
                    help="diffusers: the diffusers host's rows too, beside ComfyUI's, in this run")
    ap.add_argument("--memory-child", nargs=4, metavar=("HOST", "MODE", "M", "LORA_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        host, mode, m, lora_dir = args.memory_child
        (memory_child if host == "comfyui" else diffusers_memory_child)(mode, int(m), lora_dir)
        return 0

    import torch

    ms = [int(m) for m in args.ms.split(",")] if args.ms else ([1, 2] if args.quick else [1, 2, 4, 8])
    repeats = args.repeats if args.repeats else (1 if args.quick else 3)
    lora_dir = ROOT / ".cache" / "bench-loras"
    lora_dir.mkdir(parents=True, exist_ok=True)
    paths = make_loras(lora_dir, max(ms))
    model, pos, neg = load(lora_dir)
    if not args.memory_only:
        sample(model, pos, neg, steps=1)  # warm-up
    rows = []
    print(f"tiny SD1.5 base, {SIZE}x{SIZE}, {STEPS} euler steps, CFG {CFG}, torch threads {torch.get_num_threads()}")
    print("| m | plain s | exact/(k·plain) λ=0.5 (k=m+1) | same, in the hooks | exact/(k·plain) λ=1 (k=m) | "
          "sequential/(k·plain) λ=0.5 | merged/plain | stochastic/plain |")
    print("|---|---|---|---|---|---|---|---|")
    for m in ([] if args.memory_only else ms):
        sub = paths[:m]
        configs = {
            "exact_05": blended(model, sub, 0.5, "exact"),
            "exact_05_hooks": in_the_hooks(blended(model, sub, 0.5, "exact")),
            "exact_1": blended(model, sub, 1.0, "exact"),
            "sequential_05": blended(model, sub, 0.5, "sequential"),
            "merged_05": blended(model, sub, 0.5, "merged"),
            "stochastic_05": blended(model, sub, 0.5, "stochastic"),
        }
        for patched in configs.values():
            sample(patched, pos, neg, steps=1)  # warm-up: factors cast and cached, copies made
        # interleaved rounds (plain, then every config), the fastest round of each: a drift of the
        # machine's speed during the run then biases no column against another
        runs = {"plain": model, **configs}
        best = {name: float("inf") for name in runs}
        for _ in range(repeats):
            for name, patched in runs.items():
                best[name] = min(best[name], timed(lambda p=patched: sample(p, pos, neg), 1))
        plain = best.pop("plain")
        t = best
        row = _ratios(m, {"plain": plain, **t})
        rows.append(row)
        _print_row(row)
    diffusers_speed = []
    if args.host == "diffusers" and not args.memory_only:
        print("\nthe same on the diffusers host (StableDiffusionPipeline of the same weights, Euler, prompt encoded once):")
        print("| m | plain s | exact/(k·plain) λ=0.5 (k=m+1) | same, in the hooks | exact/(k·plain) λ=1 (k=m) | "
              "sequential/(k·plain) λ=0.5 | merged/plain | stochastic/plain |")
        print("|---|---|---|---|---|---|---|---|")
        for row in diffusers_rows(ms, paths, repeats):
            diffusers_speed.append(row)
            _print_row(row)

    # Memory: separate single-threaded processes, so each peak is its own.
    mem_rows = []
    unet_bytes = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    print("\n| m | k | Σ LoRA MB | blend − plain peak MB: LoRA factors only (SWAP_MB=0) | "
          "bound 1.2·ΣLoRA + (k−1)·act MB | with merged copies swapped in (CPU default) | "
          "m UNet copies MB (paper's code) | copies ÷ LoRA factors held |")
    print("|---|---|---|---|---|---|---|---|")

    def measure(mode, m, swap_mb=None, host="comfyui"):
        """The lowest of a few fresh processes: the allocator's fragmentation only ever adds to a
        peak, so the minimum is the configuration's own."""
        env = dict(os.environ)
        if swap_mb is not None:
            env["DIFFUSION_BLEND_SWAP_MB"] = str(swap_mb)
        runs = []
        for _ in range(1 if args.quick else MEMORY_REPEATS):
            out = subprocess.run([sys.executable, __file__, "--memory-child", host, mode, str(m), str(lora_dir)],
                                 capture_output=True, text=True, check=True, env=env)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        return min(runs, key=lambda r: r["peak_kb"])

    plain = measure("plain", 1)
    act = (plain["peak_kb"] - plain["before_kb"]) * 1024  # activations of one batch of 2
    for m in ms:
        k = m + 1  # kl_scale 0.5: base and m LoRAs
        extra = (measure("exact", m, swap_mb=0)["peak_kb"] - plain["peak_kb"]) * 1024
        extra_swapped = (measure("exact", m)["peak_kb"] - plain["peak_kb"]) * 1024
        lora_bytes = sum(p.stat().st_size for p in paths[:m])
        from diffusion_blend.blend.lora_file import read_lora

        parsed = sum(read_lora(p).num_bytes() for p in paths[:m])  # factors as stored (fp16)
        held = parsed + 2 * parsed  # plus the fp32 copy cast for the CPU forward
        bound = 1.2 * lora_bytes + (k - 1) * act
        copies = m * unet_bytes
        mem_rows.append({"m": m, "k": k, "lora_mb": lora_bytes / 2**20, "extra_mb": extra / 2**20,
                         "bound_mb": bound / 2**20, "extra_swapped_mb": extra_swapped / 2**20,
                         "copies_mb": copies / 2**20, "copies_over_held": copies / held})
        print(f"| {m} | {k} | {lora_bytes / 2**20:.2f} | {extra / 2**20:.1f} | {bound / 2**20:.1f} | "
              f"{extra_swapped / 2**20:.1f} | {copies / 2**20:.0f} | {copies / held:.0f}x |", flush=True)
    print(f"(activations of one plain batch: {act / 2**20:.1f} MB; plain sampling peak {plain['peak_kb'] / 1024:.0f} MB)")
    diffusers_memory = []
    if args.host == "diffusers":
        plain_d = measure("plain", 1, host="diffusers")
        print("\ndiffusers host: blend − plain peak MB, LoRA factors only (SWAP_MB=0) | with merged copies (CPU default)")
        print("| m | Σ LoRA MB | factors only | with merged copies | ComfyUI factors only | ComfyUI with copies |")
        print("|---|---|---|---|---|---|")
        for row in mem_rows:
            m = row["m"]
            extra = (measure("exact", m, swap_mb=0, host="diffusers")["peak_kb"] - plain_d["peak_kb"]) / 1024
            extra_swapped = (measure("exact", m, host="diffusers")["peak_kb"] - plain_d["peak_kb"]) / 1024
            diffusers_memory.append({"m": m, "extra_mb": extra, "extra_swapped_mb": extra_swapped})
            print(f"| {m} | {row['lora_mb']:.2f} | {extra:.1f} | {extra_swapped:.1f} | {row['extra_mb']:.1f} | "
                  f"{row['extra_swapped_mb']:.1f} |", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = out / ("blend_memory.json" if args.memory_only else "blend_speed.json")
    payload = {"speed": rows, "memory": mem_rows}
    if args.host == "diffusers":
        payload["diffusers"] = {"speed": diffusers_speed, "memory": diffusers_memory}
    result.write_text(json.dumps(payload, indent=2))
    if args.memory_only:
        print(f"\nwrote {result}")
        return 0
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label in (("exact_05_ratio", "exact / (k·plain), λ=0.5"), ("exact_1_ratio", "exact / (k·plain), λ=1"),
                           ("sequential_05_ratio", "sequential / (k·plain)"), ("merged_ratio", "merged / plain"),
                           ("stochastic_ratio", "stochastic / plain")):
            ax.plot([r["m"] for r in rows], [r[key] for r in rows], marker="o", label=label)
        ax.axhline(1.10, color="gray", ls="--", lw=1)
        ax.set_xlabel("number of basis LoRAs m")
        ax.set_ylabel("time ratio")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "blend_speed.png", dpi=120)
    except ImportError:
        pass
    print(f"\nwrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
