"""The blend on a diffusers pipeline: every call of ``pipe.unet`` / ``pipe.transformer`` returns

    eps = eps_base + sum_i c_i (eps_i - eps_base),     c_i = w~_i alpha_ref_i / alpha

(or the same combination of velocities / v-predictions: the combination is affine, so it holds for
whatever the network predicts).  The coefficients come from :mod:`..blend.coefficients`, the plan
(which models a call evaluates: exact / sequential / merged / stochastic, a step window) from
:mod:`..blend.runtime`, exactly as in the ComfyUI nodes; this module only finds the network, the batch
and the timestep in diffusers' calls.  The pipeline's own ``__call__`` (classifier-free guidance, its
scheduler, callbacks) runs unchanged around it, and nothing of the pipeline's weights is written:
the LoRAs' deltas are added by forward hooks (or merged copies swapped in for one forward) while a
call runs, and :meth:`DiffusionBlend.remove` leaves the pipeline as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Sequence

import torch
from torch import nn

from ..blend.basis import Basis, chain_mismatch, make_basis
from ..blend.coefficients import BlendInputError, blend_coefficients
from ..blend.lora_file import LoraFile, read_lora
from ..blend.memory import swap_pool
from ..blend.runtime import (MODES, BlendPlan, LowRankBank, Mode, combine, evaluate_plan, evaluate_segments,
                             make_plan, repeat_batch, with_base)
from .loras import denoiser_of, diffusers_deltas

__all__ = ["DiffusionBlend"]

_log = logging.getLogger(__name__)

#: keyword inputs that are per token, not per image (Flux's RoPE positions): never repeated along the batch
_UNBATCHED = frozenset({"img_ids", "txt_ids"})
#: the base alone
_BASE = BlendPlan(((),), (1.0,))


def _timestep_unit(denoiser: nn.Module, pipe) -> float:
    """What the denoiser's ``timestep`` input reads at pure noise, so that ``timestep / unit`` is the
    noise level in [0, 1] (1: pure noise): UNets take the discrete step ``t`` in ``[0, T - 1]``,
    Flux's transformer sigma itself, SD3's (and other flow transformers') ``T * sigma``."""
    train_steps = float(getattr(getattr(pipe, "scheduler", None), "config", {}).get("num_train_timesteps", 1000))
    name = type(denoiser).__name__
    if "UNet" in name:
        return train_steps - 1.0
    if name.startswith("Flux"):
        return 1.0
    return train_steps


def _output_type(denoiser: nn.Module):
    """The ``return_dict=True`` output class of the denoiser's forward."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    try:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput
    except ImportError:  # pragma: no cover - older diffusers
        return Transformer2DModelOutput
    return UNet2DConditionOutput if isinstance(denoiser, UNet2DConditionModel) else Transformer2DModelOutput


def _as_lora(item: str | os.PathLike | LoraFile) -> LoraFile:
    return item if isinstance(item, LoraFile) else read_lora(item, strict=False)


class DiffusionBlend:
    """Make ``pipe``'s denoiser predict the KL-scaled blend of basis LoRAs.

    Usage::

        blend = DiffusionBlend(pipe, ["aesthetic.safetensors", "pickscore.safetensors"], [0.7, 0.3], kl_scale=1.0)
        image = pipe(prompt).images[0]
        blend.remove()

    Args:
        pipe: a diffusers pipeline with a ``unet`` (SD1.x/2.x, SDXL) or ``transformer`` (SD3/SD3.5, Flux).
        loras: basis LoRA files (paths or parsed :class:`LoraFile`), any format diffusers' own loader
            reads for this pipeline, plus this project's exports.
        weights: the user weights ``w_i`` (one per LoRA; negative allowed).
        kl_scale: ``lambda = alpha_ref / alpha``: 1 as trained, 0 the base model, > 1 more reward.
        alpha_refs: each LoRA's KL weight; ``None`` or a 0 entry reads the file's ``db.alpha_ref``.
        normalize: divide the weights by their sum (the paper's simplex weights).
        mode: ``exact`` (every model, combined), ``sequential`` (the same, one model per forward),
            ``merged`` (one forward, merged weights: Rewarded Soup), ``stochastic`` (one model drawn
            per step with the affine coefficients as probabilities: DB-MPA-LS).
        window: ``(start, end)`` fractions of the schedule, 0 at pure noise and 1 at the clean
            sample, read from the denoiser's timestep (``1 - t / (T - 1)`` for UNets, ``1 - sigma``
            for flow models); outside it the base predicts.  This is ComfyUI's ``start_percent``/
            ``end_percent`` for SD1.x/SDXL; for shifted flow schedules ComfyUI's percent is in the
            unshifted time.
        seed: keys the per-step draw of ``stochastic`` (the same seed and step draw the same model).
        segments_per_call: how many models share one forward (``None``: all of them on accelerators,
            one at a time on the CPU, where that is faster; ``sequential`` is always 1).
    """

    def __init__(self, pipe, loras: Sequence[str | os.PathLike | LoraFile], weights: Sequence[float],
                 kl_scale: float = 1.0, *, alpha_refs: Sequence[float] | None = None, normalize: bool = True,
                 mode: Mode = "exact", window: tuple[float, float] = (0.0, 1.0), seed: int = 0,
                 segments_per_call: int | None = None):
        self.pipe = pipe
        self.attribute, self.denoiser = denoiser_of(pipe)
        self._check_free()
        files = [_as_lora(item) for item in loras]
        if len(weights) != len(files):
            raise BlendInputError(f"weights: expected one weight per LoRA ({len(files)}), got {len(weights)}")
        refs = list(alpha_refs) if alpha_refs is not None else [0.0] * len(files)
        if len(refs) != len(files):
            raise BlendInputError(f"alpha_refs: expected one value per LoRA ({len(files)}), got {len(refs)}")
        self.bases: tuple[Basis, ...] = tuple(make_basis(f, w, a) for f, w, a in zip(files, weights, refs))
        mismatch = chain_mismatch(self.bases)
        if mismatch is not None:
            _log.warning("[Diffusion Blend] %s", mismatch)
        self.segments_per_call = segments_per_call
        self._segments_cap: int | None = None  # lowered when a stacked forward runs out of memory
        # the settings configure() starts from; it validates them all
        self.kl_scale, self.normalize, self.mode, self.window, self.seed = 1.0, True, "exact", (0.0, 1.0), 0
        self.configure(kl_scale=kl_scale, normalize=normalize, mode=mode, window=window, seed=seed)
        self.bank = LowRankBank.from_deltas([diffusers_deltas(pipe, f) for f in files], self.denoiser,
                                            [f.name for f in files])
        self._pool_device: str | None = None
        self._use_pool_of(next(self.denoiser.parameters()).device)
        self._unit = _timestep_unit(self.denoiser, pipe)
        self._output = _output_type(self.denoiser)
        self._base_outputs: list[torch.Tensor] | None = None
        #: network forwards made through the blend so far (several models stacked in one forward count once)
        self.forwards = 0
        self.install()

    # --- what the blend stands for ----------------------------------------------------------------
    def configure(self, *, weights: Sequence[float] | None = None, kl_scale: float | None = None,
                  normalize: bool | None = None, mode: Mode | None = None,
                  window: tuple[float, float] | None = None, seed: int | None = None) -> None:
        """Change any setting of the blend in place (the LoRAs stay loaded): a sweep over weights and
        KL scales needs one :class:`DiffusionBlend`.  All or nothing: an invalid setting raises
        :class:`BlendInputError` and leaves the blend as it was."""
        bases = self.bases
        if weights is not None:
            if len(weights) != len(bases):
                raise BlendInputError(f"weights: expected one weight per LoRA ({len(bases)}), got {len(weights)}")
            bases = tuple(Basis(b.lora, float(w), b.alpha_ref) for b, w in zip(bases, weights))
        kl_scale = float(kl_scale) if kl_scale is not None else self.kl_scale
        normalize = bool(normalize) if normalize is not None else self.normalize
        mode = mode if mode is not None else self.mode
        if mode not in MODES:
            raise BlendInputError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
        start, end = window if window is not None else self.window
        if not 0.0 <= float(start) <= float(end) <= 1.0:
            raise BlendInputError(f"window=({start}, {end}): expected 0 <= start <= end <= 1")
        coefficients = tuple(blend_coefficients([b.weight for b in bases], [b.alpha_ref for b in bases],
                                                kl_scale, normalize))
        make_plan(mode, coefficients)  # validates stochastic's probabilities now
        self.bases, self.kl_scale, self.normalize, self.mode = bases, kl_scale, normalize, mode
        self.window, self.coefficients = (float(start), float(end)), coefficients
        self.seed = int(seed) if seed is not None else self.seed

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(b.weight for b in self.bases)

    @property
    def alpha_refs(self) -> tuple[float, ...]:
        return tuple(b.alpha_ref for b in self.bases)

    @property
    def rewards(self) -> tuple[str | None, ...]:
        return tuple(b.lora.reward for b in self.bases)

    # --- the forward --------------------------------------------------------------------------------
    def noise_level(self, timestep) -> float:
        """The denoiser's ``timestep`` input as a noise level in [0, 1] (1: pure noise)."""
        t = float(torch.as_tensor(timestep).reshape(-1)[0]) if timestep is not None else self._unit
        return t / self._unit

    def plan(self, timestep) -> BlendPlan:
        """The models one call at ``timestep`` evaluates and how it combines them."""
        level = self.noise_level(timestep)
        start, end = self.window
        if not start <= 1.0 - level <= end:
            return _BASE
        return make_plan(self.mode, self.coefficients, seed=self.seed, sigma=level)

    def _use_pool_of(self, device: torch.device) -> None:
        """The shared swap pool of the device kind the network runs on (none on accelerators unless
        ``DIFFUSION_BLEND_SWAP_MB`` is set), re-read when the pipeline moved to another kind."""
        if device.type != self._pool_device:
            self._pool_device = device.type
            self.bank.swap_pool = swap_pool(device)

    def _per_call(self, x: torch.Tensor, wanted: int) -> int:
        if self.mode == "sequential":
            return 1
        per_call = wanted if x.device.type != "cpu" else 1
        if self.segments_per_call is not None:
            per_call = max(1, min(wanted, self.segments_per_call))
        return per_call if self._segments_cap is None else min(per_call, self._segments_cap)

    def _out_of_memory(self, per_call: int) -> None:
        """A stacked forward ran out of memory: stack at most ``per_call`` models from now on."""
        _log.warning("[Diffusion Blend] a forward of several stacked models ran out of memory; retrying with "
                     "%d per forward (same result, more forwards)", per_call)
        self._segments_cap = per_call
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def forward(self, *args, **kwargs):
        """The denoiser's forward with the blend: same inputs and output type as the network's."""
        return_dict = kwargs.pop("return_dict", True)
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"{self.attribute}: the blend found no sample tensor in this call (first argument, "
                            "'sample' or 'hidden_states')")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        batch = sample.shape[0]
        self._use_pool_of(sample.device)
        inner = self._inner

        def run(k: int) -> torch.Tensor:
            self.forwards += 1
            if k == 1:
                return inner(*args, return_dict=False, **kwargs)[0]
            rep = lambda v: repeat_batch(v, k, batch)  # noqa: E731
            return inner(*(rep(a) for a in args), return_dict=False,
                         **{n: (v if n in _UNBATCHED else rep(v)) for n, v in kwargs.items()})[0]

        plan = self.plan(timestep)
        if self._base_outputs is not None:  # the SMC sampler reads the base's prediction of the same call
            full, base_index = with_base(plan)
            outputs = evaluate_segments(full, self.bank, self.denoiser, run, batch,
                                        self._per_call(sample, len(full.segments)), self._out_of_memory)
            base = outputs[base_index]
            out = combine(outputs[: len(plan.segments)], plan.weights)
            self._base_outputs.append(base.clone() if base is out else base)
        elif plan.is_plain:
            out = run(1)
        else:
            out = evaluate_plan(plan, self.bank, self.denoiser, run, batch, self._per_call(sample, len(plan.segments)),
                                self._out_of_memory)
        return self._output(sample=out) if return_dict else (out,)

    @contextlib.contextmanager
    def capture_base(self) -> Iterator[list[torch.Tensor]]:
        """While inside, every call also evaluates the base model (free when the blend evaluates it
        anyway, one more model in the forward otherwise) and appends its output to the list yielded."""
        outputs: list[torch.Tensor] = []
        self._base_outputs = outputs
        try:
            yield outputs
        finally:
            self._base_outputs = None

    # --- removal ------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        forward = self.denoiser.__dict__.get("forward")
        return isinstance(forward, _BlendForward) and forward.blend is self

    def _check_free(self) -> None:
        if isinstance(self.denoiser.__dict__.get("forward"), _BlendForward):
            raise BlendInputError(f"pipe: its {self.attribute} already carries a Diffusion Blend; remove() it first or "
                                  "put every basis into one DiffusionBlend")

    def install(self) -> None:
        """Put the blend on the pipeline's denoiser (done at construction; again after :meth:`remove`)."""
        if self.active:
            return
        self._check_free()
        self._saved_forward = self.denoiser.__dict__.get("forward")  # an accelerate hook, or None (the class's)
        self._inner = self.denoiser.forward
        self.denoiser.forward = _BlendForward(self)
        self._installed = True

    def remove(self) -> None:
        """Give the pipeline back as it was: its denoiser's forward restored.  The weights were never
        written, so every output is bit-identical to before.  The merged weight copies the blend made
        (CPU default) stay in the shared swap pool, within its budget (``DIFFUSION_BLEND_SWAP_MB``),
        until other blends need the room or this one is garbage collected; :meth:`install` reuses them."""
        if not self.active:
            if getattr(self, "_installed", False):
                raise BlendInputError(
                    f"pipe: another wrapper was put on the {self.attribute}'s forward after the blend (e.g. "
                    "accelerate's offload hooks); remove that first (pipe.remove_all_hooks()), or put such hooks on "
                    "before the blend")
            return
        if self._saved_forward is None:
            del self.denoiser.forward
        else:
            self.denoiser.forward = self._saved_forward
        self._installed = False

    def __enter__(self) -> "DiffusionBlend":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(f"{b.name} (w={b.weight:g}, alpha_ref={b.alpha_ref:g})" for b in self.bases)
        return (f"DiffusionBlend({self.attribute}: {names}; kl_scale={self.kl_scale:g}, mode={self.mode}, "
                f"c={[round(c, 4) for c in self.coefficients]})")


class _BlendForward:
    """The callable put in place of the denoiser's ``forward`` (an instance attribute, as accelerate's
    hooks do), so that :meth:`DiffusionBlend.remove` can tell it is the blend's."""

    def __init__(self, blend: DiffusionBlend):
        self.blend = blend

    def __call__(self, *args, **kwargs):
        return self.blend.forward(*args, **kwargs)
