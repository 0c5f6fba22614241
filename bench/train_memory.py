"""Benchmark: peak accelerator memory of one DPOK optimizer step at the shipped configs, on models
of the published sizes with random weights (built in memory from their configs: nothing is read or
downloaded), with and without the memory options.

Rows: SD1.5 (``configs/sd15_saturation.yaml``: fp32 weights, fp16 autocast, 512 px, batch 2) and
SDXL (``configs/sdxl_saturation.yaml``: bf16 weights and autocast, 1024 px, batch 1, gradient
checkpointing, text encoders offloaded), SDXL also without checkpointing.  One optimizer step with
``--sampling-steps`` chain steps (10 by default: the peak is one step's forward and backward, not
the chain's length) and a rule-based reward.

    python bench/train_memory.py --device cuda [--sampling-steps 10]
    python bench/train_memory.py --tiny            (the code path on the CPU, tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import tiny_fixtures  # noqa: E402

from diffusion_blend.training.config import load_config  # noqa: E402
from diffusion_blend.training.families.sd import SDPolicy  # noqa: E402
from diffusion_blend.training.pipeline import DTYPES, DiffusionModel, add_lora, lora_parameters  # noqa: E402
from diffusion_blend.training.sampler import DDIMSchedule  # noqa: E402
from diffusion_blend.training.train import run_training  # noqa: E402

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, prediction_type="epsilon", timestep_spacing="leading")
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280)
UNETS = {
    "sd15": dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64),  # diffusers' defaults otherwise
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def random_model(family: str, device: str, dtype: torch.dtype, tiny: bool) -> DiffusionModel:
    """A base of ``family`` with random weights: full size, or the test fixtures' tiny shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sdxl = family == "sdxl"
    tokenizer_dir = ROOT / ".cache" / "comfyui" / "comfy" / "sd1_tokenizer"
    small_clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=77, vocab_size=49408, projection_dim=32)
    with torch.device(device):
        unet = UNet2DConditionModel(**(tiny_fixtures.SDXL_UNET_CONFIG if sdxl else tiny_fixtures.UNET_CONFIG)
                                    if tiny else UNETS[family])
        vae = AutoencoderKL(**(tiny_fixtures.SMALL_VAE_CONFIG if tiny else VAE))
        encoders = [CLIPTextModel(CLIPTextConfig(**(small_clip if tiny and sdxl else CLIP_L)))]
        if sdxl:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**(small_clip if tiny else CLIP_G))))
    tokenizers = [CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)]
    if sdxl:
        tokenizers.append(CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77, pad_token="!"))
    for m in [unet, vae, *encoders]:
        m.to(dtype).requires_grad_(False).eval()
    return DiffusionModel(unet, vae, encoders, tokenizers, sdxl, f"random {family}", dict(SCHEDULER))


def measure(family: str, config: str, device: str, sampling_steps: int, tiny: bool, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / config, [
            "--steps", "1", "--grad_accum", "1", "--sampling.steps", str(sampling_steps), "--prompts", "['a cat']",
            "--prompt_file", "null", "--output_dir", tmp, "--image_every", "100", "--checkpoint_every", "100",
            *(["--sampling.resolution", "64", "--mixed_precision", "'no'"] if tiny else []), *overrides])
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = random_model(family, device, DTYPES[cfg.base.dtype], tiny)
        torch.manual_seed(cfg.seed)
        add_lora(model.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.rslora)
        for p in lora_parameters(model.unet):
            p.data = p.data.float()
        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        schedule = DDIMSchedule.from_scheduler_config(model.scheduler_config, cfg.sampling.steps, cfg.sampling.eta)
        policy = SDPolicy(model, schedule, cfg.sampling.guidance, cfg.sampling.resolution, "random")
        weights_gib = (torch.cuda.memory_allocated() / 2**30) if device == "cuda" else 0.0
        t0 = time.perf_counter()
        run_training(cfg, progress=False, policy=policy)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        return {"family": family, "config": config, "overrides": overrides, "resolution": cfg.sampling.resolution,
                "batch": cfg.batch_size, "dtype": cfg.base.dtype, "mixed_precision": cfg.mixed_precision,
                "gradient_checkpointing": cfg.gradient_checkpointing, "unet_params_M":
                sum(p.numel() for p in model.unet.parameters()) / 1e6, "weights_gib": weights_gib,
                "peak_gib": peak, "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sampling-steps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)  # one row, in a child process
    args = ap.parse_args(argv)
    runs = [("sd15", "sd15_saturation.yaml", []), ("sdxl", "sdxl_saturation.yaml", []),
            ("sdxl", "sdxl_saturation.yaml", ["--gradient_checkpointing", "false"])]
    if args.row is not None:  # accelerate's state (mixed precision) is fixed once per process
        print("ROW " + json.dumps(measure(*runs[args.row][:2], args.device, args.sampling_steps, args.tiny,
                                          runs[args.row][2])))
        return 0
    rows = []
    print(f"{'family':<6} {'px':>5} {'batch':>5} {'weights':>9} {'autocast':>8} {'ckpt':>5} {'UNet M':>7} "
          f"{'weights GiB':>11} {'peak GiB':>9} {'s/run':>7}")
    for k, (family, _, _) in enumerate(runs):
        child = subprocess.run([sys.executable, __file__, "--row", str(k), "--device", args.device,
                                "--sampling-steps", str(args.sampling_steps), *(["--tiny"] if args.tiny else [])],
                               capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("ROW ")]
        if child.returncode or not lines:
            print(child.stderr[-3000:], file=sys.stderr)
            return 1
        row = json.loads(lines[-1][4:])
        rows.append(row)
        print(f"{family:<6} {row['resolution']:>5} {row['batch']:>5} {row['dtype']:>9} {row['mixed_precision']:>8} "
              f"{str(row['gradient_checkpointing']):>5} {row['unet_params_M']:>7.0f} {row['weights_gib']:>11.2f} "
              f"{row['peak_gib']:>9.2f} {row['seconds']:>7.1f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_memory.json").write_text(json.dumps({"device": args.device, "rows": rows}, indent=1))
    print(f"wrote {out / 'train_memory.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
