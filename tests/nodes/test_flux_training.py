"""Flux-dev basis LoRAs: trained by the loop on a tiny Flux pipeline (packed latents, the flow chain
shifted for the token count, the guidance embedding), exported in diffusers' ``transformer.*`` keys,
and loaded by ComfyUI's stock loader and the blend node into the Flux ComfyUI detects (its hard-coded
full-size attention shapes shrunk to the tiny model's, as in ``scripts/tiny_families.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from trainkit import tiny_config  # noqa: E402

from familykit import apply_cond, stock_and_blend  # noqa: E402


@pytest.fixture(scope="module", params=["dpok", "adjoint_matching"])
def trained_flux(request, tiny_flux, tmp_path_factory):
    from diffusion_blend.training.train import run_training

    cfg = tiny_config(tiny_flux, tmp_path_factory.mktemp("flux_run") / "run", **{
        "steps": 2, "batch_size": 2, "sampling.steps": 3, "sampling.guidance": 3.5, "algorithm.advantage": "value",
        "lr": 0.003, "algorithm.name": request.param})
    return run_training(cfg, progress=False)


def test_flux_lora_trains_on_the_flow_chain_and_matches_comfyuis_stock_loader(comfy_inprocess, tiny_flux, trained_flux):
    import tiny_families
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from diffusion_blend.blend.lora_file import read_lora

    policy, path = trained_flux.policy, Path(trained_flux.lora_path)
    lora = read_lora(path)
    assert lora.chain["family"] == "flux" and lora.chain["guidance"] == 3.5 and lora.chain["cfg"] == 1.0
    assert lora.chain["sampler"] == ("any" if lora.metadata["db.algorithm"] == "adjoint_matching" else "flow_ancestral")
    assert all(name.startswith("transformer.") for name in lora.modules)
    assert {n.split(".")[1] for n in lora.modules} == {"transformer_blocks", "single_transformer_blocks"}

    base = tiny_families.flux_from_diffusers(FluxTransformer2DModel.from_pretrained(Path(tiny_flux) / "transformer"))
    stock, blend, patches = stock_and_blend(base, path, "db_flux_trained.safetensors")
    assert len(patches) == len(lora.modules) > 0  # ComfyUI maps every module of the file

    g = torch.Generator().manual_seed(7)
    sigma = 0.55
    x = torch.randn(2, 16, 8, 8, generator=g)
    context = torch.randn(2, 12, 32, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    sig, guidance = torch.full((2,), sigma), torch.full((2,), 3.5)
    v_stock, v_blend, v_base = ((x - apply_cond(m, x, sig, c_crossattn=context, y=pooled, guidance=guidance))
                                / sigma for m in (stock, blend, base))
    cond = {"cond": {"prompt_embeds": context, "pooled": pooled}}
    with torch.no_grad():  # the trainer's own forward: packed latents, model time sigma = t / 1000
        packed = FluxPipeline._pack_latents(x, 2, 16, 8, 8)
        v_peft = FluxPipeline._unpack_latents(policy.eps(packed, sig * 1000, cond), 64, 64, 8)
    scale = v_peft.abs().max().item()
    assert (v_peft - v_base).abs().max() > 1e-3 * scale  # the trained adapter changes the prediction
    assert (v_stock - v_peft).abs().max().item() <= 1e-5 * max(1.0, scale)
    assert (v_blend - v_stock).abs().max().item() <= 1e-5 * max(1.0, scale)


def test_flux_chain_is_shifted_for_the_token_count(trained_flux):
    import math

    schedule = trained_flux.policy.schedule
    tokens = (64 // 8 // 2) ** 2
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
    assert schedule.shift == pytest.approx(math.exp(mu)) and schedule.num_steps == 3
    assert trained_flux.history[-1]["kl"] >= 0
