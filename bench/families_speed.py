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
  m = 2 at lambda = 0.5: k = 3); 1.0 = no overhead beyond the unavoidable forwards.  A plan that
  never needs the base (k = 1 here) is merged into the weights at load, as the stock LoRA loader
  does ("at load": forced here, the node's default on accelerators; timed on a copy of the network so that ComfyUI does not re-patch
  shared weights between the two calls of a pair).  With ``merge_static=False``, and for every
  plan that evaluates the base (k = 3 here), one model per forward runs either with merged copies
  of the adapted weights "swapped in" (``LowRankBank.swap_budget_bytes``: the node's default on
  the CPU; the copies held are printed against the model's size) or "in the hooks" (budget 0:
  each delta added per call on the layer's output or per-call weight);
* ``merged/plain``: one forward with the concatenated low-rank factors (at load, and in the hooks);
* dense adapters (LoHa, LoKr, DoRA, full diff): the bank's dense bytes against the file's size,
  and their cost at k = 1 in the hooks and swapped in.

Timings are medians over back-to-back (plain, blend) pairs (``benchkit.paired_ratios``).

``--full-size --device cuda``: SDXL and Flux-dev at their published sizes (random weights, fp16 /
bf16) at 1024x1024 with rank-16 LoRAs on every layer, each plan with the low-rank deltas on the
layers' outputs, on ComfyUI's per-call weights, chosen per layer (``LowRankBank.low_rank_side``), and
all models stacked in one forward -- the measurement that sets the defaults on accelerators.

    python bench/families_speed.py [--quick] [--out out/bench]
    python bench/families_speed.py --full-size --device cuda [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import tiny_fixtures  # noqa: E402
from benchkit import median_seconds, paired_ratios  # noqa: E402

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


def blended(base, paths, weights, kl_scale, mode="exact", merge_static=True, swap=None):
    """The node's model with a swap pool of its own (the variants timed side by side alternate; a
    shared pool would make each evict the others' copies): ``swap`` bytes, or None for the node's
    default budget (merged copies swapped in on the CPU)."""
    from diffusion_blend.blend.basis import make_basis
    from diffusion_blend.blend.lora_file import read_lora
    from diffusion_blend.nodes.blend_nodes import blend_model

    basis = tuple(make_basis(read_lora(p, strict=False), w) for p, w in zip(paths, weights))
    model = blend_model(base, basis, kl_scale, True, mode, merge_static=merge_static)
    bank = _bank(model)
    bank.swap_budget_bytes = bank.swap_budget_bytes if swap is None else swap
    return model


def _bank(model):
    import comfy.patcher_extension

    from diffusion_blend.nodes.comfy_wrapper import WRAPPER_KEY

    return model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)[0].bank


def own_weights(patcher):
    """A ModelPatcher over a copy of the network: a blend merged into the weights at load (as the
    node does when no step needs the base) is then timed against the plain model call by call,
    without ComfyUI re-patching shared weights at every switch (which a sampling run does once)."""
    import copy

    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(copy.deepcopy(patcher.model), load_device=patcher.load_device,
                                            offload_device=patcher.offload_device)


SDXL_FULL = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False}
FLUX_FULL = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
             "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
             "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2}


def full_size_model(name: str, device, dtype, shrink: bool = False, weights: dict | None = None):
    """SDXL / Flux-dev at their published sizes (random weights, built on ``device`` in ``dtype``),
    and the inputs of one sampling step at 1024x1024: SDXL cond + uncond (batch 2, 77 tokens),
    Flux-dev one guidance-distilled pass (batch 1, 512 T5 tokens).  ``shrink``: the same code
    path at a toy size, to check the script on a CPU.  ``weights``: the network's state dict to
    load (cast to ``dtype``) instead of random weights."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    import tiny_families
    import torch

    if name == "SDXL":
        cfg = dict(SDXL_FULL, **({"model_channels": 32, "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
                                  "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1], "num_head_channels": 16} if shrink else {}))
        config, side, batch = sm.SDXL(cfg), 128, 2
        g = torch.Generator().manual_seed(0)
        cond = {"c_crossattn": torch.randn(batch, 77, cfg["context_dim"], generator=g),
                "y": torch.randn(batch, cfg["adm_in_channels"], generator=g)}
        channels = 4
    else:
        cfg = dict(FLUX_FULL, **tiny_families.flux_version_fields(), **({"hidden_size": 128, "num_heads": 4, "depth": 1, "depth_single_blocks": 2,
                                  "axes_dim": [8, 12, 12]} if shrink else {}))
        config, side, batch = sm.Flux(cfg), 128, 1
        g = torch.Generator().manual_seed(0)
        cond = {"c_crossattn": torch.randn(batch, 512, cfg["context_in_dim"], generator=g),
                "y": torch.randn(batch, cfg["vec_in_dim"], generator=g), "guidance": torch.full((batch,), 3.5)}
        channels = 16
    if shrink:
        side = 16
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, "", device=device)
    with torch.no_grad():
        if weights is not None:
            model.diffusion_model.load_state_dict(weights)
        else:
            torch.manual_seed(0)
            for pname, p in model.diffusion_model.named_parameters():
                p.normal_(1.0 if "norm" in pname or pname.endswith(".scale") else 0.0, 0.02)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    x = torch.randn(batch, channels, side, side, generator=g)
    sigma = torch.full((batch,), 0.7 if name == "Flux" else 2.0)
    to = lambda t: t.to(device)  # noqa: E731
    return patcher, to(x), to(sigma), {k: to(v) for k, v in cond.items()}


def stock_parity(patcher, files, run) -> dict[str, float]:
    """The blend against ComfyUI's stock LoRA loader on the same full-size model: w = e₁ at λ = 1
    (in the hooks, and merged at load) against the stock model at strength 1, and m = 2 at
    λ = 0.5 (equal α_ref, so c = ¼, ¼) against ½·plain + ¼(stock₁ + stock₂).  Relative to the
    prediction's largest entry; ``effect`` is the LoRA's own effect on that scale, so a parity
    error far below it shows that the blend applies the LoRA and not the base."""
    import comfy.sd
    import comfy.utils

    def rel(a, b) -> float:
        return float((a - b).abs().max() / b.abs().max())

    plain = run(patcher)
    hooks = run(blended(patcher, files[:1], [1.0], 1.0, merge_static=False))
    exact_05 = run(blended(patcher, files, [0.5, 0.5], 0.5, merge_static=False))
    resident = run(blended(patcher, files[:1], [1.0], 1.0, merge_static=True))
    stock = [run(comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(f)), 1.0, 0)[0])
             for f in files]
    run(patcher)  # leave the plain weights loaded
    return {"hooks": rel(hooks, stock[0]), "resident": rel(resident, stock[0]),
            "exact_05": rel(exact_05, 0.5 * plain + 0.25 * (stock[0] + stock[1])), "effect": rel(plain, stock[0])}


def _full_size_loras(tmp: Path, name: str, model) -> list[Path]:
    """Two rank-16 LoRA files (ComfyUI keys, every layer the key map names) for a full-size model."""
    import lora_formats

    return [lora_formats.write_file(tmp / f"{name}-{s}.safetensors", model, "comfyui", "lora", seed=s, rank=16)
            for s in (1, 2)]


def _runner(device, x, sigma, cond):
    """One synchronised ``apply_model`` call of a patcher at these inputs."""
    import torch

    import tiny_families

    def run(model):
        out = tiny_families.apply(model, x, sigma, cond)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def _set_sides(model, side: str, batch: bool | None):
    import comfy.patcher_extension

    from diffusion_blend.nodes.comfy_wrapper import WRAPPER_KEY

    for wrapper in model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        wrapper.batch_segments = batch
        wrapper.bank.low_rank_side = side
        wrapper.bank.swap_budget_bytes = 0  # the side itself, not merged copies swapped in
    return model


def parity_full(args) -> int:
    """The blend and the stock LoRA loader, each in the model's own dtype (SDXL fp16, Flux bf16),
    against the same computation in float32 on the same (rounded) weights: is the blend as close
    to the exact result as the stock loader is?  Every way the blend can place a delta (on the
    output, on the weight, auto, all models stacked in one forward, merged at load)."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    dtypes = {"SDXL": torch.float16, "Flux": torch.bfloat16}
    tmp = Path(tempfile.mkdtemp(prefix="db-bench-parity-"))
    rows = []
    for name in args.family:
        low = {}
        patcher, x, sigma, cond = full_size_model(name, device, dtypes[name], shrink=args.shrink)
        files = _full_size_loras(tmp, name, patcher.model)
        run = _runner(device, x, sigma, cond)

        def stock(model, f):
            return comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(f)), 1.0, 0)[0]

        low["plain"] = run(patcher)
        for side in ("auto", "output", "weight"):
            low[f"e1 hooks {side}"] = run(_set_sides(blended(patcher, files[:1], [1.0], 1.0, merge_static=False), side, None))
            low[f"m2 {side}"] = run(_set_sides(blended(patcher, files, [0.5, 0.5], 0.5, merge_static=False), side, False))
        low["m2 stacked"] = run(_set_sides(blended(patcher, files, [0.5, 0.5], 0.5, merge_static=False), "output", True))
        low["e1 merged at load"] = run(blended(patcher, files[:1], [1.0], 1.0, merge_static=True))
        low["stock1"], low["stock2"] = (run(stock(patcher, f)) for f in files)
        weights = {k: v.to("cpu") for k, v in patcher.model.diffusion_model.state_dict().items()}
        comfy.model_management.unload_all_models()
        del patcher
        comfy.model_management.soft_empty_cache()
        exact, x, sigma, cond = full_size_model(name, device, torch.float32, shrink=args.shrink, weights=weights)
        run = _runner(device, x.float(), sigma.float(), {k: v.float() for k, v in cond.items()})
        del weights
        ref = {"plain": run(exact)}
        ref["stock1"], ref["stock2"] = (run(stock(exact, f)) for f in files)
        comfy.model_management.unload_all_models()
        del exact
        comfy.model_management.soft_empty_cache()

        def err(a, b) -> float:
            return float((a - b).abs().max() / b.abs().max())

        target_m2 = 0.5 * ref["plain"] + 0.25 * (ref["stock1"] + ref["stock2"])
        row = {"family": name, "dtype": str(dtypes[name]).removeprefix("torch."),
               "nonfinite": [k for k, v in low.items() if not torch.isfinite(v).all()],
               "lora_effect": err(ref["plain"], ref["stock1"]), "plain": err(low["plain"], ref["plain"]),
               "stock e1": err(low["stock1"], ref["stock1"]),
               "stock m2": err(0.5 * low["plain"] + 0.25 * (low["stock1"] + low["stock2"]), target_m2),
               **{k: err(v, ref["stock1"] if k.startswith("e1") else target_m2)
                  for k, v in low.items() if k.startswith(("e1", "m2"))}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\nmax |low-precision − float32| / max |float32| for one prediction at 1024x1024, rank-16 LoRAs on every "
          "layer; the float32 reference is the stock loader on the same rounded weights")
    keys = [k for k in rows[0] if k not in ("family", "dtype", "nonfinite", "lora_effect")]  # plain first
    print("| model | LoRA's effect | " + " | ".join(keys) + " | non-finite |")
    print("|---" * (len(keys) + 3) + "|")
    for r in rows:
        print(f"| {r['family']} ({r['dtype']}) | {r['lora_effect']:.2e} | " + " | ".join(f"{r[k]:.2e}" for k in keys)
              + f" | {', '.join(r['nonfinite']) or 'none'} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "families_parity_full.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out / 'families_parity_full.json'}")
    return 0


#: (column, LowRankBank.low_rank_side, BlendWrapper.batch_segments)
SIDES = (("output", "output", False), ("weight", "weight", False), ("auto", "auto", False), ("batched", "output", True))


def full_size(args) -> int:
    """Full-size SDXL and Flux-dev, rank-16 LoRAs on every layer ComfyUI's key map names: the two
    places a low-rank delta can go (the per-call weight, the output), one model per forward and
    several stacked along the batch."""
    import torch

    device = torch.device(args.device)
    dtypes = {"SDXL": torch.float16, "Flux": torch.bfloat16} if device.type == "cuda" else {}
    tmp = Path(tempfile.mkdtemp(prefix="db-bench-full-"))
    rows, parity = [], []
    name_of = {"exact_1": "exact m=1 λ=1 (k=1)", "exact_05": "exact m=2 λ=0.5 (k=3)", "merged": "merged m=2 (k=1)"}
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'fp32'}; SDXL fp16, Flux bf16), rank-16 LoRAs on every layer (ComfyUI keys), 1024x1024, "
          f"median of {args.repeats} back-to-back pairs; ratios are time / (k · plain)")
    print("| model | plan | low-rank delta on the output, one forward per model | on the weight | auto (per layer) | "
          "on the output, all models in one forward | merged into the weights at load (the default for k = 1) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.family:
        patcher, x, sigma, cond = full_size_model(name, device, dtypes.get(name, torch.float32), shrink=args.shrink)
        params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
        files = _full_size_loras(tmp, name, patcher.model)
        run = _runner(device, x, sigma, cond)

        plans = {"exact_1": (files[:1], [1.0], 1.0, "exact", 1), "exact_05": (files, [0.5, 0.5], 0.5, "exact", 3),
                 "merged": (files, [0.5, 0.5], 0.5, "merged", 1)}
        for key, (paths, w, lam, mode, k) in plans.items():
            variants = {}
            for label, side, batch in SIDES:
                if label == "batched" and k == 1:
                    continue
                model = _set_sides(blended(patcher, paths, w, lam, mode, merge_static=False), side, batch)
                variants[label] = lambda m=model: run(m)
            plain, r = paired_ratios(lambda: run(patcher), variants, args.repeats)
            row = {"family": name, "params": params, "plan": key, "plain_s": plain,
                   **{f"{label}_ratio": v / k for label, v in r.items()}}
            if k == 1:  # what the node does here: the plan merged into the weights at load, timed in blocks
                # (the copy of a full-size model would not fit beside it; ComfyUI re-patches at a switch)
                resident = blended(patcher, paths, w, lam, mode)
                t_resident = median_seconds(lambda: run(resident), args.repeats, warmup=2)
                row["resident_ratio"] = t_resident / median_seconds(lambda: run(patcher), args.repeats, warmup=2)
            rows.append(row)
            cells = " | ".join(f"{row[f'{label}_ratio']:.3f}" if f"{label}_ratio" in row else "–"
                               for label in [label for label, _, _ in SIDES] + ["resident"])
            print(f"| {name} ({params / 1e9:.2f} B, plain {plain * 1000:.0f} ms) | {name_of[key]} | {cells} |", flush=True)
        parity.append({"family": name, **stock_parity(patcher, files, run)})
    print("\nAgainst the stock LoraLoader (comfy.sd.load_lora_for_models) at this size and dtype: "
          "max |blend − stock| / max |stock| over one prediction")
    print("| model | w = e₁, λ = 1, in the hooks | w = e₁, λ = 1, merged at load | m = 2, λ = 0.5 vs ½·plain + ¼(stock₁ + stock₂) | "
          "stock vs plain (the LoRA's own effect) |")
    print("|---|---|---|---|---|")
    for p in parity:
        print(f"| {p['family']} | {p['hooks']:.2e} | {p['resident']:.2e} | {p['exact_05']:.2e} | {p['effect']:.2e} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "families_speed_full.json").write_text(json.dumps({"speed": rows, "parity": parity}, indent=2))
    print(f"wrote {out / 'families_speed_full.json'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="test-size models, two repeats")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--full-size", action="store_true",
                    help="full-size SDXL and Flux-dev at 1024x1024 with rank-16 LoRAs (a GPU run)")
    ap.add_argument("--parity", action="store_true",
                    help="with --full-size: the blend and the stock loader in fp16/bf16 against float32, no timing")
    ap.add_argument("--family", nargs="+", default=["SDXL", "Flux"], choices=["SDXL", "Flux"],
                    help="with --full-size: the models to run")
    ap.add_argument("--device", default="cpu", help="with --full-size: cuda, or cpu")
    ap.add_argument("--repeats", type=int, default=15, help="with --full-size: timed pairs per variant")
    ap.add_argument("--shrink", action="store_true", help=argparse.SUPPRESS)  # --full-size's code at toy size
    args = ap.parse_args(argv)
    tiny_fixtures.comfy_on_path(COMFY_DIR, cpu=args.device == "cpu")
    if args.full_size:
        return parity_full(args) if args.parity else full_size(args)
    import torch

    import lora_formats
    import tiny_families
    from diffusion_blend.blend.lora_file import read_lora
    from diffusion_blend.nodes.comfy_wrapper import bind_bank

    repeats = 3 if args.quick else 9
    tmp = Path(tempfile.mkdtemp(prefix="db-bench-families-"))
    speed, memory = [], []
    print(f"apply_model on a batch of 2 at a {LATENT}x{LATENT} latent, torch threads {torch.get_num_threads()}, "
          f"median of {repeats} back-to-back pairs")
    print("| family | LoRA keys | plain s | exact/(k·plain) m=1 λ=1 (k=1): merged at load | swapped in | in the hooks | "
          "exact/(k·plain) m=2 λ=0.5 (k=3): swapped in (default) | in the hooks | sequential/(k·plain) m=2 λ=0.5 | "
          "merged/plain m=2: at load | in the hooks | swapped copies held MB (k=3) / model MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
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
            "exact_1": blended(own_weights(base), files[:1], [1.0], 1.0),
            "exact_1_swap": blended(base, files[:1], [1.0], 1.0, merge_static=False),
            "exact_1_hooks": blended(base, files[:1], [1.0], 1.0, merge_static=False, swap=0),
            "exact_05": blended(base, files, [0.5, 0.5], 0.5),
            "exact_05_hooks": blended(base, files, [0.5, 0.5], 0.5, swap=0),
            "sequential_05": blended(base, files, [0.5, 0.5], 0.5, "sequential"),
            "merged": blended(own_weights(base), files, [0.5, 0.5], 0.5, "merged"),
            "merged_hooks": blended(base, files, [0.5, 0.5], 0.5, "merged", merge_static=False, swap=0),
        }
        run = lambda model: tiny_families.apply(model, x, sigma, cond)  # noqa: E731
        plain, r = paired_ratios(lambda: run(base), {k: lambda m=m: run(m) for k, m in configs.items()}, repeats)
        model_mb = sum(p.numel() * p.element_size() for p in base.model.diffusion_model.parameters()) / 2**20
        row = {"family": name, "format": fmt, "plain_s": plain, "exact_1_ratio": r["exact_1"],
               "exact_1_swap_ratio": r["exact_1_swap"], "exact_1_hooks_ratio": r["exact_1_hooks"],
               "exact_05_ratio": r["exact_05"] / 3, "exact_05_hooks_ratio": r["exact_05_hooks"] / 3,
               "sequential_05_ratio": r["sequential_05"] / 3, "merged_ratio": r["merged"],
               "merged_hooks_ratio": r["merged_hooks"],
               "swapped_mb": _bank(configs["exact_05"]).swapped_bytes / 2**20, "model_mb": model_mb}
        speed.append(row)
        print(f"| {name} | {fmt} | {plain:.3f} | {row['exact_1_ratio']:.3f} | {row['exact_1_swap_ratio']:.3f} | "
              f"{row['exact_1_hooks_ratio']:.3f} | {row['exact_05_ratio']:.3f} | {row['exact_05_hooks_ratio']:.3f} | "
              f"{row['sequential_05_ratio']:.3f} | {row['merged_ratio']:.3f} | {row['merged_hooks_ratio']:.3f} | "
              f"{row['swapped_mb']:.0f} / {model_mb:.0f} |", flush=True)
        del configs

    print("\n| family | adapter | file MB | dense ΔW held MB (model dtype, fp32 here) | held ÷ file | layers | "
          "exact/plain m=1 λ=1, in the hooks | swapped in |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("SDXL", "Flux"):
        fam = built[name]
        base = fam.patcher
        x, sigma, cond = _inputs(fam)
        for kind in ("lora", "loha", "lokr", "dora", "diff"):
            path = lora_formats.write_file(tmp / f"{name}-{kind}.safetensors", base.model, "comfyui", kind, seed=3)
            bank = bind_bank(base, [read_lora(path, strict=False)])
            size = path.stat().st_size
            hooks = blended(base, [path], [1.0], 1.0, merge_static=False, swap=0)  # merged at load it costs nothing
            swapped = blended(base, [path], [1.0], 1.0, merge_static=False)
            run = lambda m: tiny_families.apply(m, x, sigma, cond)  # noqa: E731
            r = paired_ratios(lambda: run(base), {"hooks": lambda: run(hooks), "swapped": lambda: run(swapped)},
                              repeats)[1]
            row = {"family": name, "adapter": kind, "file_mb": size / 2**20, "dense_mb": bank.dense_bytes() / 2**20,
                   "layers": len(bank.paths), "exact_over_plain": r["hooks"], "swapped_over_plain": r["swapped"]}
            memory.append(row)
            print(f"| {name} | {kind} | {row['file_mb']:.2f} | {row['dense_mb']:.2f} | "
                  f"{bank.dense_bytes() / size:.1f}x | {row['layers']} | {r['hooks']:.3f} | {r['swapped']:.3f} |",
                  flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = out / "families_speed.json"
    result.write_text(json.dumps({"speed": speed, "memory": memory}, indent=2))
    print(f"\nwrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
