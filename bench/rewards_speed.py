"""Benchmark: the learned rewards' scoring speed, batched vs one image at a time, with and without
gradients, on random-weight replicas of the official files at 224 px (CPU).

The replicas (``scripts/reward_replicas.py``) keep each official format but are narrow and shallow,
so the measured images/s say what the pipeline (preprocessing, tokenisation, batching, the
libraries' towers) costs, not what the full models cost.  The full-size figure is an **estimate, not
a measurement**: the full architecture's forward FLOPs per image (counted by
``torch.utils.flop_counter`` on the meta device: nothing is allocated or downloaded) divided by the
FLOP/s this machine reaches on a large fp32 matmul.

Columns, per reward: batched images/s (batch ``--batch``), the batched/one-at-a-time ratio, the
no-grad/with-grad ratio (``score`` + backward to the pixels), full-size GFLOPs per image and the
estimated full-size images/s.

    python bench/rewards_speed.py [--batch 8] [--repeats 3] [--out out/bench]

``--full --device cuda`` measures instead the five rewards at their published sizes (random weights,
built in memory on the device: ViT-H-14, CLIP-H, CLIP-L, BLIP ViT-L + BERT-base), float32 against
float16 side by side: images/s without and with gradients, peak memory, and how far the float16
scores are from the float32 ones (in units of the scores' spread over the batch).

    python bench/rewards_speed.py --full --device cuda [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import reward_replicas  # noqa: E402
from benchkit import median_seconds  # noqa: E402

from diffusion_blend.rewards import get_reward  # noqa: E402

SIZE = 224
PROMPT = "a photo of a red house with a big tree"


def _timed(fn, repeats: int) -> float:
    return median_seconds(fn, repeats, warmup=1)


def cpu_flops_per_second() -> float:
    a, b = torch.randn(1024, 4096), torch.randn(4096, 4096)
    seconds = _timed(lambda: a @ b, 5)
    return 2 * 1024 * 4096 * 4096 / seconds


def full_size_gflops() -> dict[str, float]:
    """Forward FLOPs per image (one prompt each) of the full-size architectures, counted on meta."""
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel, CLIPConfig, CLIPModel

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    px = torch.empty(1, 3, SIZE, SIZE, device="meta")
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    out = {}
    with torch.device("meta"):
        vit_l = CLIPModel(CLIPConfig(  # openai/clip-vit-large-patch14
            text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=224, patch_size=14), projection_dim=768))
        image, text = count(lambda: vit_l.get_image_features(pixel_values=px)), count(lambda: vit_l.get_text_features(input_ids=ids))
        out["clip_score"], out["aesthetic"] = image + text, image
        vit_h = open_clip.create_model("ViT-H-14", pretrained=None, load_weights=False, device="meta")
        out["hpsv2"] = count(lambda: vit_h.encode_image(px)) + count(lambda: vit_h.encode_text(ids))
        out["pickscore"] = out["hpsv2"]  # CLIP-H: the same towers in transformers' layout
        vision = BlipVisionModel(BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                  num_attention_heads=16, image_size=224, patch_size=16))
        out["imagereward"] = count(lambda: vision(pixel_values=px))
    # BLIP's text tower reads its mask with .item(): counted on the CPU (bert-base size, ~0.5 GB)
    text_model = BlipTextModel(BlipTextConfig(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024,
                                              num_hidden_layers=12, num_attention_heads=12, is_decoder=True),
                               add_pooling_layer=False)
    with torch.no_grad():
        out["imagereward"] += count(lambda: text_model(input_ids=torch.zeros(1, 35, dtype=torch.long),
                                                       encoder_hidden_states=torch.zeros(1, 197, 1024)))
    return out


def full_size_rewards(clip_tokenizer: Path, bert_dir: Path, device: str) -> dict:
    """``{reward: factory()}`` building each reward at its published size, random weights, on ``device``."""
    import open_clip
    from transformers import BertTokenizer, BlipVisionConfig, BlipVisionModel, BlipTextModel, CLIPConfig, CLIPModel
    from transformers import CLIPTokenizer

    from diffusion_blend.rewards.imagereward import text_config_of
    from diffusion_blend.rewards.learned import (AestheticMLP, AestheticReward, CLIPScoreReward,
                                                          HPSv2Reward, ImageRewardReward, ImageTransform,
                                                          PickScoreReward)

    clip_tok = CLIPTokenizer.from_pretrained(clip_tokenizer, model_max_length=77)
    clip_l = dict(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                  vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=224, patch_size=14), projection_dim=768)
    clip_h = dict(text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                   hidden_act="gelu"),
                  vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                                     image_size=224, patch_size=14, hidden_act="gelu"), projection_dim=1024)

    def imagereward():
        bert = BertTokenizer.from_pretrained(bert_dir)
        bert.add_special_tokens({"bos_token": "[DEC]"})
        bert.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        med = {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 512}
        vision = BlipVisionModel(BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                  num_attention_heads=16, image_size=224, patch_size=16,
                                                  layer_norm_eps=1e-6))
        return ImageRewardReward(vision, BlipTextModel(text_config_of(med, 1024), add_pooling_layer=False), bert,
                                 AestheticMLP(768), ImageTransform(224, crop_rounding="round"))

    def on_device(factory):
        def build():
            with torch.device(device):
                return factory()
        return build

    return {
        "clip_score": on_device(lambda: CLIPScoreReward(CLIPModel(CLIPConfig(**clip_l)), clip_tok)),
        "pickscore": on_device(lambda: PickScoreReward(CLIPModel(CLIPConfig(**clip_h)), clip_tok)),
        "aesthetic": on_device(lambda: AestheticReward(CLIPModel(CLIPConfig(**clip_l)), clip_tok, AestheticMLP(768))),
        "hpsv2": on_device(lambda: HPSv2Reward(open_clip.create_model("ViT-H-14", pretrained=None, load_weights=False,
                                                                      device=device),
                                               open_clip.get_tokenizer("ViT-H-14"), ImageTransform(224, fit="pad"))),
        "imagereward": on_device(imagereward),
    }


def run_full(args) -> list[dict]:
    device = torch.device(args.device)
    tokenizer = ROOT / ".cache" / "comfyui" / "comfy" / "sd1_tokenizer"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bert = Path(tmp) / "bert"
        bert.mkdir()
        (bert / "vocab.txt").write_text("\n".join(reward_replicas.BERT_VOCAB) + "\n")
        factories = full_size_rewards(tokenizer, bert, args.device)
        images = torch.rand(args.batch, 3, 256, 256, generator=torch.Generator().manual_seed(0)).to(device)
        prompts = [PROMPT, "a blue bird in the sky", "sunset over the sea", "a dog on a house"] * (args.batch // 4 + 1)
        prompts = prompts[: args.batch]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        print(f"{device}: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; batch {args.batch}, "
              f"256 px in (resized to 224), random weights at published sizes")
        print(f"{'reward':<12} {'fp32 img/s':>10} {'fp16 img/s':>10} {'fp16/fp32':>9} {'grad fp16 img/s':>16} "
              f"{'peak GiB fp16':>13} {'|fp16-fp32|/spread':>18}")
        for name, factory in factories.items():
            torch.manual_seed(0)
            reward = factory()
            row = {"reward": name, "params_M": sum(p.numel() for p in reward.parameters()) / 1e6}
            scores = {}
            for dtype in ("float32", "float16"):
                reward.dtype_name = dtype
                reward.follow(images)

                def call():
                    scores[dtype] = reward(images, prompts)
                    sync()

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                row[f"{dtype}_images_per_s"] = args.batch / _timed(call, args.repeats)

                def with_grad():
                    x = images.clone().requires_grad_(True)
                    reward.score(x, prompts).sum().backward()
                    sync()

                row[f"{dtype}_grad_images_per_s"] = args.batch / _timed(with_grad, args.repeats)
                if device.type == "cuda":
                    row[f"{dtype}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            spread = float(scores["float32"].std()) or 1.0
            row["fp16_error_over_spread"] = float((scores["float16"] - scores["float32"]).abs().max()) / spread
            rows.append(row)
            print(f"{name:<12} {row['float32_images_per_s']:>10.1f} {row['float16_images_per_s']:>10.1f} "
                  f"{row['float16_images_per_s'] / row['float32_images_per_s']:>8.2f}x "
                  f"{row['float16_grad_images_per_s']:>16.1f} {row.get('float16_peak_gib', 0):>13.2f} "
                  f"{row['fp16_error_over_spread']:>18.4f}")
            reward = None  # free the GPU memory before the next model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--full", action="store_true", help="the published sizes, random weights (for a GPU)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.full:
        rows = run_full(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rewards_speed_full.json").write_text(json.dumps({"device": args.device, "batch": args.batch,
                                                                 "rows": rows}, indent=1))
        print(f"wrote {out / 'rewards_speed_full.json'}")
        return 0
    tokenizer = ROOT / ".cache" / "comfyui" / "comfy" / "sd1_tokenizer"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        options = reward_replicas.build_replicas(Path(tmp), tokenizer, SIZE)
        flops = full_size_gflops()
        machine = cpu_flops_per_second()
        images = torch.rand(args.batch, 3, SIZE, SIZE)
        prompts = [PROMPT] * args.batch
        print(f"CPU: {machine / 1e9:.0f} GFLOP/s (fp32 matmul), {torch.get_num_threads()} threads; batch {args.batch}, "
              f"{SIZE} px, tiny replicas")
        print(f"{'reward':<12} {'img/s':>8} {'batched/single':>15} {'nograd/grad':>12} {'full GFLOP/img':>15} "
              f"{'full img/s (est.)':>18}")
        for name, opts in options.items():
            reward = get_reward(name, **opts)
            batched = _timed(lambda: reward(images, prompts), args.repeats)
            single = _timed(lambda: [reward(images[i : i + 1], prompts[:1]) for i in range(args.batch)], args.repeats)

            def with_grad():
                x = images.clone().requires_grad_(True)
                reward.score(x, prompts).sum().backward()

            grad = _timed(with_grad, args.repeats)
            row = {"reward": name, "images_per_s": args.batch / batched, "batched_over_single": single / batched,
                   "nograd_over_grad": grad / batched, "full_gflops_per_image": flops[name],
                   "full_images_per_s_estimate": machine / (flops[name] * 1e9)}
            rows.append(row)
            print(f"{name:<12} {row['images_per_s']:>8.1f} {row['batched_over_single']:>14.2f}x "
                  f"{row['nograd_over_grad']:>11.2f}x {row['full_gflops_per_image']:>15.0f} "
                  f"{row['full_images_per_s_estimate']:>18.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rewards_speed.json").write_text(json.dumps({"cpu_gflops": machine / 1e9, "batch": args.batch,
                                                        "rows": rows}, indent=1))
    print(f"wrote {out / 'rewards_speed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
