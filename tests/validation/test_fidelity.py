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
