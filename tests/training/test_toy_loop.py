"""The shipped loop on the toy family: the options the SD tests do not reach cheaply."""

import json

import pytest
import torch

from diffusion_blend.blend.basis import chain_mismatch, make_basis
from diffusion_blend.blend.lora_file import read_lora
from diffusion_blend.validation.toy import EpsMLP, toy_config, train_toy


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return EpsMLP(2, hidden=32, depth=2).eval()


def reward(x):
    return x[:, 0] - 0.5 * x[:, 1]


def test_clip_fraction_is_logged_and_warned_about(base, tmp_path, capsys):
    cfg = toy_config(1.0, tmp_path, iterations=3, batch=64, steps=5, lr=0.05, **{
        "algorithm.inner_epochs": 4, "algorithm.clip_range": 1e-6})
    result = train_toy(base, reward, cfg)
    assert all(0.0 <= e["clip_fraction"] <= 1.0 for e in result.history)
    assert result.history[-1]["clip_fraction"] > 0.5
    assert "warning: clip_fraction" in capsys.readouterr().err


def test_value_baseline_is_fitted_to_returns_in_reward_scale_units(base, tmp_path):
    cfg = toy_config(100.0, tmp_path, iterations=30, batch=256, steps=5, lr=1e-2, **{
        "algorithm.advantage": "value", "algorithm.value_lr": 1e-2})
    result = train_toy(base, lambda x: 100.0 * reward(x), cfg)  # a large raw scale
    losses = [e["value_loss"] for e in result.history]
    # the regression target is G / reward_scale (order one), so the value net fits it quickly
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 1.0
    meta = read_lora(result.lora_path).metadata
    assert meta["db.advantage"] == "value" and float(meta["db.alpha_ref"]) == 100.0
    assert float(meta["db.reward_scale"]) == pytest.approx(result.reward_scale)


def test_ddpo_on_the_toy_has_no_alpha_ref_and_records_its_chain(base, tmp_path):
    cfg = toy_config(1.0, tmp_path, iterations=2, batch=32, steps=4, **{"algorithm.name": "ddpo"})
    result = train_toy(base, reward, cfg)
    lora = read_lora(result.lora_path)
    assert lora.alpha_ref is None and lora.metadata["db.algorithm"] == "ddpo"
    assert lora.chain == {"sampler": "ddim", "eta": 1.0, "steps": 4, "spacing": "leading", "prediction": "epsilon"}
    assert all(e["kl_path"] == 0.0 for e in result.history)  # DDPO samples no reference


def test_bases_trained_on_different_chains_are_reported(base, tmp_path):
    loras = []
    for steps in (4, 6):
        cfg = toy_config(1.0, tmp_path / str(steps), iterations=1, batch=16, steps=steps)
        loras.append(read_lora(train_toy(base, reward, cfg).lora_path))
    same = [make_basis(loras[0], 1.0), make_basis(loras[0], 1.0)]
    assert chain_mismatch(same) is None
    message = chain_mismatch([make_basis(loras[0], 1.0), make_basis(loras[1], 1.0)])
    assert "steps differ" in message and "steps=4" in message and "steps=6" in message
    assert json.loads(loras[1].metadata["db.chain"])["steps"] == 6
