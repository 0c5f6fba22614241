"""Tiny deterministic fixtures: an SD1.5-detectable base model and basis LoRAs on it.

Built on first use, cached under ``.cache/fixtures`` (never committed):

* ``tiny-sd15.safetensors`` -- a single-file checkpoint ComfyUI detects as SD1.5 (UNet with
  ``model_channels`` 320, ``context_dim`` 768, ``channel_mult [1]``, one res block, transformer depth
  1; full-size random CLIP-L text encoder; SD VAE), fp16;
* ``tiny-sd15-diffusers/`` -- the same weights in diffusers layout (UNet2DConditionModel,
  CLIPTextModel, AutoencoderKL, tokenizer from ComfyUI's ``comfy/sd1_tokenizer``, DDIM scheduler);
* :func:`make_basis_lora` -- seeded random LoRAs in kohya or peft keys with ``db.*`` metadata.

Weights are rounded to float16 once, so the fp16 files hold them exactly and fp32 loads agree.
Key conversion to the checkpoint layout uses ComfyUI's own maps (``comfy.utils.unet_to_diffusers``,
``comfy.diffusers_convert``), so this module needs a ComfyUI folder (``comfy_dir``).

Usage: ``python scripts/tiny_fixtures.py [OUT_DIR]`` prints the checkpoint path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".cache" / "fixtures"
FIXTURE_VERSION = "2"
CKPT_NAME = "tiny-sd15.safetensors"
DIFFUSERS_NAME = "tiny-sd15-diffusers"

#: The tiny UNet, in diffusers terms.  ComfyUI sees channel_mult [1], num_res_blocks [1].
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    block_out_channels=(320,),
    layers_per_block=1,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
#: The same UNet as ComfyUI's model detection describes it (what unet_to_diffusers needs).
COMFY_UNET_CONFIG = dict(
    num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
    transformer_depth_middle=1,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
#: Default LoRA targets: attention projections of every transformer block, plus the 1x1 conv
#: proj_in/proj_out and one 3x3 resnet conv so the Conv2d path is exercised too.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "resnets.0.conv1")


def host_dir(out_dir: str | os.PathLike, comfy_dir: str | os.PathLike) -> Path:
    """Where files built *by* a ComfyUI host are cached: ``out_dir/comfy-<its version>``.  They use the
    host's own modules (key names, parameter names change between versions: v0.33.0's Flux RMSNorm
    saves ``.weight`` where 0.3.75 reads ``.scale``), so each host has its own."""
    text = (Path(comfy_dir) / "comfyui_version.py").read_text() if (Path(comfy_dir) / "comfyui_version.py").exists() else ""
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return Path(out_dir) / f"comfy-{match.group(1) if match else 'unknown'}"


def comfy_on_path(comfy_dir: str | os.PathLike, cpu: bool = True) -> None:
    """Make ComfyUI's modules importable in this process, in CPU mode (``cpu=False``: on the GPU).

    ComfyUI parses ``sys.argv`` only when ``comfy.options.enable_args_parsing()`` was called
    before ``comfy.cli_args`` is imported; with a CUDA build of torch and no GPU, ``--cpu`` is
    required or importing ``comfy.model_management`` fails.
    """
    comfy_dir = str(comfy_dir)
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    if "comfy.cli_args" in sys.modules:
        return
    import comfy.options

    sys.argv = [sys.argv[0] if sys.argv else "diffusion_blend", *(["--cpu"] if cpu else [])]
    comfy.options.enable_args_parsing()


def _round_to_fp16(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def build_models(comfy_dir: str | os.PathLike, seed: int = 0):
    """The tiny base's modules, in diffusers classes, with fp16-exact fp32 weights.

    The text encoder uses ComfyUI's own SD1 CLIP-L config, the size ComfyUI expects.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = _round_to_fp16(UNet2DConditionModel(**UNET_CONFIG))
    clip_config = json.loads((Path(comfy_dir) / "comfy" / "sd1_clip_config.json").read_text())
    for k in ("_name_or_path", "architectures", "torch_dtype", "transformers_version"):
        clip_config.pop(k, None)
    text_encoder = _round_to_fp16(CLIPTextModel(CLIPTextConfig(**clip_config)))
    vae = _round_to_fp16(AutoencoderKL(**VAE_CONFIG))
    return unet.eval(), text_encoder.eval(), vae.eval()


def checkpoint_state_dict(unet, text_encoder, vae) -> dict[str, torch.Tensor]:
    """Original SD1.x single-file layout, converted with ComfyUI's own key maps."""
    import comfy.diffusers_convert
    import comfy.utils

    unet_map = comfy.utils.unet_to_diffusers(COMFY_UNET_CONFIG)
    sd: dict[str, torch.Tensor] = {}
    for k, v in unet.state_dict().items():
        if k not in unet_map:
            raise KeyError(f"diffusers UNet key {k} has no ComfyUI name")
        sd["model.diffusion_model." + unet_map[k]] = v
    for k, v in comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict()).items():
        sd["first_stage_model." + k] = v
    for k, v in text_encoder.state_dict().items():
        sd["cond_stage_model.transformer." + k] = v
    return {k: v.detach().half().contiguous() for k, v in sd.items()}


def build_tiny_base(comfy_dir: str | os.PathLike, out_dir: str | os.PathLike = DEFAULT_OUT, seed: int = 0) -> dict[str, Path]:
    """Build (or reuse) the tiny base; returns ``{"checkpoint": ..., "diffusers": ...}``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    ckpt = out_dir / CKPT_NAME
    diffusers_dir = out_dir / DIFFUSERS_NAME
    stamp = out_dir / f".tiny-base-v{FIXTURE_VERSION}-seed{seed}"
    if stamp.exists() and ckpt.exists() and diffusers_dir.exists():
        return {"checkpoint": ckpt, "diffusers": diffusers_dir}
    comfy_on_path(comfy_dir)
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    unet, text_encoder, vae = build_models(comfy_dir, seed)
    tokenizer = CLIPTokenizer.from_pretrained(Path(comfy_dir) / "comfy" / "sd1_tokenizer", model_max_length=77)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp_dir = out_dir / (DIFFUSERS_NAME + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp_dir, safe_serialization=True)
    shutil.rmtree(diffusers_dir, ignore_errors=True)
    tmp_dir.rename(diffusers_dir)
    pipe.to(torch.float32)

    tmp_ckpt = ckpt.with_suffix(".tmp")
    save_file(checkpoint_state_dict(unet, text_encoder, vae), str(tmp_ckpt))
    os.replace(tmp_ckpt, ckpt)
    stamp.touch()
    return {"checkpoint": ckpt, "diffusers": diffusers_dir}


CONTROLNET_NAME = "tiny-sd15-controlnet.safetensors"


def build_tiny_controlnet(comfy_dir: str | os.PathLike, out_dir: str | os.PathLike = DEFAULT_OUT, seed: int = 0) -> Path:
    """A ControlNet for the tiny base in the original ``control_model.*`` layout, which ComfyUI's
    ``ControlNetLoader`` detects from its keys: ComfyUI's own ``cldm.ControlNet`` built with the
    tiny UNet's detected config (encoder copied from the UNet, as ControlNet training starts) and
    random hint block and zero convolutions (non-zero, so the control changes every block)."""
    from safetensors.torch import save_file

    out = host_dir(out_dir, comfy_dir) / CONTROLNET_NAME
    stamp = out.parent / f".tiny-controlnet-v1-seed{seed}"
    if stamp.exists() and out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    base = build_tiny_base(comfy_dir, out_dir, seed=0)
    comfy_on_path(comfy_dir)
    import comfy.cldm.cldm
    import comfy.model_detection
    import comfy.utils

    prefix = "model.diffusion_model."
    unet = {k[len(prefix):]: v.float() for k, v in comfy.utils.load_torch_file(str(base["checkpoint"])).items()
            if k.startswith(prefix)}
    config = dict(comfy.model_detection.model_config_from_unet(unet, "", True).unet_config)
    config.pop("out_channels")
    shapes = comfy.cldm.cldm.ControlNet(hint_channels=3, **config).state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in shapes.items():
        if k in unet:
            state[k] = unet[k].clone()
        else:
            state[k] = torch.randn(v.shape, generator=g) * (0.05 if v.ndim > 1 else 0.01)
    tmp = out.with_suffix(".tmp")
    save_file({"control_model." + k: v.half().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, out)
    stamp.touch()
    return out


SDXL_NAME = "tiny-sdxl-diffusers"
SDXL_VERSION = "2"
#: A tiny SDXL UNet in diffusers terms: SDXL's layout (no attention at the first level, linear
#: transformer projections, 64-wide attention heads -- ComfyUI's SDXL fixes ``num_head_channels`` at
#: 64 --, ``text_time`` added conditioning embedded by 256-wide sinusoids as ComfyUI's
#: ``SDXL.encode_adm`` does), two text encoders of width 32 (context 64, pooled 32).
SDXL_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 1),
    cross_attention_dim=64, use_linear_projection=True, transformer_layers_per_block=(1, 1),
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=6 * 256 + 32, norm_num_groups=32,
)
#: The same UNet as ComfyUI's ``openaimodel.UNetModel`` config (for ``comfy.model_base.SDXL``).
SDXL_COMFY_UNET_CONFIG = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, num_classes="sequential",
    adm_in_channels=6 * 256 + 32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1],
    transformer_depth=[0, 1], channel_mult=[1, 2], transformer_depth_middle=1, use_linear_in_transformer=True,
    context_dim=64, num_head_channels=64, transformer_depth_output=[0, 0, 1, 1], use_temporal_attention=False,
    use_temporal_resblock=False,
)
#: A small VAE with SD's 8x downsampling (4 levels of 32 channels).
SMALL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
    block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)


def _cached_pipeline(out_dir: Path, name: str, version: str, seed: int) -> tuple[Path, Path | None]:
    """``(folder, stamp)``: ``stamp`` is None when a complete build of this version is cached."""
    folder, stamp = out_dir / name, out_dir / f".{name}-v{version}-seed{seed}"
    if stamp.exists() and (folder / "model_index.json").exists():
        return folder, None
    out_dir.mkdir(parents=True, exist_ok=True)
    return folder, stamp


def _save_pipeline(pipe, folder: Path, stamp: Path) -> Path:
    """Save a diffusers pipeline atomically (a temporary folder renamed), then mark it built."""
    tmp_dir = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    pipe.save_pretrained(tmp_dir, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp_dir.rename(folder)
    stamp.touch()
    return folder


def _no_zero_weights(model: torch.nn.Module) -> torch.nn.Module:
    """diffusers zero-initialises output layers: give them small fp16-exact weights, so that the
    prediction (and a LoRA's effect on it) depends on every layer."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.add_(0.05 * torch.randn_like(p)).copy_(p.half().float())
    return model


def tiny_clip(projection: bool, seed: int, layers: int = 2):
    """A CLIP text encoder stand-in 32 wide (pooled/projected 32) with ``layers`` layers, fp16-exact."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                            max_position_embeddings=77, vocab_size=49408, projection_dim=32)
    return _round_to_fp16((CLIPTextModelWithProjection if projection else CLIPTextModel)(config)).eval()


def build_tiny_sdxl(comfy_dir: str | os.PathLike, out_dir: str | os.PathLike = DEFAULT_OUT, seed: int = 0) -> Path:
    """Build (or reuse) a tiny SDXL diffusers pipeline folder (diffusers' own pipeline runs on it):
    UNet :data:`SDXL_UNET_CONFIG`, CLIP-L/CLIP-G stand-ins of width 32 (ComfyUI's CLIP tokenizer; the
    second pads with ``!`` as SDXL's does), a small VAE, SDXL's Euler scheduler config."""
    folder, stamp = _cached_pipeline(Path(out_dir), SDXL_NAME, SDXL_VERSION, seed)
    if stamp is None:
        return folder
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    unet = _no_zero_weights(_round_to_fp16(UNet2DConditionModel(**SDXL_UNET_CONFIG))).eval()
    torch.manual_seed(seed + 1)
    vae = _round_to_fp16(AutoencoderKL(**SMALL_VAE_CONFIG)).eval()
    tokenizer_dir = Path(comfy_dir) / "comfy" / "sd1_tokenizer"
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=tiny_clip(False, seed + 2), text_encoder_2=tiny_clip(True, seed + 3),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77, pad_token="!"),
        unet=unet, scheduler=EulerDiscreteScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", steps_offset=1, timestep_spacing="leading"),
        force_zeros_for_empty_prompt=False,
    )
    return _save_pipeline(pipe, folder, stamp)


SD3_NAME = "tiny-sd3-diffusers"
SD3_VERSION = "1"
#: A tiny SD3 MMDiT in diffusers terms, shaped as ComfyUI's MMDiT expects (hidden = 64 x depth, heads
#: of 64, so ComfyUI detects it as SD3): 2 joint blocks, context 64 (CLIP-L/G 32 + 32, T5 64), pooled 64.
SD3_TRANSFORMER_CONFIG = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
    num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
    pos_embed_max_size=8,
)
SD3_VAE_CONFIG = dict(SMALL_VAE_CONFIG, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                      use_quant_conv=False, use_post_quant_conv=False)


#: SD3.5's additions: RMS-normalised queries and keys, a second self-attention in the first block
SD35_EXTRA = dict(qk_norm="rms_norm", dual_attention_layers=(0,))


def build_tiny_sd3(comfy_dir: str | os.PathLike, out_dir: str | os.PathLike = DEFAULT_OUT, seed: int = 0,
                   sd35: bool = False) -> Path:
    """Build (or reuse) a tiny SD3 (``sd35``: SD3.5) diffusers pipeline folder: :data:`SD3_TRANSFORMER_CONFIG`
    (+ :data:`SD35_EXTRA`), two CLIP stand-ins with projections (width 32), a T5 encoder of width 64 with
    ComfyUI's T5 tokenizer, a 16-channel VAE, SD3's flow-matching scheduler (shift 3)."""
    name = SD3_NAME.replace("sd3", "sd35") if sd35 else SD3_NAME
    folder, stamp = _cached_pipeline(Path(out_dir), name, SD3_VERSION, seed)
    if stamp is None:
        return folder
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(seed)
    config = dict(SD3_TRANSFORMER_CONFIG, **(SD35_EXTRA if sd35 else {}))
    transformer = _no_zero_weights(_round_to_fp16(SD3Transformer2DModel(**config))).eval()
    torch.manual_seed(seed + 1)
    vae = _round_to_fp16(AutoencoderKL(**SD3_VAE_CONFIG)).eval()
    torch.manual_seed(seed + 4)
    t5 = _round_to_fp16(T5EncoderModel(T5Config(vocab_size=32128, d_model=64, d_ff=128, d_kv=32, num_layers=2,
                                                num_heads=2, feed_forward_proj="gated-gelu"))).eval()
    clip_tokenizer = Path(comfy_dir) / "comfy" / "sd1_tokenizer"
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=tiny_clip(True, seed + 2), text_encoder_2=tiny_clip(True, seed + 3), text_encoder_3=t5,
        tokenizer=CLIPTokenizer.from_pretrained(clip_tokenizer, model_max_length=77),
        tokenizer_2=CLIPTokenizer.from_pretrained(clip_tokenizer, model_max_length=77, pad_token="!"),
        tokenizer_3=T5TokenizerFast.from_pretrained(Path(comfy_dir) / "comfy" / "text_encoders" / "t5_tokenizer"),
    )
    return _save_pipeline(pipe, folder, stamp)


FLUX_NAME = "tiny-flux-diffusers"
FLUX_VERSION = "1"
#: A tiny Flux-dev transformer in diffusers terms: 64 hidden (2 heads of 32, RoPE axes 8/12/12), one
#: double and one single block, the guidance embedding, T5 context 32, CLIP pooled 32.
FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12),
)
FLUX_VAE_CONFIG = dict(SMALL_VAE_CONFIG, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                       use_quant_conv=False, use_post_quant_conv=False)


def build_tiny_flux(comfy_dir: str | os.PathLike, out_dir: str | os.PathLike = DEFAULT_OUT, seed: int = 0) -> Path:
    """Build (or reuse) a tiny Flux-dev diffusers pipeline folder: :data:`FLUX_TRANSFORMER_CONFIG`, a
    CLIP-L stand-in (width 32) and a T5 encoder of width 32 with ComfyUI's tokenizers, a 16-channel VAE,
    Flux's dynamically shifted flow-matching scheduler."""
    folder, stamp = _cached_pipeline(Path(out_dir), FLUX_NAME, FLUX_VERSION, seed)
    if stamp is None:
        return folder
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(seed)
    transformer = _no_zero_weights(_round_to_fp16(FluxTransformer2DModel(**FLUX_TRANSFORMER_CONFIG))).eval()
    torch.manual_seed(seed + 1)
    vae = _round_to_fp16(AutoencoderKL(**FLUX_VAE_CONFIG)).eval()
    torch.manual_seed(seed + 4)
    t5 = _round_to_fp16(T5EncoderModel(T5Config(vocab_size=32128, d_model=32, d_ff=64, d_kv=16, num_layers=2,
                                                num_heads=2, feed_forward_proj="gated-gelu"))).eval()
    pipe = FluxPipeline(
        transformer=transformer, vae=vae, text_encoder=tiny_clip(False, seed + 2), text_encoder_2=t5,
        tokenizer=CLIPTokenizer.from_pretrained(Path(comfy_dir) / "comfy" / "sd1_tokenizer", model_max_length=77),
        tokenizer_2=T5TokenizerFast.from_pretrained(Path(comfy_dir) / "comfy" / "text_encoders" / "t5_tokenizer"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
    )
    return _save_pipeline(pipe, folder, stamp)


def lora_target_paths(unet: torch.nn.Module, targets=DEFAULT_LORA_TARGETS) -> list[str]:
    """Dotted diffusers paths of the Linear/Conv2d modules a LoRA on ``targets`` covers."""
    paths = []
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and any(
            name == t or name.endswith("." + t) for t in targets
        ):
            paths.append(name)
    return paths


def make_basis_lora(
    unet: torch.nn.Module,
    path: str | os.PathLike,
    *,
    seed: int,
    rank: int = 4,
    alpha: float = 2.0,
    std: float = 0.25,
    reward: str = "random",
    alpha_ref: float | None = 1e-4,
    key_format: str = "kohya",
    targets=DEFAULT_LORA_TARGETS,
    extra_metadata: dict | None = None,
) -> Path:
    """A seeded random LoRA on ``unet`` (diffusers UNet), written with the project's writer."""
    from diffusion_blend.blend.fingerprint import weights_fingerprint
    from diffusion_blend.blend.lora_file import LoraModule, write_lora

    g = torch.Generator().manual_seed(seed)
    modules = {}
    for p in lora_target_paths(unet, targets):
        m = unet.get_submodule(p)
        w = m.weight
        fan_in = w[0].numel()
        down_shape = (rank, *w.shape[1:])
        up_shape = (w.shape[0], rank) + ((1, 1) if w.ndim == 4 else ())
        down = torch.randn(down_shape, generator=g) / fan_in**0.5
        up = torch.randn(up_shape, generator=g) * std * float(w.detach().float().std()) * fan_in**0.5 / rank**0.5
        modules[p] = LoraModule(down=down.half().float(), up=up.half().float(), alpha=alpha)
    metadata = {
        "db.reward": reward,
        "db.base_fingerprint": weights_fingerprint(unet.state_dict().values()),
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
    }
    if alpha_ref is not None:
        metadata["db.alpha_ref"] = repr(float(alpha_ref))
    metadata.update(extra_metadata or {})
    write_lora(path, modules, metadata, key_format=key_format, dtype=torch.float16)
    return Path(path)


def load_diffusers_unet(diffusers_dir: str | os.PathLike) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(Path(diffusers_dir) / "unet", torch_dtype=torch.float32).eval()


if __name__ == "__main__":
    comfy = os.environ.get("COMFYUI_DIR") or str(ROOT / ".cache" / "comfyui")
    out = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT
    print(build_tiny_base(comfy, out)["checkpoint"])
