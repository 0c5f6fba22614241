"""Benchmark: peak accelerator memory of one DPOK optimizer step at the shipped configs, on models
of the published sizes with random weights (built in memory from their configs: nothing is read or
downloaded), with and without the memory options.

Rows: SD1.5 (``configs/sd15_saturation.yaml``: fp32 weights, fp16 autocast, 512 px, batch 2),
SDXL (``configs/sdxl_saturation.yaml``: bf16 weights and autocast, 1024 px, batch 1, gradient
checkpointing, text encoders offloaded), SDXL also without checkpointing, SD3.5-large and Flux-dev
(``configs/sd35_*.yaml``, ``flux_*.yaml``: the same memory options, T5-XXL offloaded after encoding).  One optimizer step with
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


T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
TRANSFORMERS = {  # diffusers configs of SD3.5-large and Flux-dev
    "sd35": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
                 num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                 pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm"),
    "flux": dict(guidance_embeds=True),  # diffusers' defaults are Flux-dev's
}
VAE16 = dict(VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)


def flow_policy(family: str, cfg, device: str, tiny: bool):
    """An SD3.5-large or Flux-dev policy with random weights (or the test fixtures' tiny shapes),
    built in memory as the families build it from files."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                              T5EncoderModel, T5TokenizerFast)

    from diffusion_blend.training.families.flux import FluxPolicy
    from diffusion_blend.training.families.sd3 import SD3Policy
    from diffusion_blend.training.sampler import FlowSchedule

    comfy = ROOT / ".cache" / "comfyui" / "comfy"
    clip_tok = CLIPTokenizer.from_pretrained(comfy / "sd1_tokenizer", model_max_length=77)
    t5_tok = T5TokenizerFast.from_pretrained(comfy / "text_encoders" / "t5_tokenizer")
    dtype = DTYPES[cfg.base.dtype]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the base's dtype directly (12 B parameters)
    try:
        with torch.device(device):
            if family == "sd35":
                transformer = SD3Transformer2DModel(**(tiny_fixtures.SD3_TRANSFORMER_CONFIG if tiny else TRANSFORMERS["sd35"]))
                vae = AutoencoderKL(**(tiny_fixtures.SD3_VAE_CONFIG if tiny else VAE16))
                small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             projection_dim=32, vocab_size=49408, max_position_embeddings=77)
                encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**(small if tiny else CLIP_L))),
                            CLIPTextModelWithProjection(CLIPTextConfig(**(small if tiny else CLIP_G))),
                            T5EncoderModel(T5Config(**(dict(T5_XXL, d_model=64, d_ff=128, d_kv=32, num_layers=2,
                                                            num_heads=2) if tiny else T5_XXL)))]
                pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae,
                                                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                                text_encoder=encoders[0], text_encoder_2=encoders[1],
                                                text_encoder_3=encoders[2], tokenizer=clip_tok, tokenizer_2=clip_tok,
                                                tokenizer_3=t5_tok)
            else:
                transformer = FluxTransformer2DModel(**(tiny_fixtures.FLUX_TRANSFORMER_CONFIG if tiny
                                                        else TRANSFORMERS["flux"]))
                vae = AutoencoderKL(**(tiny_fixtures.FLUX_VAE_CONFIG if tiny else VAE16))
                encoders = [CLIPTextModel(CLIPTextConfig(**(dict(CLIP_L, hidden_size=32, intermediate_size=64,
                                                                 num_hidden_layers=2, num_attention_heads=2)
                                                            if tiny else CLIP_L))),
                            T5EncoderModel(T5Config(**(dict(T5_XXL, d_model=32, d_ff=64, d_kv=16, num_layers=2,
                                                            num_heads=2) if tiny else T5_XXL)))]
                pipe = FluxPipeline(transformer=transformer, vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                    tokenizer=clip_tok, tokenizer_2=t5_tok,
                                    scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    finally:
        torch.set_default_dtype(previous)
    for m in [pipe.transformer, pipe.vae, *encoders]:
        m.requires_grad_(False).eval()
    torch.manual_seed(cfg.seed)
    add_lora(pipe.transformer, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.rslora)
    for p in lora_parameters(pipe.transformer):
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    tokens = (cfg.sampling.resolution // pipe.vae_scale_factor // 2) ** 2
    schedule = FlowSchedule.from_scheduler_config(dict(pipe.scheduler.config), cfg.sampling.steps, cfg.sampling.eta,
                                                  image_seq_len=tokens)
    cls = SD3Policy if family == "sd35" else FluxPolicy
    return cls(pipe, schedule, cfg.sampling.guidance, cfg.sampling.resolution, "random"), pipe.transformer


def measure(family: str, config: str, device: str, sampling_steps: int, tiny: bool, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / config, [
            "--steps", "1", "--grad_accum", "1", "--sampling.steps", str(sampling_steps), "--prompts", "['a cat']",
            "--prompt_file", "null", "--output_dir", tmp, "--image_every", "100", "--checkpoint_every", "100",
            *(["--sampling.resolution", "64", "--mixed_precision", "'no'"] if tiny else []), *overrides])
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if family in ("sd35", "flux"):
            policy, network = flow_policy(family, cfg, device, tiny)
        else:
            model = random_model(family, device, DTYPES[cfg.base.dtype], tiny)
            torch.manual_seed(cfg.seed)
            add_lora(model.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.rslora)
            for p in lora_parameters(model.unet):
                p.data = p.data.float()
            if cfg.gradient_checkpointing:
                model.unet.enable_gradient_checkpointing()
            schedule = DDIMSchedule.from_scheduler_config(model.scheduler_config, cfg.sampling.steps, cfg.sampling.eta)
            policy, network = SDPolicy(model, schedule, cfg.sampling.guidance, cfg.sampling.resolution, "random"), model.unet
        weights_gib = (torch.cuda.memory_allocated() / 2**30) if device == "cuda" else 0.0
        t0 = time.perf_counter()
        run_training(cfg, progress=False, policy=policy)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        return {"family": family, "config": config, "overrides": overrides, "resolution": cfg.sampling.resolution,
                "batch": cfg.batch_size, "dtype": cfg.base.dtype, "mixed_precision": cfg.mixed_precision,
                "gradient_checkpointing": cfg.gradient_checkpointing, "unet_params_M":
                sum(p.numel() for p in network.parameters()) / 1e6, "weights_gib": weights_gib,
                "peak_gib": peak, "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sampling-steps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)  # one row, in a child process
    ap.add_argument("--only", default="", help="comma-separated families to run (default: all)")
    ap.add_argument("--algorithm", default="dpok", choices=("dpok", "adjoint_matching"),
                    help="the configs' algorithm (adjoint_matching: the reward's gradient, the lean adjoint)")
    ap.add_argument("--no-cudnn-attention", action="store_true",
                    help="disable PyTorch's cuDNN attention backend (its backward failed on Flux's shapes, H200)")
    args = ap.parse_args(argv)
    runs = [("sd15", "sd15_saturation.yaml", []), ("sdxl", "sdxl_saturation.yaml", []),
            ("sdxl", "sdxl_saturation.yaml", ["--gradient_checkpointing", "false"]),
            ("sd35", "sd35_saturation.yaml", []), ("flux", "flux_saturation.yaml", [])]
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.row is not None:  # accelerate's state (mixed precision) is fixed once per process
        print("ROW " + json.dumps(measure(*runs[args.row][:2], args.device, args.sampling_steps, args.tiny,
                                          runs[args.row][2] + ["--algorithm.name", args.algorithm])))
        return 0
    rows = []
    print(f"{'family':<6} {'px':>5} {'batch':>5} {'weights':>9} {'autocast':>8} {'ckpt':>5} {'net M':>7} "
          f"{'weights GiB':>11} {'peak GiB':>9} {'s/run':>7}")
    for k, (family, _, _) in enumerate(runs):
        if args.only and family not in args.only.split(","):
            continue
        child = subprocess.run([sys.executable, __file__, "--row", str(k), "--device", args.device,
                                "--sampling-steps", str(args.sampling_steps), *(["--tiny"] if args.tiny else []),
                                "--algorithm", args.algorithm,
                                *(["--no-cudnn-attention"] if args.no_cudnn_attention else [])],
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
    name = "train_memory.json" if args.algorithm == "dpok" else f"train_memory_{args.algorithm}.json"
    (out / name).write_text(json.dumps({"device": args.device, "algorithm": args.algorithm, "rows": rows}, indent=1))
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
