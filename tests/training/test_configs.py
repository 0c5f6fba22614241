"""The shipped example configs load, validate (with local paths filled in) and mirror the paper."""

import re
from pathlib import Path

import pytest

from diffusion_blend.training.config import load_config, validate

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
#: the DPOK configs (the paper's; demo_tiny: test_demo); ``*_am.yaml``: Adjoint Matching, below
CONFIGS = sorted(p for p in CONFIG_DIR.glob("sd15_*.yaml") if not p.stem.endswith("_am"))


def validated(path: Path, base: Path, tmp_path: Path):
    """The config at ``path`` with local paths filled in (the base, any learned reward's files), validated."""
    overrides = ["--base.path", str(base)]
    for name in load_config(path).reward_options:
        overrides += [f"--reward_options.{name}.path", str(tmp_path)]
    cfg = load_config(path, overrides)
    validate(cfg)
    return cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_config(path, tiny_base, tmp_path):
    cfg = validated(path, tiny_base["diffusers"], tmp_path)
    assert cfg.lora.rank == 4 and cfg.lr == 1e-5 and cfg.sampling.steps == 50 and cfg.sampling.eta == 1.0
    assert cfg.algorithm.alpha_ref > 0 and cfg.algorithm.kl_weight is None  # stated in raw reward units
    assert cfg.algorithm.clip_range == 1e-4 and cfg.max_grad_norm == 0.1 and cfg.sampling.guidance == 7.5


def test_one_config_per_reward():
    from diffusion_blend.rewards import REWARDS

    assert {p.stem.removeprefix("sd15_") for p in CONFIGS} >= set(REWARDS)
    assert {p.stem.removeprefix("sdxl_") for p in SDXL_CONFIGS} == set(REWARDS)
    for family in ("sd35", "flux"):
        assert {p.stem.removeprefix(f"{family}_") for p in FLOW_CONFIGS if p.stem.startswith(family)} == set(REWARDS)


SDXL_CONFIGS = sorted(p for p in CONFIG_DIR.glob("sdxl_*.yaml") if not p.stem.endswith("_am"))


@pytest.mark.parametrize("path", SDXL_CONFIGS, ids=lambda p: p.stem)
def test_sdxl_config(path, tiny_sdxl, tmp_path):
    """The SDXL configs validate on an SDXL base; they differ from SD1.5's in size and memory only."""
    sd15 = load_config(path.parent / path.name.replace("sdxl_", "sd15_"))
    cfg = validated(path, tiny_sdxl, tmp_path)
    assert cfg.sampling.resolution == 1024 and cfg.sampling.guidance == 5.0 and cfg.base.dtype == "bfloat16"
    assert cfg.gradient_checkpointing and cfg.offload_text_encoders and cfg.mixed_precision == "bf16"
    assert cfg.batch_size * cfg.grad_accum == sd15.batch_size * sd15.grad_accum
    assert (cfg.algorithm, cfg.lora, cfg.rewards, cfg.lr) == (sd15.algorithm, sd15.lora, sd15.rewards, sd15.lr)


def test_numbers_are_read_as_the_fields_type(tmp_path):
    """PyYAML reads ``1e-5`` as a string; the config reads it as the float the user meant."""
    from diffusion_blend.training.config import ConfigError, alpha_ref_of, load_config

    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\nsteps: 3\nalgorithm: {kl_weight: 1, reward_weight: 1e3}\n")
    cfg = load_config(path, ["--max_grad_norm", "2e-1", "--lora.rank", "8"])
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float)
    assert cfg.algorithm.kl_weight == 1.0 and isinstance(cfg.algorithm.kl_weight, float)
    assert cfg.algorithm.reward_weight == 1000.0 and cfg.max_grad_norm == 0.2 and cfg.lora.rank == 8
    assert alpha_ref_of(cfg.algorithm) == 1e-3  # the paper's beta / rho, converted
    with pytest.raises(ConfigError, match="lr = 'fast': expected a number"):
        load_config(None, ["--lr", "fast"])
    with pytest.raises(ConfigError, match="steps = 2.5: expected an integer"):
        load_config(None, ["--steps", "2.5"])


ALPHA_CASES = {
    "alpha_ref alone": ({"alpha_ref": 0.02}, 0.02),
    "beta / rho": ({"kl_weight": 0.1, "reward_weight": 1000.0}, 1e-4),
    "beta alone (rho = 1)": ({"kl_weight": 0.3}, 0.3),
    "both, consistent": ({"alpha_ref": 1e-4, "kl_weight": 0.1, "reward_weight": 1000.0}, 1e-4),
}


@pytest.mark.parametrize("case", list(ALPHA_CASES))
def test_alpha_ref_in_raw_units_from_either_spelling(case):
    from diffusion_blend.training.config import AlgorithmConfig, alpha_ref_of

    fields, expected = ALPHA_CASES[case]
    assert alpha_ref_of(AlgorithmConfig(**fields)) == pytest.approx(expected, rel=1e-12)
    assert alpha_ref_of(AlgorithmConfig(name="ddpo", **fields)) == 0.0


@pytest.mark.parametrize("fields,message", [
    ({}, "algorithm.alpha_ref = None: expected the KL weight in raw reward units"),
    ({"alpha_ref": 0.0}, "algorithm.alpha_ref = 0.0"),
    ({"alpha_ref": 1e-3, "kl_weight": 0.1, "reward_weight": 1000.0}, "disagrees with kl_weight / reward_weight"),
    ({"kl_weight": 0.1, "reward_weight": 0.0}, "algorithm.reward_weight = 0.0"),
    ({"alpha_ref": 0.1, "reward_scale": "sometimes"}, "algorithm.reward_scale = 'sometimes'"),
    ({"alpha_ref": 0.1, "reward_scale": -2.0}, "algorithm.reward_scale = -2.0"),
])
def test_bad_alpha_or_scale_is_refused_naming_the_field(fields, message):
    from diffusion_blend.training.config import AlgorithmConfig, ConfigError, TrainConfig, validate_training

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_training(TrainConfig(algorithm=AlgorithmConfig(**fields), prompts=["a"]))


@pytest.mark.parametrize("field,value", [
    ("prediction_type", "sample"), ("timestep_spacing", "linspace"), ("rescale_betas_zero_snr", True),
    ("beta_schedule", "sigmoid"),
])
def test_unsupported_scheduler_of_the_base_is_refused_naming_the_field(tiny_base, tmp_path, field, value):
    """The chain is read from the base; what the sampler cannot run fails before any compute."""
    import json
    import shutil

    from diffusion_blend.training.config import ConfigError

    base = tmp_path / "base"  # the tiny base's files, linked, with a scheduler config of its own
    base.mkdir()
    for child in Path(tiny_base["diffusers"]).iterdir():
        if child.name == "scheduler":
            shutil.copytree(child, base / child.name)
        else:
            (base / child.name).symlink_to(child)
    path = base / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    cfg = load_config(None, ["--base.path", str(base), "--prompts", "[a]", "--rewards", "{brightness: 1.0}",
                             "--algorithm.alpha_ref", "0.1"])
    with pytest.raises(ConfigError, match=f"scheduler_config.json: scheduler {field} = "):
        validate(cfg)


def test_module_entry_point_works_from_any_folder(tmp_path):
    """``python -m diffusion_blend.training`` (the installed name), not only from the repo root."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "diffusion_blend.training", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--resume" in res.stdout and "restamp" in res.stdout


FLOW_CONFIGS = sorted(p for family in ("sd35", "flux") for p in CONFIG_DIR.glob(f"{family}_*.yaml")
                      if not p.stem.endswith("_am"))
AM_CONFIGS = sorted(CONFIG_DIR.glob("*_am.yaml"))


def test_one_adjoint_matching_config_per_family_and_differentiable_reward():
    from diffusion_blend.rewards import DIFFERENTIABLE

    for family in ("sd15", "sdxl", "sd35", "flux"):
        names = {p.stem.removeprefix(f"{family}_").removesuffix("_am") for p in AM_CONFIGS if p.stem.startswith(family)}
        assert names == set(DIFFERENTIABLE), family


@pytest.mark.parametrize("path", AM_CONFIGS, ids=lambda p: p.stem)
def test_adjoint_matching_config(path, tiny_base, tiny_sdxl, tiny_sd3, tiny_flux, tmp_path):
    """Each validates on a base of its family and is its DPOK sibling's run (model, LoRA, memoryless
    chain, rewards, alpha_ref, batch, lr) with Adjoint Matching and a tenth of the updates."""
    family = path.stem.split("_", 1)[0]
    base = {"sd15": tiny_base["diffusers"], "sdxl": tiny_sdxl, "sd35": tiny_sd3, "flux": tiny_flux}[family]
    dpok = load_config(path.with_name(path.stem.removesuffix("_am") + ".yaml"))
    cfg = validated(path, base, tmp_path)
    assert cfg.algorithm.name == "adjoint_matching" and cfg.sampling.eta == 1.0
    assert cfg.algorithm.alpha_ref == dpok.algorithm.alpha_ref > 0 and cfg.steps * 10 == dpok.steps
    assert (cfg.base.dtype, cfg.lora, cfg.sampling, cfg.rewards, cfg.lr, cfg.batch_size * cfg.grad_accum) == (
        dpok.base.dtype, dpok.lora, dpok.sampling, dpok.rewards, dpok.lr, dpok.batch_size * dpok.grad_accum)


@pytest.mark.parametrize("path", FLOW_CONFIGS, ids=lambda p: p.stem)
def test_flow_family_config(path, tiny_sd3, tiny_flux, tmp_path):
    """The SD3.5 and Flux configs validate on a base of their family (the chain is read from it)."""
    base = tiny_sd3 if path.stem.startswith("sd35") else tiny_flux
    sd15 = load_config(path.parent / ("sd15_" + path.stem.split("_", 1)[1] + ".yaml"))
    cfg = validated(path, base, tmp_path)
    assert cfg.sampling.resolution == 1024 and cfg.sampling.steps == 28 and cfg.base.dtype == "bfloat16"
    assert cfg.sampling.guidance == (4.5 if path.stem.startswith("sd35") else 3.5)
    assert cfg.gradient_checkpointing and cfg.offload_text_encoders and cfg.mixed_precision == "bf16"
    assert (cfg.algorithm, cfg.lora, cfg.rewards, cfg.lr) == (sd15.algorithm, sd15.lora, sd15.rewards, sd15.lr)
