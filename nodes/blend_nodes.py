"""ComfyUI nodes: ``DiffusionBlendBasis`` (collect LoRAs) and ``DiffusionBlend`` (patch a MODEL).

What the nodes do is in plain functions (:func:`add_basis`, :func:`blend_model`), which Python
callers and the tests use directly; the V3 node classes only declare the inputs and call them."""

from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.patcher_extension
import folder_paths

from ..blend.basis import Basis, chain_mismatch, make_basis
from ..blend.coefficients import blend_coefficients
from ..blend.lora_file import LoraFile, read_lora
from ..blend.runtime import MODES, make_plan, static_segment
from .cache import LruCache, memory_budget
from .comfy_wrapper import WRAPPER_KEY, BlendWrapper, bind_bank, merge_resident
from .schema import check_choices, io

CATEGORY = "diffusion_blend"
#: parsed LoRAs (their low-rank factors), bounded in bytes: DIFFUSION_BLEND_LORA_CACHE_MB, else 10 % of
#: RAM up to 4 GiB (real LoRAs are 10 MB - 1 GB each)
_LORA_CACHE: LruCache[LoraFile] = LruCache(32, memory_budget("DIFFUSION_BLEND_LORA_CACHE_MB", 0.10, 4 * 2**30),
                                           LoraFile.num_bytes)


def load_lora_cached(path: str) -> LoraFile:
    """Read a LoRA once per (path, size, mtime); its UNet tensors are kept (text-encoder keys are not)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    return _LORA_CACHE.get(key, lambda: read_lora(path, strict=False))


def lora_fingerprint(lora_name: str):
    """The file's identity (path, size, modification time): ComfyUI reuses a node's cached output
    while its inputs are the same, so a LoRA rewritten or truncated under the same name must count
    as a change, or the old weights would be used.  NaN (never equal to itself) when the file cannot
    be found or read: the node then runs and names the problem."""
    try:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        st = os.stat(path)
    except Exception:
        return float("nan")
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


def add_basis(lora_name: str, weight: float, alpha_ref: float,
              basis: tuple[Basis, ...] | None = None) -> tuple[Basis, ...]:
    """``basis`` with the LoRA ``lora_name`` (a name in ComfyUI's ``loras`` folders) appended."""
    path = folder_paths.get_full_path("loras", lora_name)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"lora_name={lora_name!r}: no such file in ComfyUI's loras folders (removed or "
                                "renamed after the workflow was queued?)")
    return tuple(basis or ()) + (make_basis(load_lora_cached(path), weight, alpha_ref),)


def blend_model(model, basis, kl_scale: float, normalize: bool, mode: str,
                start_percent: float = 0.0, end_percent: float = 1.0, seed: int = 0,
                merge_static: bool | None = None):
    """A clone of ``model`` whose prediction is the blend of ``basis``.

    ``merge_static`` (Python callers only): when every step evaluates the same one or two
    models and the base is not among them (lambda = 1 in exact mode, the merge), merge one of
    them into the weights at load time like the stock LoRA loader (one plain forward a call);
    the other is evaluated relative to it.  ``None`` (auto): on accelerators, where ComfyUI
    keeps a loaded model patched between runs; not on the CPU, where it patches and restores
    the weights around every sampling run (bench/blend_speed.py).  False keeps every delta in
    the hooks."""
    if merge_static is None:
        merge_static = comfy.model_management.get_torch_device().type != "cpu"
    if start_percent > end_percent:
        raise ValueError(f"start_percent={start_percent} > end_percent={end_percent}: expected start <= end")
    coefficients = tuple(blend_coefficients(
        [b.weight for b in basis], [b.alpha_ref for b in basis], kl_scale, normalize))
    make_plan(mode, coefficients)  # validates the mode (and stochastic's probabilities) now
    mismatch = chain_mismatch(basis)
    if mismatch is not None:
        logging.warning("[Diffusion Blend] %s", mismatch)
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    if model.get_wrappers(apply_model, WRAPPER_KEY):
        raise ValueError("model: it already carries a Diffusion Blend; chain all bases into one "
                         "Diffusion Blend node instead of blending a blended model")
    patched = model.clone()
    bank = bind_bank(patched, [b.lora for b in basis])
    resident = ()  # merged into the weights at load: every step's plan is the same, without the base
    if merge_static and start_percent <= 0.0 and end_percent >= 1.0:
        resident = static_segment(mode, coefficients) or ()
    if resident:
        merge_resident(patched, bank, resident)
    wrapper = BlendWrapper(
        bank=bank, coefficients=coefficients, mode=mode,
        start_percent=float(start_percent), end_percent=float(end_percent),
        seed=int(seed),
        alpha_refs=tuple(b.alpha_ref for b in basis),
        rewards=tuple(b.lora.reward for b in basis),
        resident=resident,
    )
    patched.add_wrapper_with_key(apply_model, WRAPPER_KEY, wrapper)
    return patched


BASIS = io.Custom("DB_BASIS")  #: a tuple of :class:`blend.basis.Basis`, chained from node to node


class DiffusionBlendBasis(io.ComfyNode):
    """One basis-reward LoRA with its user weight; chain several into a DB_BASIS list."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionBlendBasis",
            display_name="Diffusion Blend Basis (LoRA)",
            category=CATEGORY,
            description="Adds a basis-reward LoRA (reward weight, reference KL weight) to a Diffusion Blend.",
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"), tooltip=(
                    "A LoRA fine-tuned for one reward (safetensors; kohya, diffusers/peft or ComfyUI keys).")),
                io.Float.Input("weight", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Preference weight w_i of this reward. Negative values push away from it."),
                io.Float.Input("alpha_ref", default=0.0, min=0.0, max=1e6, step=1e-5, round=False,
                               tooltip="KL weight the LoRA was trained with. 0 reads db.alpha_ref from the file."),
                BASIS.Input("basis", optional=True, tooltip="Bases collected so far; this one is appended."),
            ],
            outputs=[BASIS.Output(display_name="basis", tooltip=(
                "The list of bases, to chain into another Basis node or into Diffusion Blend."))],
        )

    @classmethod
    def validate_inputs(cls, lora_name: str | None = None) -> bool | str:
        return check_choices(lora_name=(lora_name, folder_paths.get_filename_list("loras")))

    @classmethod
    def fingerprint_inputs(cls, lora_name: str, **_inputs):
        return lora_fingerprint(lora_name)

    @classmethod
    def execute(cls, lora_name: str, weight: float, alpha_ref: float,
                basis: tuple[Basis, ...] | None = None) -> io.NodeOutput:
        return io.NodeOutput(add_basis(lora_name, weight, alpha_ref, basis))


class DiffusionBlend(io.ComfyNode):
    """Replace the model's prediction by the KL-scaled blend of its basis LoRAs."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionBlend",
            display_name="Diffusion Blend",
            category=CATEGORY,
            description=("Diffusion Blend: eps = eps_base + sum_i c_i (eps_i - eps_base), c_i = w~_i alpha_ref_i / "
                         "alpha. Pick any reward weights and KL strength per image, no retraining."),
            inputs=[
                io.Model.Input("model", tooltip="The base model (the LoRAs' base). It is cloned, never changed."),
                BASIS.Input("basis", tooltip="Bases from Diffusion Blend Basis nodes."),
                io.Float.Input("kl_scale", default=1.0, min=0.0, max=100.0, step=0.01, tooltip=(
                    "lambda = alpha_ref / alpha: 1 = as trained, 0 = base model, >1 = weaker KL "
                    "(stronger alignment, extrapolates).")),
                io.Boolean.Input("normalize", default=True,
                                 tooltip="Divide the weights by their sum (the paper's simplex weights)."),
                io.Combo.Input("mode", options=list(MODES), default="exact", tooltip=(
                    "exact: all models in one batched forward (on the CPU one after the other, which is "
                    "faster there). sequential: same result, one model at a time (less memory). merged: one "
                    "forward with merged LoRA weights (Rewarded Soup, approximate). stochastic: one model drawn "
                    "per step (DB-MPA-LS).")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="Blend from this point of the schedule on."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="Blend up to this point; outside the range the base predicts."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, optional=True,
                             tooltip="Seed of the per-step model draw in stochastic mode."),
            ],
            outputs=[io.Model.Output(tooltip="A clone of the model whose prediction is the blend.")],
        )

    @classmethod
    def validate_inputs(cls, mode: str | None = None) -> bool | str:
        return check_choices(mode=(mode, MODES))

    @classmethod
    def execute(cls, model, basis, kl_scale: float, normalize: bool, mode: str, start_percent: float = 0.0,
                end_percent: float = 1.0, seed: int = 0) -> io.NodeOutput:
        return io.NodeOutput(blend_model(model, basis, kl_scale, normalize, mode, start_percent, end_percent, seed))


NODES: list[type[io.ComfyNode]] = [DiffusionBlendBasis, DiffusionBlend]
