"""Benchmark: the cost of the DB-SMC sampler against ComfyUI's ``euler_ancestral`` on the same model,
measured side by side in one run.

Tiny SD1.5 base at 128x128 (16x16 latent), N = 4 particles (the latent batch), 6 steps, CFG 7, two
basis LoRAs with rule-based rewards (brightness, saturation); ``--size``, ``--particles`` and
``--steps`` change them.  Rows:

* at kl_scale 0.5 the blend evaluates the base anyway (affine coefficient 1 - λ = 0.5): the SMC sampler
  needs no extra network forward; at kl_scale 1 (λ·Σw̃ = 1) it needs one more model per call;
* ``score_every`` = 1000 (the potential is only taken at the start and at the end), 5 and 1: the
  cost of decoding x̂_0 with the VAE and scoring it;
* the plain base with rewards (reward-guided SMC on the base) against euler_ancestral on the base.

Learned rewards (CLIP-sized models) make scoring dearer than here: scale ``score_every`` with them.

A second table (``variants``): per kept sample at N = 8 and 32 particles on the blend at kl_scale 0.5,
DB (euler_ancestral on the blend), DB-SMC with the node's defaults and DB-SMC with the strong-tilt
options (adaptive tempering, two pCN moves after every resampling): seconds per kept sample and
network forwards per step (each move is one more blend + base call and one scoring).

    python bench/smc_speed.py [--repeats 1] [--size 128] [--particles 4] [--steps 6] [--out out/bench]
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
from benchkit import median_seconds  # noqa: E402

COMFY_DIR = Path(os.environ.get("COMFYUI_DIR") or ROOT / ".cache" / "comfyui")
CFG = 7.0


def setup(lora_dir: Path, steps: int):
    tiny_fixtures.comfy_on_path(COMFY_DIR)
    import comfy.samplers
    import comfy.sd
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(lora_dir))
    base = tiny_fixtures.build_tiny_base(COMFY_DIR)
    unet = tiny_fixtures.load_diffusers_unet(base["diffusers"])
    for i, reward in enumerate(("brightness", "saturation")):
        tiny_fixtures.make_basis_lora(unet, lora_dir / f"smc_bench_{i}.safetensors", seed=700 + i, alpha_ref=0.05,
                                      reward=reward)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(base["checkpoint"]), output_vae=True,
                                                             output_clip=True)[:3]
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", steps)
    return model, vae, pos, neg, sigmas


def blended(model, kl_scale: float):
    from diffusion_blend.nodes.blend_nodes import add_basis, blend_model

    basis = None
    for i in range(2):
        basis = add_basis(f"smc_bench_{i}.safetensors", 1.0, 0.0, basis)
    return blend_model(model, basis, kl_scale, True, "exact")


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` runs (with one run, the scoring time in the log is that run's)."""
    return median_seconds(fn, repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--particles", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"))
    args = ap.parse_args(argv)
    sys.argv = [sys.argv[0], "--cpu"]
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model, vae, pos, neg, sigmas = setup(Path(tmp), args.steps)
        import comfy.sample
        import comfy.samplers

        from diffusion_blend.nodes.smc_nodes import smc_sampler

        noise = torch.randn(args.particles, 4, args.size // 8, args.size // 8,
                            generator=torch.Generator().manual_seed(0))
        latent = torch.zeros_like(noise)

        def run(m, sampler):
            return lambda: comfy.sample.sample_custom(m, noise, CFG, sampler, sigmas, pos, neg, latent, seed=1,
                                                      disable_pbar=True)

        ancestral = comfy.samplers.ksampler("euler_ancestral", {"eta": 1.0, "s_noise": 1.0})
        run(model, ancestral)()  # warm-up (first-call allocations)
        rows = []
        cases = [(f"blend kl_scale {lam:g}", blended(model, lam), {}) for lam in (0.5, 1.0)]
        cases.append(("base + rewards (no blend)", model, {"rewards": "brightness:1, saturation:1", "alpha": 0.1}))
        for label, m, extra in cases:
            t_plain = timed(run(m, ancestral), args.repeats)
            for every in (1000, 5, 1):
                sampler, log = smc_sampler(vae, every, 0.5, 1.0, **extra)
                t_smc = timed(run(m, sampler), args.repeats)
                sampling = t_smc - log.score_seconds
                rows.append({"model": label, "score_every": every, "plain_s": t_plain, "smc_s": t_smc,
                             "ratio": t_smc / t_plain, "score_s": log.score_seconds, "scorings": log.scorings,
                             "ratio_without_scoring": sampling / t_plain, "forwards_per_step": log.forwards_per_step})
                print(f"{label:26s} score_every {every:4d}: SMC {t_smc:6.2f} s / euler_ancestral {t_plain:6.2f} s = "
                      f"{t_smc / t_plain:5.2f}; without the {log.scorings} scorings ({log.score_seconds:5.2f} s): "
                      f"{sampling / t_plain:5.2f}; forwards/step {log.forwards_per_step}", flush=True)
        variants = variant_rows(model, vae, pos, neg, sigmas, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smc_speed.json").write_text(json.dumps({"rows": rows, "variants": variants}, indent=1))
    print(f"wrote {out / 'smc_speed.json'}")
    return 0


VARIANTS = {"DB-SMC (node defaults)": {},
            "DB-SMC adaptive + 2 moves": {"adaptive_ess": 0.5, "moves": 2}}


def variant_rows(model, vae, pos, neg, sigmas, args) -> list[dict]:
    """Seconds per kept sample and forwards per step of DB, DB-SMC and its strong-tilt variant."""
    import comfy.sample
    import comfy.samplers
    import torch

    from diffusion_blend.nodes.smc_nodes import smc_sampler

    blend = blended(model, 0.5)
    rows = []
    for particles in (8, 32):
        noise = torch.randn(particles, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))

        def run(sampler):
            return lambda: comfy.sample.sample_custom(blend, noise, CFG, sampler, sigmas, pos, neg,
                                                      torch.zeros_like(noise), seed=1, disable_pbar=True)

        t_db = timed(run(comfy.samplers.ksampler("euler_ancestral", {"eta": 1.0, "s_noise": 1.0})), args.repeats)
        rows.append({"method": "DB", "particles": particles, "s_per_sample": t_db / particles,
                     "forwards_per_step": None})
        print(f"N = {particles:3d}  DB: {t_db / particles:6.3f} s per sample", flush=True)
        for label, options in VARIANTS.items():
            sampler, log = smc_sampler(vae, 1, 0.5, 1.0, **options)
            t = timed(run(sampler), args.repeats)
            rows.append({"method": label, "particles": particles, "s_per_sample": t / particles,
                         "ratio_to_db": t / t_db, "forwards_per_step": log.forwards_per_step,
                         "scorings": log.scorings, "score_s": log.score_seconds})
            print(f"N = {particles:3d}  {label}: {t / particles:6.3f} s per sample ({t / t_db:5.2f} x DB), "
                  f"{log.forwards_per_step:.2f} forwards per step, {log.scorings} scorings", flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
