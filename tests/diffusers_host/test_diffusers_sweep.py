"""``diffusion-blend sweep --host diffusers``: the weight x KL grid from a diffusers pipeline in the
process (no server), written as the ComfyUI host's sweep writes it (``images/``, ``sweep.json``,
``grid.png``, ``tradeoff.png``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dkit import load_pipe, make_loras

from diffusion_blend.client.cli import main


@pytest.fixture(scope="module")
def loras(tiny_base, tmp_path_factory):
    pipe = load_pipe("SD1.5", tiny_base["diffusers"])
    return make_loras("SD1.5", pipe.unet, tmp_path_factory.mktemp("sweep_loras"))


def _sweep(tiny_base, loras, out, *extra):
    return main(["sweep", "--host", "diffusers", "--device", "cpu", "--ckpt", str(tiny_base["diffusers"]),
                 "--lora", str(loras[0]), "--lora", str(loras[1]), "--reward", "brightness", "--reward", "saturation",
                 "--steps", "2", "--size", "64", "--out", str(out), *extra])


def test_sweep_on_the_diffusers_host_writes_grid_tradeoff_and_json(tiny_base, loras, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert _sweep(tiny_base, loras, out, "--weights", "0,0.5,1", "--kl-scales", "0,1", "--images", "2") == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["spec"]["host"] == "diffusers" and summary["spec"]["rewards"] == ["brightness", "saturation"]
    assert [(c["kl_scale"], c["weights"][0]) for c in summary["cells"]] == [
        (lam, w) for lam in (0.0, 1.0) for w in (0.0, 0.5, 1.0)]
    assert len(list((out / "images").glob("*.png"))) == 12

    def png(name):
        return torch.from_numpy(np.array(Image.open(out / "images" / name)))

    # kl_scale 0 is the base whatever w (the same seed in every cell); at kl_scale 1 the weights matter
    assert torch.equal(png("kl0_w0_0.png"), png("kl0_w1_0.png"))
    assert not torch.equal(png("kl1_w0_0.png"), png("kl1_w1_0.png"))
    assert not torch.equal(png("kl0_w0_0.png"), png("kl1_w0_0.png"))
    grid = Image.open(out / "grid.png")
    assert grid.width > 3 * 64 and grid.height > 2 * 64 and (out / "tradeoff.png").exists()
    assert "Spearman" in capsys.readouterr().out


def test_sweep_with_smc_on_the_diffusers_host(tiny_base, loras, tmp_path):
    out = tmp_path / "sweep_smc"
    assert _sweep(tiny_base, loras, out, "--weights", "0.25,0.75", "--kl-scales", "1", "--smc", "4",
                  "--smc-score-every", "1", "--steps", "3") == 0
    summary = json.loads((out / "sweep.json").read_text())
    for cell in summary["cells"]:
        assert len(cell["rewards"]["brightness"]) == 4  # every particle is an image of the cell
        assert cell["smc"]["particles"] == 4 and len(cell["smc"]["ess_fraction"]) == 3 + 1
        assert cell["smc"]["resampled_at"][-1] == 3
    assert len(list((out / "images").glob("*.png"))) == 8


def test_sweep_on_the_diffusers_host_names_bad_inputs(tiny_base, loras, tmp_path, capsys):
    assert main(["sweep", "--host", "diffusers", "--ckpt", str(tmp_path), "--lora", str(loras[0]), "--lora",
                 str(loras[1]), "--reward", "brightness", "--reward", "saturation", "--out", str(tmp_path / "o")]) == 2
    assert "not a diffusers pipeline folder (no model_index.json)" in capsys.readouterr().err
    assert _sweep(tiny_base, [loras[0], tmp_path / "missing.safetensors"], tmp_path / "o") == 2
    assert "missing.safetensors: no such file" in capsys.readouterr().err
