"""The sweep's pieces without a server: rank correlation, the labelled grid, the trade-off plot."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from diffusion_blend.blend.grid import image_grid, parse_labels
from diffusion_blend.client.sweep import plot_tradeoff, spearman


@pytest.mark.parametrize("seed", range(5))
def test_spearman_equals_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, 12).astype(float)
    y = x * 0.5 + rng.normal(size=12)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([0, 1, 2, 3, 4], [5, 6, 7, 8, 100]) == pytest.approx(1.0)
    assert np.isnan(spearman([1, 2, 3], [4, 4, 4]))


def test_grid_places_every_image_under_its_caption():
    imgs = torch.stack([torch.full((20, 30, 3), v) for v in (0.0, 0.25, 0.5, 0.75, 1.0)])
    grid = image_grid(imgs, 3, captions=[f"c{i}" for i in range(5)], row_labels=["r0", "r1"])
    plain = image_grid(imgs, 3)
    assert plain.shape == (2 * 22 + 2, 3 * 32 + 2, 3)  # 2 rows x 3 columns, 2 px gaps, no labels
    assert grid.shape[0] > plain.shape[0] and grid.shape[1] > plain.shape[1]
    # cell values survive exactly (8-bit)
    for i, v in enumerate((0.0, 0.25, 0.5, 0.75, 1.0)):
        r, c = divmod(i, 3)
        y, x = 2 + r * 22, 2 + c * 32
        assert torch.allclose(plain[y : y + 20, x : x + 30], torch.tensor(round(v * 255) / 255.0))
    titled = image_grid(imgs, 3, title=["what w weighs", "rows: lambda"])
    assert titled.shape[1] == plain.shape[1] and titled.shape[0] > plain.shape[0]  # the title goes above
    top = titled.shape[0] - plain.shape[0]
    assert torch.equal(titled[top:], plain) and titled[:top].min() < 1.0  # grid unchanged below, text drawn
    assert parse_labels(" a | b\nc ") == ["a", "b", "c"] and parse_labels("  ") == []
    with pytest.raises(ValueError, match="images"):
        image_grid(torch.zeros(2, 3, 8, 8), 2)


def test_tradeoff_plot_is_written(tmp_path):
    cells = [{"kl_scale": 1.0, "weights": [w, 1 - w], "mean": {"a": w, "b": 1 - w}, "se": {"a": 0.01, "b": 0.01}}
             for w in (0.0, 0.5, 1.0)]
    summary = {"spec": {"rewards": ["a", "b"], "loras": ["A", "B"], "kl_scales": [1.0]}, "cells": cells,
               "spearman_own_weight": {"a": {"1": 1.0}, "b": {"1": 1.0}}}
    plot_tradeoff(json.loads(json.dumps(summary)), tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000 and not list(tmp_path.glob("*.tmp*"))
