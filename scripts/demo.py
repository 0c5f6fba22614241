"""The main job on the embedded default: the tiny base, two basis LoRAs, images through the real
headless ComfyUI server with this plugin loaded.

    python scripts/demo.py [--out out/demo]

Stages print one progress line each.  Writes ``base.png`` (plain KSampler) and ``blend.png``
(Diffusion Blend of the two bases, w = (0.5, 0.5), kl_scale 1) and prints their paths.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import tiny_fixtures  # noqa: E402

from diffusion_blend.client.graph import txt2img  # noqa: E402
from diffusion_blend.client.host import ComfyServer  # noqa: E402


def stage(msg: str, t0: float) -> None:
    print(f"[demo {time.monotonic() - t0:6.1f}s] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "out" / "demo"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    comfy_dir = Path(os.environ.get("COMFYUI_DIR") or ROOT / ".cache" / "comfyui")

    stage("building the tiny SD1.5 base (cached after the first run)", t0)
    base = tiny_fixtures.build_tiny_base(comfy_dir)
    models = ROOT / ".cache" / "demo-models"
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    (models / "loras").mkdir(parents=True, exist_ok=True)
    link = models / "checkpoints" / tiny_fixtures.CKPT_NAME
    if not link.exists():
        link.symlink_to(base["checkpoint"])

    stage("writing two basis LoRAs", t0)
    unet = tiny_fixtures.load_diffusers_unet(base["diffusers"])
    for i, name in enumerate(("basis_a.safetensors", "basis_b.safetensors")):
        if not (models / "loras" / name).exists():
            tiny_fixtures.make_basis_lora(unet, models / "loras" / name, seed=100 + i, reward=f"demo_{i}")

    stage("starting ComfyUI (headless, CPU)", t0)
    with ComfyServer(comfy_dir, models, work_dir=ROOT / ".cache" / "demo-server") as server:
        stage(f"server up in {server.startup_seconds:.1f}s on port {server.port}", t0)

        def blend(g, model):
            a = g.add("DiffusionBlendBasis", lora_name="basis_a.safetensors", weight=0.5, alpha_ref=0.0)
            b = g.add("DiffusionBlendBasis", lora_name="basis_b.safetensors", weight=0.5, alpha_ref=0.0, basis=a[0])
            return g.add("DiffusionBlend", model=model, basis=b[0], kl_scale=1.0, normalize=True, mode="exact")[0]

        for name, chain in (("base", None), ("blend", blend)):
            t1 = time.monotonic()
            result = server.client.run(txt2img(tiny_fixtures.CKPT_NAME, seed=42, steps=8, model_chain=chain).prompt())
            png = server.client.view(result.images[0])
            img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
            if not np.isfinite(img).all() or img.std() == 0:
                raise RuntimeError(f"{name}: the image is constant or not finite")
            path = out / f"{name}.png"
            path.write_bytes(png)
            stage(f"{name}: {img.shape[1]}x{img.shape[0]} image in {time.monotonic() - t1:.1f}s -> {path}", t0)
    stage("done", t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
