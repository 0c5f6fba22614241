"""SD3 basis LoRAs (flow matching): trained by the loop on a tiny SD3 diffusers pipeline with the flow
chain, exported in diffusers' ``transformer.*`` keys, and loaded by ComfyUI's stock loader and the
blend node into the model ComfyUI detects (SD3) for the same weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from trainkit import tiny_config  # noqa: E402

from familykit import apply_cond, stock_and_blend  # noqa: E402


RUNS = {"sd3 dpok": ("sd3", "dpok"), "sd35 dpok": ("sd35", "dpok"), "sd3 adjoint_matching": ("sd3", "adjoint_matching")}


@pytest.fixture(scope="module", params=list(RUNS))
def run(request):
    """SD3, and SD3.5 (RMS q/k norms, a dual-attention block): one pipeline class, one policy; DPOK on
    both, Adjoint Matching on SD3 (the same transformer code path)."""
    return RUNS[request.param]


@pytest.fixture(scope="module")
def sd3_base(run, tiny_sd3, tiny_sd35) -> Path:
    return {"sd3": tiny_sd3, "sd35": tiny_sd35}[run[0]]


@pytest.fixture(scope="module")
def trained_sd3(run, sd3_base, tmp_path_factory):
    from diffusion_blend.training.train import run_training

    cfg = tiny_config(sd3_base, tmp_path_factory.mktemp("sd3_run") / "run", **{
        "steps": 2, "batch_size": 2, "sampling.steps": 3, "algorithm.advantage": "value", "lr": 0.003,
        "algorithm.name": run[1]})
    return run_training(cfg, progress=False)


def test_sd3_lora_trains_on_the_flow_chain_and_matches_comfyuis_stock_loader(comfy_inprocess, sd3_base, trained_sd3):
    import tiny_families
    from diffusers import SD3Transformer2DModel

    from diffusion_blend.blend.lora_file import read_lora

    policy, path = trained_sd3.policy, Path(trained_sd3.lora_path)
    lora = read_lora(path)
    am = lora.metadata["db.algorithm"] == "adjoint_matching"
    assert lora.chain["family"] == "sd3" and lora.chain["shift"] == 3.0
    assert (lora.chain["sampler"], lora.chain.get("memoryless_chain")) == (
        ("any", "flow_ancestral") if am else ("flow_ancestral", None))
    assert all(name.startswith("transformer.transformer_blocks.") for name in lora.modules)
    assert float(lora.metadata["db.alpha_ref"]) > 0

    frozen = SD3Transformer2DModel.from_pretrained(Path(sd3_base) / "transformer").eval()
    base = tiny_families.sd3_from_diffusers(frozen)
    stock, blend, patches = stock_and_blend(base, path, "db_sd3_trained.safetensors")
    assert len(patches) == len(lora.modules) > 0  # ComfyUI maps every module of the file

    g = torch.Generator().manual_seed(5)
    sigma = 0.6
    x = torch.randn(2, 16, 8, 8, generator=g)
    context = torch.randn(2, 20, 64, generator=g)
    pooled = torch.randn(2, 64, generator=g)
    sig = torch.full((2,), sigma)
    v_stock, v_blend, v_base = ((x - apply_cond(m, x, sig, c_crossattn=context, y=pooled)) / sigma
                                for m in (stock, blend, base))  # ComfyUI: denoised = x - sigma v
    with torch.no_grad():
        v_peft = policy.network(hidden_states=x, timestep=sig * 1000, encoder_hidden_states=context,
                                pooled_projections=pooled).sample
    scale = v_peft.abs().max().item()
    assert (v_peft - v_base).abs().max() > 1e-3 * scale  # the trained adapter changes the prediction
    assert (v_stock - v_peft).abs().max().item() <= 1e-5 * max(1.0, scale)
    assert (v_blend - v_stock).abs().max().item() <= 1e-5 * max(1.0, scale)


def test_sd3_run_logs_the_flow_chains_kl_and_rewards(trained_sd3):
    h = trained_sd3.history[-1]
    assert h["kl"] >= 0 and "reward_mean" in h
    assert trained_sd3.policy.schedule.num_steps == 3
