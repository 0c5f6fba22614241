"""The shipped example configs load, validate (with local paths filled in) and mirror the paper."""

from pathlib import Path

import pytest

from diffusion_blend.training.config import load_config, validate

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("sd15_*.yaml"))  # the paper's; demo_tiny: test_demo


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_config(path, tiny_base, tmp_path):
    overrides = ["--base.path", str(tiny_base["diffusers"])]
    cfg = load_config(path)
    for name in cfg.rewards:
        if name in cfg.reward_options:
            overrides += [f"--reward_options.{name}.path", str(tmp_path)]
    cfg = load_config(path, overrides)
    validate(cfg)
    assert cfg.lora.rank == 4 and cfg.lr == 1e-5 and cfg.sampling.steps == 50 and cfg.sampling.eta == 1.0
    assert cfg.algorithm.kl_weight / cfg.algorithm.reward_weight == pytest.approx(1e-4)
    assert cfg.algorithm.clip_range == 1e-4 and cfg.max_grad_norm == 0.1 and cfg.sampling.guidance == 7.5


def test_one_config_per_reward():
    from diffusion_blend.training.rewards import REWARDS

    assert {p.stem.removeprefix("sd15_") for p in CONFIGS} >= set(REWARDS)


def test_numbers_are_read_as_the_fields_type(tmp_path):
    """PyYAML reads ``1e-5`` as a string; the config reads it as the float the user meant."""
    from diffusion_blend.training.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\nsteps: 3\nalgorithm: {kl_weight: 1, reward_weight: 1e3}\n")
    cfg = load_config(path, ["--max_grad_norm", "2e-1", "--lora.rank", "8"])
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float)
    assert cfg.algorithm.kl_weight == 1.0 and isinstance(cfg.algorithm.kl_weight, float)
    assert cfg.algorithm.reward_weight == 1000.0 and cfg.max_grad_norm == 0.2 and cfg.lora.rank == 8
    with pytest.raises(ConfigError, match="lr = 'fast': expected a number"):
        load_config(None, ["--lr", "fast"])
    with pytest.raises(ConfigError, match="steps = 2.5: expected an integer"):
        load_config(None, ["--steps", "2.5"])
