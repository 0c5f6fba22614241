"""An exported training LoRA, loaded by the ComfyUI nodes, changes the prediction exactly as peft
does in diffusers (one base model for both halves)."""

import math

import pytest
import torch

from diffusion_blend.training.export import export_lora, run_metadata, lora_modules_from_unet
from diffusion_blend.training.families import load_policy

from test_blend_inprocess import apply, blended

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from trainkit import tiny_config  # noqa: E402


@pytest.mark.parametrize("alpha,rslora", [(8.0, False), (6.0, True)])
def test_exported_lora_matches_peft(comfy_checkpoint, tiny_base, tmp_path, alpha, rslora):
    import folder_paths

    cfg = tiny_config(tiny_base["diffusers"], tmp_path / "run", **{"lora.alpha": alpha, "lora.rslora": rslora})
    policy = load_policy(cfg)
    unet, fingerprint = policy.network, policy.fingerprint
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    modules = lora_modules_from_unet(unet)
    path = tmp_path / "loras" / f"exported_{int(rslora)}.safetensors"
    export_lora(modules, path, run_metadata(cfg, steps=0, base_fingerprint=fingerprint, reward_scale=1.0,
                                            chain=policy.chain(), modules=modules))
    folder_paths.add_model_folder_path("loras", str(path.parent))

    import comfy.model_management

    base = comfy_checkpoint[0]
    # the checkpoint ComfyUI loaded is the same base (names differ, values do not); loading the plain
    # patcher first takes off what a clone merged into the shared weights (a blend at lambda = 1, a LoRA)
    from diffusion_blend.blend.fingerprint import weights_fingerprint
    comfy.model_management.load_models_gpu([base])
    assert weights_fingerprint(base.model.diffusion_model.state_dict().values()) == fingerprint

    patched = blended(base, [path], [1.0], 1.0)  # w = e_1, lambda = 1: the LoRA itself
    sigma = 4.0
    ms = base.get_model_object("model_sampling")
    x = torch.randn(2, 4, 8, 8, generator=g) * sigma
    ctx = torch.randn(2, 77, 768, generator=g)
    x0 = apply(patched, x, torch.full((2,), sigma), ctx)
    eps_comfy = (x - x0) / sigma
    t = ms.timestep(torch.full((2,), sigma)).float()
    with torch.no_grad():
        eps_peft = unet(x / math.sqrt(sigma**2 + 1), t, encoder_hidden_states=ctx).sample
        with torch.no_grad():
            unet.disable_adapters()
            eps_base = unet(x / math.sqrt(sigma**2 + 1), t, encoder_hidden_states=ctx).sample
            unet.enable_adapters()
    assert (eps_peft - eps_base).abs().max() > 1e-2  # the adapter matters
    assert (eps_comfy - eps_peft).abs().max().item() <= 1e-4
