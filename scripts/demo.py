"""The main job, end to end on the embedded default (tiny models, CPU):

1. builds the tiny SD1.5 base (random weights, ComfyUI-detectable; cached in .cache/fixtures),
2. trains two basis LoRAs with DPOK on rule-based rewards (saturation, jpeg_compressibility) with the
   training package (cached per config; an interrupted run resumes),
3. starts the real headless ComfyUI server with this plugin, and
4. sweeps reward weights x KL scale through it with ``diffusion-blend sweep``'s code, writing
   ``grid.png``, ``tradeoff.png`` and ``sweep.json`` (measured rewards) into the output folder.

    python scripts/demo.py [--out out/demo]
    CKPT=/models/sd15.safetensors LORAS=/loras/a.safetensors,/loras/b.safetensors python scripts/demo.py

With ``CKPT``/``LORAS`` the same sweep runs on a real checkpoint and two basis LoRAs (rewards from
their ``db.reward`` metadata, or ``REWARDS=r_a,r_b``; learned rewards need
``REWARD_PATHS=aesthetic=/models/sac+logos+ava1-l14-linearMSE.pth,...``, other loader options
in ``REWARD_OPTIONS=aesthetic.clip=/models/clip-vit-large-patch14,...``) at 512 px, 20 steps.  One progress line per stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import tiny_fixtures  # noqa: E402

from diffusion_blend.blend.lora_file import read_lora  # noqa: E402
from diffusion_blend.client.cli import _csv_floats  # noqa: E402
from diffusion_blend.client.host import ComfyServer  # noqa: E402
from diffusion_blend.client.sweep import SweepSpec, run_sweep  # noqa: E402
from diffusion_blend.rewards import reward_options  # noqa: E402

#: the two basis rewards and the learning rate each trains well with: more saturated colours vs.
#: smaller JPEG files (compression removes colour detail first), a trade-off like the paper's
#: aesthetic vs. compressibility
#: (reward, lr, alpha_ref in raw reward units; the rewards' std under the tiny base: 0.016 and 0.059 kB)
BASES = (("saturation", 4e-3, 3e-5), ("jpeg_compressibility", 5e-3, 3e-5))
REWARDS = tuple(reward for reward, _, _ in BASES)
WEIGHTS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
CACHE = ROOT / ".cache" / "demo"


class Stages:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[demo {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)


def train_basis(reward: str, lr: float, alpha_ref: float, base_dir: Path, stage: Stages,
                steps: int | None = None) -> Path:
    """Train (or reuse) the demo LoRA for ``reward``; returns the exported file."""
    from diffusion_blend.training.config import load_config, to_dict
    from diffusion_blend.training.train import run_training

    overrides = ["--base.path", str(base_dir), "--rewards", json.dumps({reward: 1.0}), "--lr", str(lr),
                 "--algorithm.alpha_ref", repr(alpha_ref)]
    if steps is not None:
        overrides += ["--steps", str(steps)]
    cfg = load_config(ROOT / "configs" / "demo_tiny.yaml", overrides)
    key = hashlib.sha256(json.dumps({**to_dict(cfg), "base": {**to_dict(cfg)["base"], "path": ""}},
                                    sort_keys=True).encode()).hexdigest()[:12]
    cfg.output_dir = str(CACHE / "train" / f"{reward}-{key}")
    lora = Path(cfg.output_dir) / cfg.export_name
    if lora.exists():
        stage(f"basis '{reward}': trained LoRA cached at {lora}")
        return lora
    stage(f"basis '{reward}': training with DPOK ({cfg.steps} steps x {cfg.batch_size} samples, "
          f"{cfg.sampling.steps} DDIM steps, {cfg.sampling.resolution} px)")
    t = time.monotonic()
    result = run_training(cfg, resume="auto", progress=True)
    last = result.history[-1] if result.history else {}
    stage(f"basis '{reward}': trained in {time.monotonic() - t:.0f}s "
          f"(last batch reward {last.get('reward_mean', float('nan')):.4f}, path KL {last.get('kl_path', float('nan')):.3g}, "
          f"reward std under the base {result.reward_scale:.3g}, db.alpha_ref {alpha_ref:g})")
    return result.lora_path


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.resolve() == src.resolve():
            return
        dst.unlink()
    dst.symlink_to(src.resolve())


def _reward_from_metadata(path: Path) -> str:
    reward = read_lora(path).reward or ""
    if not reward or "," in reward:
        raise SystemExit(f"LORAS: {path} has no single db.reward in its metadata; set REWARDS=r_a,r_b")
    return reward.split(":")[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "out" / "demo"))
    ap.add_argument("--train-steps", type=int, default=None, help="override the demo config's steps")
    ap.add_argument("--size", type=int, help="image size of the sweep (default: 64 tiny, 512 with CKPT)")
    ap.add_argument("--steps", type=int, help="sampling steps of the sweep (default: 8 tiny, 20 with CKPT)")
    ap.add_argument("--images", type=int, help="images per sweep cell (default: 8 tiny, 4 with CKPT)")
    ap.add_argument("--weights", help="comma-separated weights w of the first basis (default 0,0.2,...,1)")
    ap.add_argument("--kl-scales", help="comma-separated KL scales (default 2,4,8 tiny; 0.5,1,2 with CKPT)")
    args = ap.parse_args(argv)
    stage = Stages()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    comfy_dir = Path(os.environ.get("COMFYUI_DIR") or ROOT / ".cache" / "comfyui")
    models = CACHE / "models"
    for sub in ("checkpoints", "loras"):
        if (models / sub).exists():
            shutil.rmtree(models / sub)

    if os.environ.get("CKPT") or os.environ.get("LORAS"):
        ckpt = Path(os.environ.get("CKPT", ""))
        loras = [Path(p) for p in os.environ.get("LORAS", "").split(",") if p]
        if not ckpt.is_file() or len(loras) != 2 or not all(p.is_file() for p in loras):
            raise SystemExit("CKPT=<checkpoint file> and LORAS=<a.safetensors>,<b.safetensors> (two existing files)")
        rewards = os.environ.get("REWARDS", "").split(",") if os.environ.get("REWARDS") else [
            _reward_from_metadata(p) for p in loras]
        options = reward_options(filter(None, os.environ.get("REWARD_PATHS", "").split(",")),
                                 filter(None, os.environ.get("REWARD_OPTIONS", "").split(",")))
        stage(f"user models: {ckpt.name}, LoRAs {loras[0].name} ({rewards[0]}), {loras[1].name} ({rewards[1]})")
        _link(ckpt, models / "checkpoints" / ckpt.name)
        names = []
        for p in loras:
            _link(p, models / "loras" / p.name)
            names.append(p.name)
        chain = read_lora(loras[0]).chain or {}  # sample as the LoRAs were trained (db.chain)
        spec = SweepSpec(ckpt=ckpt.name, loras=tuple(names), rewards=tuple(rewards), weights=WEIGHTS, kl_scales=(0.5, 1.0, 2.0),
                         images=4, steps=int(chain.get("steps", 50)), cfg=float(chain.get("cfg", 7.5)),
                         size=int(chain.get("resolution", 512)), reward_options=options)
    else:
        stage("the tiny default: about 7 minutes on 2 CPU cores the first time (two LoRAs train, ~2 min each), "
              "about 2.5 minutes once they are cached (docs/demo.md; slower machines take up to twice that)")
        stage("building the tiny SD1.5 base (random weights; cached after the first run)")
        base = tiny_fixtures.build_tiny_base(comfy_dir)
        _link(base["checkpoint"], models / "checkpoints" / tiny_fixtures.CKPT_NAME)
        names = []
        for reward, lr, alpha_ref in BASES:
            lora = train_basis(reward, lr, alpha_ref, base["diffusers"], stage, args.train_steps)
            name = f"db_{reward}.safetensors"
            _link(lora, models / "loras" / name)
            names.append(name)
        # The sampler the LoRAs were trained with: DDIM with eta = 1 (ComfyUI's ddpm sampler on the
        # ddim_uniform schedule), the training's steps, guidance and size.  The 12-step LoRAs are weak,
        # so the sweep extrapolates to weaker KL (kl_scale > 1) where the trade-off is plain to see.
        spec = SweepSpec(ckpt=tiny_fixtures.CKPT_NAME, loras=tuple(names), rewards=REWARDS, weights=WEIGHTS,
                         kl_scales=(2.0, 4.0, 8.0), images=8, seed=7, steps=8, cfg=3.0, size=64,
                         sampler="ddpm", scheduler="ddim_uniform", positive="a cat")

    for key in ("size", "steps", "images"):
        if getattr(args, key) is not None:
            setattr(spec, key, getattr(args, key))
    if args.weights:
        spec.weights = tuple(_csv_floats(args.weights, "--weights"))
    if args.kl_scales:
        spec.kl_scales = tuple(_csv_floats(args.kl_scales, "--kl-scales"))
    stage("starting ComfyUI (headless, CPU) with the Diffusion Blend nodes")
    with ComfyServer(comfy_dir, models, work_dir=CACHE / "server") as server:
        stage(f"server up in {server.startup_seconds:.1f}s on port {server.port}; sweeping "
              f"{len(spec.weights)} weights x {len(spec.kl_scales)} KL scales, {spec.images} images per cell")
        summary = run_sweep(server.client, spec, out, log=lambda msg: stage("  " + msg))
    for reward, rows in summary["spearman_own_weight"].items():
        stage(f"{reward}: Spearman(own weight, mean reward) " + ", ".join(f"λ={k}: {v:.2f}" for k, v in rows.items()))
    stage(f"done: {out / 'grid.png'}, {out / 'tradeoff.png'}, {out / 'sweep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
