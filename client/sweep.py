"""Weight x KL-strength sweeps through a running ComfyUI: images, rewards, grid and trade-off plot.

For two basis LoRAs A and B, every cell ``(kl_scale, w)`` samples the same seeds with reward weights
``(w, 1 - w)``; the images are scored with the training package's reward registry (on the PNGs
the server wrote, as a user would see them).  Same seeds in every cell (common random numbers), so
differences between cells are the blend's, not the noise's.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..blend.grid import image_grid
from .api import ComfyClient
from .graph import Graph, txt2img
from .servers import spread

__all__ = ["SweepSpec", "ComfyRenderer", "run_sweep", "spearman", "plot_tradeoff", "quantized"]


@dataclass
class SweepSpec:
    ckpt: str
    loras: tuple[str, str]
    rewards: tuple[str, str]
    weights: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
    kl_scales: Sequence[float] = (1.0,)
    images: int = 4  # images per cell (one batch, one seed: the same noise in every cell)
    seed: int = 42
    steps: int = 50
    cfg: float = 7.5
    size: int = 512
    sampler: str = "ddpm"  # DDIM eta = 1 with leading spacing: the chain the LoRAs are trained on
    scheduler: str = "ddim_uniform"
    mode: str = "exact"
    positive: str = "a photo of a cat sitting in a garden"
    negative: str = ""
    reward_options: dict = field(default_factory=dict)  # reward -> {"path": ...}
    #: DB-SMC: > 0 samples every cell with the SMC sampler, this many particles (the cell's images)
    smc_particles: int = 0
    smc_score_every: int = 5
    #: who rendered the cells: "comfyui" (a server) or "diffusers" (a pipeline in the process)
    host: str = "comfyui"


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); ``nan`` if either side is constant."""

    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            r[order[i : j + 1]] = (i + j) / 2.0
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


SMC_REPORT = "smc_report"


def _smc_graph(spec: SweepSpec, chain) -> Graph:
    """The cell's graph with the DB-SMC sampler: ``smc_particles`` latents are the particles."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=spec.ckpt)
    model = chain(g, ckpt[0])
    pos = g.add("CLIPTextEncode", text=spec.positive, clip=ckpt[1])
    neg = g.add("CLIPTextEncode", text=spec.negative, clip=ckpt[1])
    smc = g.add("DiffusionBlendSMCSampler", vae=ckpt[2], score_every=spec.smc_score_every, resample_below=0.5,
                eta=1.0, rewards=",".join(spec.rewards), alpha=0.0, prompt=spec.positive, potential_on="blend",
                temper=True)
    sigmas = g.add("BasicScheduler", model=model, scheduler=spec.scheduler, steps=spec.steps, denoise=1.0)
    latent = g.add("EmptyLatentImage", width=spec.size, height=spec.size, batch_size=spec.smc_particles)
    sampled = g.add("SamplerCustom", model=model, add_noise=True, noise_seed=spec.seed, cfg=spec.cfg,
                    positive=pos[0], negative=neg[0], sampler=smc[0], sigmas=sigmas[0], latent_image=latent[0])
    g.add("DiffusionBlendSMCReport", node_id=SMC_REPORT, smc_log=smc[1], samples=sampled[0])
    decoded = g.add("VAEDecode", samples=sampled[0], vae=ckpt[2])
    g.add("SaveImage", node_id="save", images=decoded[0], filename_prefix="db_sweep_smc")
    return g


def _graph(spec: SweepSpec, w: float, kl_scale: float):
    def chain(g, model):
        a = g.add("DiffusionBlendBasis", lora_name=spec.loras[0], weight=w, alpha_ref=0.0)
        b = g.add("DiffusionBlendBasis", lora_name=spec.loras[1], weight=1.0 - w, alpha_ref=0.0, basis=a[0])
        return g.add("DiffusionBlend", model=model, basis=b[0], kl_scale=kl_scale, normalize=True, mode=spec.mode)[0]

    if spec.smc_particles > 0:
        return _smc_graph(spec, chain)
    return txt2img(spec.ckpt, seed=spec.seed, steps=spec.steps, cfg=spec.cfg, sampler_name=spec.sampler,
                   scheduler=spec.scheduler, width=spec.size, height=spec.size, batch_size=spec.images,
                   positive=spec.positive, negative=spec.negative, model_chain=chain, prefix="db_sweep")


def _to_tensor(png: bytes) -> torch.Tensor:
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)


class ComfyRenderer:
    """A sweep's cells rendered by a running ComfyUI (the graphs above), images read back from the PNGs
    the server wrote."""

    def __init__(self, client: ComfyClient, on_event: Callable[[str, dict], None] | None = None):
        self.client, self.on_event = client, on_event

    def render(self, spec: SweepSpec, w: float, kl_scale: float) -> tuple[list[torch.Tensor], dict | None]:
        """``(images (H, W, 3) in [0, 1], the SMC report or None)`` of one cell."""
        result = self.client.run(_graph(spec, w, kl_scale).prompt(), on_event=self.on_event)
        images = [_to_tensor(self.client.view(img)) for img in result.images]
        smc = None
        if spec.smc_particles > 0:
            report = result.history.get("outputs", {}).get(SMC_REPORT, {})
            smc = {"ess_fraction": report.get("ess", []), "resampled_at": report.get("resampled", []),
                   "log_z": (report.get("log_z") or [float("nan")])[0]}
        return images, smc


def quantized(image: torch.Tensor) -> torch.Tensor:
    """An image in [0, 1] as a user sees it: rounded to 8 bits, as a PNG holds it."""
    return (image.clamp(0, 1) * 255).round() / 255


def run_sweep(
    source,
    spec: SweepSpec,
    out_dir: str | os.PathLike,
    log: Callable[[str], None] = print,
    on_event: Callable[[str, dict], None] | None = None,
) -> dict:
    """Run every cell, write ``images/``, ``sweep.json``, ``grid.png`` and ``tradeoff.png``.

    ``source`` renders the cells: a :class:`ComfyClient` (a running ComfyUI), several (the cells are
    spread over the servers, a cell whose server dies is rendered by another: :func:`.servers.spread`),
    or any object with ``render(spec, w, kl_scale) -> (images, smc report or None)`` (the diffusers
    host's :class:`diffusion_blend.diffusers_host.sweep.DiffusersRenderer`).  The cells are scored in
    their order once rendered, so the outputs are the same whichever renders them."""
    from ..rewards import get_reward

    if spec.smc_particles < 0 or spec.smc_particles == 1:
        raise ValueError(f"smc: {spec.smc_particles} particles; expected 0 (no SMC) or at least 2")
    if len(spec.loras) != 2 or len(spec.rewards) != 2:
        raise ValueError(f"loras/rewards: a sweep takes exactly two bases, got {len(spec.loras)} LoRAs "
                         f"and {len(spec.rewards)} rewards")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    reward_fns = {r: get_reward(r, **spec.reward_options.get(r, {})) for r in dict.fromkeys(spec.rewards)}
    jobs = [(lam, w) for lam in spec.kl_scales for w in spec.weights]
    total = len(jobs)
    t0 = time.monotonic()

    def render(renderer, job: tuple[float, float]):
        lam, w = job
        result = renderer.render(spec, w, lam)
        where = f" on {renderer.client.url}" if isinstance(renderer, ComfyRenderer) else ""
        log(f"rendered kl_scale {lam:g}, w = ({w:g}, {1 - w:g}){where} [{time.monotonic() - t0:.1f}s]")
        return result

    clients = [source] if isinstance(source, ComfyClient) else source
    if isinstance(clients, (list, tuple)):
        renderers = [ComfyRenderer(c, on_event) for c in clients]
        rendered = spread(renderers, jobs, render, name=lambda r: r.client.url, log=log)
    else:
        rendered = [render(source, job) for job in jobs]
    cells, first_images = [], []
    for (lam, w), (images, smc) in zip(jobs, rendered):
        k = len(cells) + 1
        for j, img in enumerate(images):
            Image.fromarray((img.numpy() * 255).round().astype(np.uint8)).save(
                out / "images" / f"kl{lam:g}_w{w:g}_{j}.png")
        batch = torch.stack(images).permute(0, 3, 1, 2)
        scores = {r: [float(s) for s in fn(batch, [spec.positive] * len(images))] for r, fn in reward_fns.items()}
        cell = {
            "kl_scale": lam, "weights": [w, 1.0 - w],
            "rewards": scores,
            "mean": {r: float(np.mean(v)) for r, v in scores.items()},
            "se": {r: float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0 for r, v in scores.items()},
        }
        if smc is not None:
            cell["smc"] = {"particles": spec.smc_particles, **smc}
        cells.append(cell)
        first_images.append(images[0])
        means = ", ".join(f"{r} {m:.4f}" for r, m in cell["mean"].items())
        log(f"cell {k}/{total}: kl_scale {lam:g}, w = ({w:g}, {1 - w:g}): {means} "
            f"[{time.monotonic() - t0:.1f}s]")
    correlations = {}
    for idx, reward in enumerate(spec.rewards):
        correlations[reward] = {}
        for lam in spec.kl_scales:
            row = [c for c in cells if c["kl_scale"] == lam]
            own = [c["weights"][idx] for c in row]
            correlations[reward][f"{lam:g}"] = spearman(own, [c["mean"][reward] for c in row])
    summary = {
        "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.__dict__.items()},
        "cells": cells,
        "spearman_own_weight": correlations,
    }
    tmp = out / "sweep.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "sweep.json")
    a, b = spec.rewards
    grid = image_grid(torch.stack(first_images), len(spec.weights),
                      captions=[f"w={c['weights'][0]:g}" for c in cells],
                      row_labels=[f"λ={lam:g}" for lam in spec.kl_scales],
                      title=[f"w: weight of {a} (1 - w: {b}); rows: λ = kl_scale (KL weight α = ᾱ_ref/λ)",
                             "same seed in every cell; first image of each cell"])
    Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).save(out / "grid.png")
    plot_tradeoff(summary, out / "tradeoff.png")
    return summary


def plot_tradeoff(summary: dict, path: str | os.PathLike) -> None:
    """Mean reward of each basis against its own weight, one line per KL scale (error bars: SE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec, cells = summary["spec"], summary["cells"]
    rewards = spec["rewards"]
    fig, axes = plt.subplots(1, len(rewards), figsize=(5 * len(rewards), 3.6), squeeze=False)
    for idx, (reward, ax) in enumerate(zip(rewards, axes[0])):
        for lam in spec["kl_scales"]:
            row = sorted((c for c in cells if c["kl_scale"] == lam), key=lambda c: c["weights"][idx])
            x = [c["weights"][idx] for c in row]
            rho = summary["spearman_own_weight"][reward].get(f"{lam:g}", float("nan"))
            ax.errorbar(x, [c["mean"][reward] for c in row], yerr=[c["se"][reward] for c in row], marker="o",
                        capsize=3, label=f"λ = {lam:g}  (Spearman ρ = {rho:.2f})")
        lora = Path(str(spec["loras"][idx])).stem
        ax.set_title(f"{reward}  (basis LoRA {lora})", fontsize=9)
        ax.set_xlabel(f"weight w of {reward}")
        ax.set_ylabel(f"mean {reward} per cell")
        ax.legend(fontsize=7)
    method = f"DB-SMC, {spec['smc_particles']} particles" if spec.get("smc_particles") else "Diffusion Blend"
    per_cell = spec.get("images")
    fig.suptitle(f"{method}: each reward against its own weight, one line per λ (kl_scale)\n"
                 f"error bars: ±1 standard error of the cell mean{f' ({per_cell} images)' if per_cell else ''}; "
                 "ρ: rank correlation of the cell means with the weight", fontsize=8)
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
