"""SDXL basis LoRAs: trained by the loop on a tiny SDXL diffusers pipeline, exported, and loaded by
ComfyUI's stock loader (and the blend nodes) into ComfyUI's own SDXL model of the same weights.

ComfyUI matches SDXL checkpoints by their full-size UNet config, so the ComfyUI side is built
directly as ``comfy.model_base.SDXL`` with the tiny config (``scripts/tiny_families.py``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from trainkit import tiny_config  # noqa: E402

import tiny_fixtures  # noqa: E402  (scripts/, on the path from conftest)

from familykit import apply_cond, stock_and_blend  # noqa: E402


@pytest.fixture(scope="module", params=["dpok", "adjoint_matching"])
def trained(request, tiny_sdxl, tmp_path_factory):
    """Two steps on the tiny SDXL at batch 2 (the ``added_cond_kwargs`` follow the batch): DPOK with the
    value-network baseline (its text input is the 64-wide concatenated SDXL context), and Adjoint
    Matching (the reward's gradient through the VAE decoder, the lean adjoint through the frozen UNet)."""
    from diffusion_blend.training.train import run_training

    out = tmp_path_factory.mktemp("sdxl_run")
    cfg = tiny_config(tiny_sdxl, out / "run", **{"steps": 2, "batch_size": 2, "sampling.steps": 2,
                                                 "algorithm.advantage": "value", "lr": 0.01,
                                                 "algorithm.name": request.param})
    return run_training(cfg, progress=False)


def test_sdxl_lora_trains_exports_and_matches_comfyuis_stock_loader(comfy_inprocess, tiny_sdxl, trained):
    import tiny_families

    from diffusion_blend.blend.lora_file import read_lora

    policy, path = trained.policy, Path(trained.lora_path)
    unet = policy.network
    lora = read_lora(path)
    assert lora.chain["resolution"] == 64 and lora.chain["cfg"] == 3.0
    am = lora.metadata["db.algorithm"] == "adjoint_matching"
    assert lora.chain["sampler"] == ("any" if am else "ddim") and float(lora.metadata["db.alpha_ref"]) == 0.001
    base = tiny_families.sdxl_from_diffusers(tiny_fixtures.load_diffusers_unet(tiny_sdxl))  # the frozen base
    stock, blend, patches = stock_and_blend(base, path, "db_sdxl_trained.safetensors")
    assert len(patches) == len(lora.modules) > 0  # ComfyUI's key map for this SDXL covers every module

    g = torch.Generator().manual_seed(3)
    sigma = 3.0
    x = torch.randn(2, 4, 8, 8, generator=g) * sigma
    # the trainer's own conditioning of two prompts (text, pooled text, time_ids of the trained size) ...
    from diffusion_blend.training.pipeline import encode_prompts

    cond = encode_prompts(policy.model, ["a cat", "a dog"], 64, 64)
    context, added = cond["encoder_hidden_states"], cond["added_cond_kwargs"]
    pooled = added["text_embeds"]
    # ... and ComfyUI's SDXL conditioning of CLIPTextEncodeSDXL at that size (64 x 64, no crop) from the
    # same text features: encode_adm embeds the size itself, so trainer time_ids that ComfyUI does not
    # feed at inference (zeroed, swapped, cropped) make the two predictions differ
    y = base.model.encode_adm(pooled_output=pooled, width=64, height=64, target_width=64, target_height=64,
                              crop_w=0, crop_h=0)
    sig = torch.full((2,), sigma)
    eps_stock, eps_blend, eps_base = ((x - apply_cond(m, x, sig, c_crossattn=context, y=y)) / sigma
                                      for m in (stock, blend, base))

    # the training side: diffusers + peft, conditioned as the trainer conditions
    t = base.get_model_object("model_sampling").timestep(sig).float()
    with torch.no_grad():
        eps_peft = unet(x / math.sqrt(sigma**2 + 1), t, encoder_hidden_states=context, added_cond_kwargs=added).sample
    scale = eps_peft.abs().max().item()
    assert (eps_peft - eps_base).abs().max() > 1e-3 * scale  # the trained adapter changes the prediction
    assert (eps_stock - eps_peft).abs().max().item() <= 1e-5 * max(1.0, scale)
    assert (eps_blend - eps_stock).abs().max().item() <= 1e-5 * max(1.0, scale)


@pytest.mark.parametrize("component", ["tokenizer_2", "text_encoder_2"])
def test_sdxl_base_check_names_the_missing_second_encoder(tiny_sdxl, tmp_path, component):
    import shutil

    from diffusion_blend.training.pipeline import BaseModelError, check_base

    copy = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl, copy, ignore=shutil.ignore_patterns(component))
    with pytest.raises(BaseModelError, match=f"not a diffusers folder; missing {component}"):
        check_base(copy)
    check_base(tiny_sdxl)  # the complete folder passes


@pytest.mark.parametrize("pipeline", ["QwenImagePipeline", "StableDiffusionUpscalePipeline"])
def test_untrained_families_are_refused_by_name(tmp_path, pipeline):
    """The family is read from the base: a folder of a family the trainer does not drive is named."""
    import json

    from diffusion_blend.training.pipeline import BaseModelError, check_base

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline,
                                                           "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    with pytest.raises(BaseModelError, match=f"is a {pipeline}; the trainer drives StableDiffusionPipeline"):
        check_base(tmp_path)


@pytest.mark.parametrize("algorithm", ["dpok", "adjoint_matching"])
def test_checkpointing_and_offloaded_encoders_train_the_same_lora(tiny_sdxl, tmp_path, algorithm):
    """Gradient checkpointing and the prompt cache (each prompt encoded once, the encoders then
    offloaded) change memory, not the result: the same 2 steps give the same LoRA.  For Adjoint
    Matching the checkpointed UNet is recomputed inside the lean adjoint's backward, which must stay
    the frozen base's (it ran with the adapter on, and failed, before)."""
    from safetensors.torch import load_file

    from diffusion_blend.training.train import run_training

    common = {"steps": 2, "batch_size": 2, "sampling.steps": 2, "algorithm.advantage": "batch", "lr": 0.01,
              "algorithm.name": algorithm}
    plain = run_training(tiny_config(tiny_sdxl, tmp_path / "plain", **common, offload_text_encoders=False),
                         progress=False)
    calls = []
    lean_cfg = tiny_config(tiny_sdxl, tmp_path / "lean", **common, gradient_checkpointing=True)
    from diffusion_blend.training import families

    policy = families.load_policy(lean_cfg)
    assert policy.model.unet.is_gradient_checkpointing
    for encoder in policy.model.text_encoders:
        encoder.register_forward_hook(lambda *args: calls.append(1))
    lean = run_training(lean_cfg, progress=False, policy=policy)
    n_prompts = len(set(lean_cfg.prompts))
    assert len(calls) == 2 * n_prompts  # each prompt once per encoder ("" was encoded at load time)
    a, b = load_file(str(plain.lora_path)), load_file(str(lean.lora_path))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_bfloat16_base_trains_without_autocast(tiny_sdxl, tmp_path):
    """``base.dtype: bfloat16`` with ``mixed_precision: no``: the chain's input is cast to the base's
    dtype and its prediction read back in float32 (it failed with a dtype mismatch before)."""
    from safetensors.torch import load_file

    from diffusion_blend.training.train import run_training

    cfg = tiny_config(tiny_sdxl, tmp_path / "bf16", **{"steps": 1, "batch_size": 2, "sampling.steps": 2,
                                                       "base.dtype": "bfloat16", "lr": 0.01})
    result = run_training(cfg, progress=False)
    lora = load_file(str(result.lora_path))
    ups = [v for k, v in lora.items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(v).all() for v in ups) and max(float(v.abs().max()) for v in ups) > 0
    assert result.history[-1]["kl"] >= 0
