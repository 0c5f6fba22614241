"""Soak the real ComfyUI server with mixed Diffusion Blend prompts: memory must plateau and every
re-run must be bit-identical.

A pool of distinct prompts (all four modes, 1-8 bases, varying LoRA sets and weights, 64 px,
3 steps) is cycled; the server's RSS is read after every prompt.  The first pass over the pool is
warm-up (caches fill by design: parsed LoRAs up to their bound, the banks' cast factors, oneDNN's
kernels for each batch shape; in one 72-prompt run RSS rose 51 MB from prompt 10 to 50 and 3 MB
from 50 to 72) and is checked for mismatches only.  Plateau: over the prompts after it, the
highest RSS of the last half exceeds the highest of the first half by less than 1 % of the first
half's median.

    python bench/soak.py [--prompts 100] [--cache-mb 64]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from diffusion_blend.client.graph import Graph  # noqa: E402

MODES = ("exact", "sequential", "merged", "stochastic")
CKPT = "tiny-sd15.safetensors"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def prompt_pool(lora_names: list[str], size: int = 12, seed: int = 0) -> list[dict]:
    """Distinct blend prompts: every mode, 1-8 bases from ``lora_names``, positive weights."""
    rng = random.Random(seed)
    pool = []
    for k in range(size):
        mode = MODES[k % len(MODES)]
        m = 1 + (k * 3) % min(8, len(lora_names))
        names = rng.sample(lora_names, m)
        weights = [round(rng.uniform(0.2, 1.0), 2) for _ in names]
        kl_scale = 0.8 if mode == "stochastic" else round(rng.uniform(0.5, 2.0), 2)  # stochastic needs c >= 0
        pool.append({"mode": mode, "bases": list(zip(names, weights)), "kl_scale": kl_scale, "seed": k})
    return pool


def graph(spec: dict) -> dict:
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    basis = None
    for name, weight in spec["bases"]:
        kw = {"basis": basis[0]} if basis is not None else {}
        basis = g.add("DiffusionBlendBasis", lora_name=name, weight=weight, alpha_ref=0.0, **kw)
    model = g.add("DiffusionBlend", model=ckpt[0], basis=basis[0], kl_scale=spec["kl_scale"], normalize=True,
                  mode=spec["mode"], start_percent=0.0, end_percent=1.0, seed=spec["seed"])[0]
    pos = g.add("CLIPTextEncode", text="a photo of a cat", clip=ckpt[1])[0]
    neg = g.add("CLIPTextEncode", text="", clip=ckpt[1])[0]
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    out = g.add("KSampler", model=model, seed=spec["seed"], steps=3, cfg=5.0, sampler_name="ddpm",
                scheduler="ddim_uniform", positive=pos, negative=neg, latent_image=latent, denoise=1.0)[0]
    img = g.add("VAEDecode", samples=out, vae=ckpt[2])
    g.add("SaveImage", images=img[0], filename_prefix="soak/img")
    return g.prompt()


def soak(server, lora_names: list[str], n_prompts: int, report=print, warmup: int | None = None) -> dict:
    """Run ``n_prompts`` (cycling the pool); returns RSS per prompt, mismatches and the plateau check
    over the prompts after the first ``warmup`` (default: one pass over the pool)."""
    pool = prompt_pool(lora_names)
    warmup = len(pool) if warmup is None else warmup
    if n_prompts - warmup < 2:
        raise ValueError(f"n_prompts = {n_prompts}: expected at least warm-up ({warmup}) + 2")
    first: dict[int, bytes] = {}
    rss, mismatches = [], 0
    for k in range(n_prompts):
        idx = k % len(pool)
        result = server.client.run(graph(pool[idx]))
        image = server.client.view(result.images[0])
        if idx in first:
            mismatches += image != first[idx]
        else:
            first[idx] = image
        rss.append(rss_bytes(server.proc.pid))
        if k + 1 in (10, 50, 100) or k + 1 == n_prompts:
            report(f"[soak] after {k + 1:4d} prompts: server RSS {rss[-1] / 2**20:8.1f} MB, mismatches {mismatches}")
    measured = rss[warmup:]
    half = len(measured) // 2
    level = sorted(measured[:half])[half // 2]
    growth = max(measured[half:]) - max(measured[:half])
    return {"rss": rss, "mismatches": mismatches, "growth_bytes": growth, "first_half_level": level,
            "growth_fraction": growth / level, "plateau": growth < 0.01 * level}


def main(argv=None) -> int:
    import tempfile

    import tiny_fixtures

    from diffusion_blend.client.host import ComfyServer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--cache-mb", type=float, default=None, help="DIFFUSION_BLEND_LORA_CACHE_MB for the server")
    args = ap.parse_args(argv)
    comfy = ROOT / ".cache" / "comfyui"
    base = tiny_fixtures.build_tiny_base(comfy)
    unet = tiny_fixtures.load_diffusers_unet(base["diffusers"])
    models = Path(tempfile.mkdtemp(prefix="db-soak-"))
    (models / "checkpoints").mkdir()
    (models / "loras").mkdir()
    (models / "checkpoints" / CKPT).symlink_to(base["checkpoint"])
    names = []
    for i in range(10):
        name = f"soak_{i}.safetensors"
        tiny_fixtures.make_basis_lora(unet, models / "loras" / name, seed=100 + i, alpha_ref=1e-4 * (1 + i % 3))
        names.append(name)
    import os

    if args.cache_mb is not None:
        os.environ["DIFFUSION_BLEND_LORA_CACHE_MB"] = str(args.cache_mb)
    with ComfyServer(comfy, models) as server:
        out = soak(server, names, args.prompts)
    print(f"[soak] growth over the last half (after a warm-up pass): {out['growth_bytes'] / 2**20:.1f} MB = {100 * out['growth_fraction']:.2f} % "
          f"of the first half's {out['first_half_level'] / 2**20:.0f} MB; mismatches {out['mismatches']}")
    return 0 if out["plateau"] and out["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
