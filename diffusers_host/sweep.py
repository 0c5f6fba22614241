"""The weight x KL sweep of ``diffusion-blend sweep --host diffusers``: cells rendered by a diffusers
pipeline in this process (no server), scored and written by :func:`..client.sweep.run_sweep` exactly as
the ComfyUI host's (``images/``, ``sweep.json``, ``grid.png``, ``tradeoff.png``)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import torch

from ..blend.coefficients import BlendInputError
from ..client.sweep import SweepSpec, quantized
from .blend import DiffusionBlend
from .smc import smc_sample

__all__ = ["DiffusersRenderer", "load_pipeline"]


def load_pipeline(folder: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a local folder (``model_index.json``), never from a hub."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise BlendInputError(f"--ckpt {folder}: not a diffusers pipeline folder (no model_index.json); with "
                              "--host diffusers give the folder of a pipeline saved by save_pretrained")
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in (
        (folder / "model_index.json").read_text()) else {}
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class DiffusersRenderer:
    """Renders the cells of a sweep on one pipeline with one :class:`DiffusionBlend` (the LoRAs loaded
    once; each cell sets its weights ``(w, 1 - w)`` and ``kl_scale``).  The same seed in every cell
    (common random numbers).  The pipeline's own scheduler runs, with ``eta = 1`` where the pipeline
    takes one (DDIM eta = 1: the chain the basis LoRAs are trained on); ``--smc N`` runs
    :func:`.smc.smc_sample` with N particles."""

    def __init__(self, pipe, spec: SweepSpec):
        self.pipe = pipe
        self.blend = DiffusionBlend(pipe, list(spec.loras), [1.0, 1.0], 1.0, mode=spec.mode)
        self._call_params = set(inspect.signature(type(pipe).__call__).parameters)

    def _kwargs(self, spec: SweepSpec) -> dict:
        kwargs = dict(num_inference_steps=spec.steps, guidance_scale=spec.cfg, height=spec.size, width=spec.size,
                      output_type="np")
        if spec.negative and "negative_prompt" in self._call_params:
            kwargs["negative_prompt"] = spec.negative
        if "eta" in self._call_params:
            kwargs["eta"] = 1.0
        return kwargs

    def render(self, spec: SweepSpec, w: float, kl_scale: float) -> tuple[list[torch.Tensor], dict | None]:
        self.blend.configure(weights=[w, 1.0 - w], kl_scale=kl_scale, mode=spec.mode)
        smc = None
        if spec.smc_particles > 0:
            kwargs = self._kwargs(spec)
            kwargs.pop("eta", None)
            output, log = smc_sample(self.pipe, spec.positive, blend=self.blend, particles=spec.smc_particles,
                                     rewards=list(spec.rewards), reward_options=spec.reward_options,
                                     score_every=spec.smc_score_every, seed=spec.seed, **kwargs)
            smc = {"ess_fraction": [s["ess_fraction"] for s in log.steps],
                   "resampled_at": [s["step"] for s in log.steps if s["resampled"]], "log_z": log.log_z}
        else:
            with torch.no_grad():
                output = self.pipe(spec.positive, num_images_per_prompt=spec.images,
                                   generator=torch.Generator().manual_seed(spec.seed),
                                   **self._kwargs(spec))
        images = [quantized(torch.from_numpy(np.asarray(img, dtype=np.float32))) for img in output.images]
        return images, smc

    def close(self) -> None:
        self.blend.remove()
