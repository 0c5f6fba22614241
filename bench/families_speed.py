"""Benchmark: the blend's cost on an SDXL-shaped and a Flux-shaped model, side by side in one run,
and the memory of adapters that are not low-rank.

Models: the random SDXL and Flux-dev of ``scripts/tiny_families.py`` (ComfyUI ``model_base``
classes; Flux is detected by ComfyUI and shrunk after detection) at bench size -- SDXL's layout
with 128 base channels and 2 transformer blocks per attention (~50 M parameters), Flux with
hidden 512 and 4 double + 4 single blocks (~60 M) -- one ``apply_model`` call on a batch of 2
(cond + uncond) at a 32x32 latent (Flux: 256 image tokens).  ``--quick`` uses the test sizes,
where Python overhead per hooked layer, not arithmetic, sets the ratios.  LoRA files come from
ComfyUI's own key map (``scripts/lora_formats.py``): ComfyUI names on every layer, and for Flux the
diffusers names whose q/k/v/proj_mlp are slices of fused weights.

* ``exact/(k·plain)``: k = models the math needs (m = 1 at lambda = 1: k = 1, the LoRA alone;
  m = 2 at lambda = 0.5: k = 3); 1.0 = no overhead beyond the unavoidable forwards;
* ``merged/plain``: one forward with the concatenated low-rank factors;
* dense adapters (LoHa, LoKr, DoRA, full diff): the bank's dense bytes against the file's size.

    python bench/families_speed.py [--quick] [--out out/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import tiny_fixtures  # noqa: E402

COMFY_DIR = Path(os.environ.get("COMFYUI_DIR") or ROOT / ".cache" / "comfyui")
LATENT = 32
SIZES = {False: {"SDXL": {"channels": 128, "depth": 2}, "Flux": {"hidden": 512, "depth": 4}},
         True: {"SDXL": {}, "Flux": {}}}


def _inputs(fam, batch: int = 2):
    import torch

    x, sigma, cond = fam.make_inputs(batch)
    shape = list(x.shape)
    shape[-2:] = [LATENT, LATENT]
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)), sigma, cond


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def blended(base, paths, weights, kl_scale, mode="exact"):
    from diffusion_blend.blend.basis import make_basis
    from diffusion_blend.blend.lora_file import read_lora
    from diffusion_blend.nodes.blend_nodes import DiffusionBlend

    basis = tuple(make_basis(read_lora(p, strict=False), w) for p, w in zip(paths, weights))
    return DiffusionBlend().blend(base, basis, kl_scale, True, mode)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="test-size models, two repeats")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"))
    args = ap.parse_args(argv)
    tiny_fixtures.comfy_on_path(COMFY_DIR)
    import torch

    import lora_formats
    import tiny_families
    from diffusion_blend.blend.lora_file import read_lora
    from diffusion_blend.nodes.comfy_wrapper import bind_bank

    repeats = 2 if args.quick else 5
    tmp = Path(tempfile.mkdtemp(prefix="db-bench-families-"))
    speed, memory = [], []
    print(f"apply_model on a batch of 2 at a {LATENT}x{LATENT} latent, torch threads {torch.get_num_threads()}, "
          f"best of {repeats}")
    print("| family | LoRA keys | plain s | exact/(k·plain) m=1 λ=1 (k=1) | exact/(k·plain) m=2 λ=0.5 (k=3) | "
          "sequential/(k·plain) m=2 λ=0.5 | merged/plain m=2 |")
    print("|---|---|---|---|---|---|---|")
    cases = [("SDXL", "comfyui"), ("Flux", "comfyui"), ("Flux", "diffusers transformer.*")]
    built = {}
    for name, fmt in cases:
        if name not in built:
            built[name] = tiny_families.build(name, **SIZES[args.quick][name])
            params = sum(p.numel() for p in built[name].patcher.model.diffusion_model.parameters())
            print(f"({name}: {params / 1e6:.1f} M parameters)", flush=True)
        fam = built[name]
        base = fam.patcher
        x, sigma, cond = _inputs(fam)
        files = [lora_formats.write_file(tmp / f"{name}-{fmt.split()[0]}-{s}.safetensors", base.model, fmt, "lora",
                                         seed=s) for s in (1, 2)]
        configs = {
            "exact_1": blended(base, files[:1], [1.0], 1.0),
            "exact_05": blended(base, files, [0.5, 0.5], 0.5),
            "sequential_05": blended(base, files, [0.5, 0.5], 0.5, "sequential"),
            "merged": blended(base, files, [0.5, 0.5], 0.5, "merged"),
        }
        run = lambda model: tiny_families.apply(model, x, sigma, cond)  # noqa: E731
        for model in (base, *configs.values()):
            run(model)  # warm-up: factors cast and cached
        plain = timed(lambda: run(base), repeats)
        t = {k: timed(lambda m=m: run(m), repeats) for k, m in configs.items()}
        plain = min(plain, timed(lambda: run(base), repeats))
        row = {"family": name, "format": fmt, "plain_s": plain, "exact_1_ratio": t["exact_1"] / plain,
               "exact_05_ratio": t["exact_05"] / (3 * plain), "sequential_05_ratio": t["sequential_05"] / (3 * plain),
               "merged_ratio": t["merged"] / plain}
        speed.append(row)
        print(f"| {name} | {fmt} | {plain:.3f} | {row['exact_1_ratio']:.3f} | {row['exact_05_ratio']:.3f} | "
              f"{row['sequential_05_ratio']:.3f} | {row['merged_ratio']:.3f} |", flush=True)

    print("\n| family | adapter | file MB | dense ΔW held MB (model dtype, fp32 here) | held ÷ file | layers | exact/plain m=1 λ=1 |")
    print("|---|---|---|---|---|---|---|")
    for name in ("SDXL", "Flux"):
        fam = built[name]
        base = fam.patcher
        x, sigma, cond = _inputs(fam)
        for kind in ("lora", "loha", "lokr", "dora", "diff"):
            path = lora_formats.write_file(tmp / f"{name}-{kind}.safetensors", base.model, "comfyui", kind, seed=3)
            bank = bind_bank(base, [read_lora(path, strict=False)])
            size = path.stat().st_size
            model = blended(base, [path], [1.0], 1.0)
            run = lambda m: tiny_families.apply(m, x, sigma, cond)  # noqa: E731
            run(model)
            ratio = timed(lambda: run(model), repeats) / timed(lambda: run(base), repeats)
            row = {"family": name, "adapter": kind, "file_mb": size / 2**20, "dense_mb": bank.dense_bytes() / 2**20,
                   "layers": len(bank.paths), "exact_over_plain": ratio}
            memory.append(row)
            print(f"| {name} | {kind} | {row['file_mb']:.2f} | {row['dense_mb']:.2f} | "
                  f"{bank.dense_bytes() / size:.1f}x | {row['layers']} | {ratio:.3f} |", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = out / "families_speed.json"
    result.write_text(json.dumps({"speed": speed, "memory": memory}, indent=2))
    print(f"\nwrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
