"""Training fidelity through the shipped loop (toy family).  The rows themselves -- DPOK's Gaussian and
mixture LoRAs on their training chain, Adjoint Matching's read by every sampler -- are checked in
``test_report.py`` on ``bench/validation.py --quick``'s ``training.json`` (one run, no duplicate
training here).  This file holds what the report does not run: the planted bug of fine-tuning Adjoint
Matching on a chain that is not memoryless."""

import pytest

from diffusion_blend.validation.fidelity import FidelitySettings, fit_gaussian_base, linear_rows

AM = {"algorithm.name": "adjoint_matching"}
AM_SMALL = FidelitySettings(iterations=100, steps=20, batch=64, eval_samples=8192)  # the report's AM settings


@pytest.fixture(scope="module")
def gaussian_mlp():
    return fit_gaussian_base(steps=AM_SMALL.base_fit_steps)


def test_adjoint_matching_on_a_chain_that_is_not_memoryless_misses(gaussian_mlp, monkeypatch):
    """The planted bug: fine-tuning at eta = 0.5 (the loop refuses it; forced here).  The start and
    the end of the chain stay correlated, the optimum is no longer the tilt: measured implied/stated
    0.47 on the ODE, 0.64 on DDPM.  The same run at eta = 1 reads 1.000 on the ODE (the report)."""
    import diffusion_blend.training.train as train
    from diffusion_blend.training.families.toy import ToyPolicy
    from diffusion_blend.training.sampler import DDIMSchedule

    monkeypatch.setattr(train, "check_memoryless", lambda schedule: None)
    from_config = ToyPolicy.from_config.__func__

    def half_eta(cls, base, cfg):
        policy = from_config(cls, base, cfg)
        policy.schedule = DDIMSchedule.stable_diffusion(cfg.sampling.steps, 0.5)
        return policy

    monkeypatch.setattr(ToyPolicy, "from_config", classmethod(half_eta))
    (row,) = linear_rows(gaussian_mlp, 0.2, AM_SMALL, samplers=("ddim",), **AM)
    print(row)
    assert not 0.9 <= row["implied_alpha"] / row["alpha_ref"] <= 1.1


def test_merged_copy_is_the_lora_models_function_and_leaves_it_unmerged(gaussian_mlp):
    """The report samples trained LoRAs through ``merged_copy`` (base-MLP cost): it must compute what the
    adapter computes, and the LoRA model the blend reads must keep its unmerged, non-zero adapter."""
    import torch

    from diffusion_blend.validation.toy import merged_copy, train_dpok_lora

    model = train_dpok_lora(gaussian_mlp, lambda x: x[:, 0], 0.2, iterations=2, batch=16, steps=4, rank=4)
    with torch.no_grad():
        for layer in (m for m in model.modules() if hasattr(m, "lora_B")):
            layer.lora_B["default"].weight.normal_(0, 0.3)  # a visible adapter whatever two updates did
        x, t = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), torch.arange(0, 1000, 1000 // 64)[:64]
        before = model(x, t)
        merged = merged_copy(model)
        assert (before - gaussian_mlp(x, t)).abs().max() > 1e-2  # the adapter changes the output
        assert torch.allclose(merged(x, t), before, atol=1e-5, rtol=1e-5)
        layers = [m for m in merged.modules() if hasattr(m, "lora_B")]
        assert layers and all(m.merged for m in layers)  # merged: no adapter matmuls at sampling time
        assert not any(m.merged for m in model.modules() if hasattr(m, "lora_B"))
        assert torch.equal(model(x, t), before)
