"""The project's example workflows: one Python definition each, written in both ComfyUI formats.

* **API format** (what ``POST /prompt`` takes): ``{id: {"class_type", "inputs", "_meta"}}``.
* **UI format** (what ComfyUI's *Save* writes and drag and drop loads): LiteGraph nodes with
  positions, sockets, links and ``widgets_values``.

Both are generated from the same :class:`~.graph.Graph`; the node schemas (which inputs are
sockets, the order of the widgets) come from a running server's ``/object_info``, so the UI files
match the host they were generated on.  :func:`api_from_ui` converts back, which the tests use to
prove the two never drift, and which lets ``diffusion-blend run`` take either format.

    python -m diffusion_blend.client.workflows --server http://127.0.0.1:8188 [--out DIR]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from .graph import Graph, Ref

__all__ = [
    "Models",
    "WORKFLOWS",
    "BIG_FAMILY_WORKFLOWS",
    "build",
    "to_ui",
    "api_from_ui",
    "load_api",
    "write_all",
    "is_ui_format",
    "WorkflowFormatError",
]

KL_SWEEP = (0.0, 0.5, 1.0, 2.0, 4.0)
WEIGHT_SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)


class WorkflowFormatError(ValueError):
    """A workflow file that cannot be read or converted."""


@dataclass(frozen=True)
class Models:
    """Model file names and sampling settings the workflows refer to (change them in the UI, or
    with ``diffusion-blend run --set``)."""

    ckpt: str = "tiny-sd15.safetensors"
    lora_a: str = "db_saturation.safetensors"
    lora_b: str = "db_jpeg_compressibility.safetensors"
    reward_a: str = "saturation"
    reward_b: str = "jpeg_compressibility"
    width: int = 512
    height: int = 512
    #: the chain the basis LoRAs are trained on (configs/sd15_*.yaml: DDIM eta = 1, 50 leading steps,
    #: CFG 7.5): ComfyUI's ddpm sampler on the ddim_uniform schedule runs that chain
    steps: int = 50
    cfg: float = 7.5
    sampler: str = "ddpm"
    scheduler: str = "ddim_uniform"
    seed: int = 42
    positive: str = "a photo of a cat sitting in a garden"
    negative: str = "blurry, low quality"
    input_image: str = "db_example.png"
    #: SDXL: a checkpoint with both text encoders, conditioned at the trained size with CLIPTextEncodeSDXL
    sdxl_ckpt: str = "sd_xl_base_1.0.safetensors"
    sdxl_lora_a: str = "db_sdxl_saturation.safetensors"
    sdxl_lora_b: str = "db_sdxl_jpeg_compressibility.safetensors"
    sdxl_size: int = 1024
    #: SD3.5: the checkpoint (diffusion model + VAE) and CLIP-L, CLIP-G, T5-XXL as separate files; the flow
    #: shift 3, CFG 4.5; euler_ancestral on the simple schedule is the chain the LoRAs are trained on
    #: (configs/sd35_*.yaml: ancestral flow steps on the model's shifted sigmas)
    sd35_ckpt: str = "sd3.5_large.safetensors"
    sd35_clip_l: str = "clip_l.safetensors"
    sd35_clip_g: str = "clip_g.safetensors"
    sd35_t5: str = "t5xxl_fp16.safetensors"
    sd35_lora_a: str = "db_sd35_saturation.safetensors"
    sd35_lora_b: str = "db_sd35_jpeg_compressibility.safetensors"
    sd35_size: int = 1024
    sd35_steps: int = 28
    sd35_cfg: float = 4.5
    sd35_shift: float = 3.0
    #: Flux-dev: the diffusion model, CLIP-L + T5-XXL and the VAE as separate files (ComfyUI's folders
    #: diffusion_models/, text_encoders/, vae/); distilled guidance instead of CFG, sampled by
    #: euler_ancestral on the simple schedule (the chain of configs/flux_*.yaml)
    flux_unet: str = "flux1-dev.safetensors"
    flux_clip_l: str = "clip_l.safetensors"
    flux_t5: str = "t5xxl_fp16.safetensors"
    flux_vae: str = "ae.safetensors"
    flux_lora_a: str = "db_flux_saturation.safetensors"
    flux_lora_b: str = "db_flux_jpeg_compressibility.safetensors"
    flux_size: int = 1024
    flux_steps: int = 28
    flux_guidance: float = 3.5
    #: DB-SMC: the latent batch is the particle system
    particles: int = 8
    smc_score_every: int = 5


# -- definitions -----------------------------------------------------------------------------------
def _loader(g: Graph, m: Models):
    ckpt = g.add("CheckpointLoaderSimple", _title="Load Checkpoint", ckpt_name=m.ckpt)
    pos = g.add("CLIPTextEncode", _title="Positive", text=m.positive, clip=ckpt[1])
    neg = g.add("CLIPTextEncode", _title="Negative", text=m.negative, clip=ckpt[1])
    return ckpt, pos, neg


def _bases(g: Graph, m: Models, w_a: float, w_b: float, suffix: str = "") -> Ref:
    a = g.add("DiffusionBlendBasis", _title=f"Basis A ({m.reward_a}){suffix}", lora_name=m.lora_a, weight=w_a,
              alpha_ref=0.0)
    return g.add("DiffusionBlendBasis", _title=f"Basis B ({m.reward_b}){suffix}", lora_name=m.lora_b, weight=w_b,
                 alpha_ref=0.0, basis=a[0])


def _blend(g: Graph, model, basis: Ref, kl_scale: float, title: str = "Diffusion Blend") -> Ref:
    return g.add("DiffusionBlend", _title=title, model=model, basis=basis[0], kl_scale=kl_scale, normalize=True,
                 mode="exact", start_percent=0.0, end_percent=1.0, seed=0)


def _sampler(g: Graph, m: Models, model, pos: Ref, neg: Ref, latent, title="KSampler", denoise=1.0) -> Ref:
    return g.add("KSampler", _title=title, model=model, seed=m.seed, steps=m.steps, cfg=m.cfg,
                 sampler_name=m.sampler, scheduler=m.scheduler, positive=pos[0], negative=neg[0], latent_image=latent,
                 denoise=denoise)


def _batch_latents(g: Graph, latents: list) -> Any:
    out = latents[0]
    for i, nxt in enumerate(latents[1:], start=2):
        out = g.add("LatentBatch", _title=f"Batch {i}", samples1=out, samples2=nxt)[0]
    return out


def _decoded_grid(g: Graph, m: Models, ckpt: Ref, latents: list, labels: list[str], prefix: str,
                  scored: bool = False) -> None:
    """Batch the latents, decode once, (score,) lay out as a labelled grid and save."""
    images = g.add("VAEDecode", _title="VAE Decode", samples=_batch_latents(g, latents), vae=ckpt[2])
    if scored:
        _scores(g, m, images[0])
    grid = g.add("DiffusionBlendImageGrid", _title="Grid", images=images[0], columns=0, labels="\n".join(labels))
    g.add("SaveImage", _title="Save", images=grid[0], filename_prefix=f"diffusion_blend/{prefix}")


def _scores(g: Graph, m: Models, images) -> None:
    for reward in (m.reward_a, m.reward_b):
        g.add("DiffusionBlendScore", _title=f"Score {reward}", images=images, reward=reward, prompt=m.positive,
              model_path="", batch_size=8)


def blend_txt2img(m: Models) -> Graph:
    """Two-reward blend, text to image, with both rewards scored on the node."""
    g = Graph()
    ckpt, pos, neg = _loader(g, m)
    model = _blend(g, ckpt[0], _bases(g, m, 0.5, 0.5), 1.0)
    latent = g.add("EmptyLatentImage", _title="Image size", width=m.width, height=m.height, batch_size=1)
    sampled = _sampler(g, m, model[0], pos, neg, latent[0])
    images = g.add("VAEDecode", _title="VAE Decode", samples=sampled[0], vae=ckpt[2])
    g.add("SaveImage", _title="Save", images=images[0], filename_prefix="diffusion_blend/txt2img")
    _scores(g, m, images[0])
    return g


def blend_txt2img_sdxl(m: Models) -> Graph:
    """SDXL: two-reward blend, text to image; both text encoders conditioned at the image size."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", _title="Load SDXL Checkpoint", ckpt_name=m.sdxl_ckpt)
    size = dict(width=m.sdxl_size, height=m.sdxl_size, crop_w=0, crop_h=0, target_width=m.sdxl_size,
                target_height=m.sdxl_size)
    pos = g.add("CLIPTextEncodeSDXL", _title="Positive", text_g=m.positive, text_l=m.positive, clip=ckpt[1], **size)
    neg = g.add("CLIPTextEncodeSDXL", _title="Negative", text_g=m.negative, text_l=m.negative, clip=ckpt[1], **size)
    bases = _bases(g, replace(m, lora_a=m.sdxl_lora_a, lora_b=m.sdxl_lora_b), 0.5, 0.5)
    model = _blend(g, ckpt[0], bases, 1.0)
    latent = g.add("EmptyLatentImage", _title="Image size", width=m.sdxl_size, height=m.sdxl_size, batch_size=1)
    sampled = _sampler(g, m, model[0], pos, neg, latent[0])
    images = g.add("VAEDecode", _title="VAE Decode", samples=sampled[0], vae=ckpt[2])
    g.add("SaveImage", _title="Save", images=images[0], filename_prefix="diffusion_blend/txt2img_sdxl")
    _scores(g, m, images[0])
    return g


def blend_txt2img_flux(m: Models) -> Graph:
    """Flux-dev: two-reward blend, text to image, with distilled guidance (FluxGuidance) and CFG 1."""
    g = Graph()
    unet = g.add("UNETLoader", _title="Load Diffusion Model", unet_name=m.flux_unet, weight_dtype="default")
    clip = g.add("DualCLIPLoader", _title="Load CLIP-L + T5", clip_name1=m.flux_clip_l, clip_name2=m.flux_t5,
                 type="flux", device="default")
    vae = g.add("VAELoader", _title="Load VAE", vae_name=m.flux_vae)
    text = g.add("CLIPTextEncode", _title="Prompt", text=m.positive, clip=clip[0])
    pos = g.add("FluxGuidance", _title="Guidance", conditioning=text[0], guidance=m.flux_guidance)
    neg = g.add("ConditioningZeroOut", _title="No negative (CFG 1)", conditioning=text[0])
    bases = _bases(g, replace(m, lora_a=m.flux_lora_a, lora_b=m.flux_lora_b), 0.5, 0.5)
    model = _blend(g, unet[0], bases, 1.0)
    latent = g.add("EmptySD3LatentImage", _title="Image size", width=m.flux_size, height=m.flux_size, batch_size=1)
    sampled = _sampler(g, replace(m, steps=m.flux_steps, cfg=1.0, sampler="euler_ancestral", scheduler="simple"),
                       model[0], pos, neg, latent[0])
    images = g.add("VAEDecode", _title="VAE Decode", samples=sampled[0], vae=vae[0])
    g.add("SaveImage", _title="Save", images=images[0], filename_prefix="diffusion_blend/txt2img_flux")
    _scores(g, m, images[0])
    return g


def blend_txt2img_sd35(m: Models) -> Graph:
    """SD3.5: two-reward blend, text to image, CFG, the flow shift set explicitly (ModelSamplingSD3)."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", _title="Load SD3.5 Checkpoint", ckpt_name=m.sd35_ckpt)
    clip = g.add("TripleCLIPLoader", _title="Load CLIP-L + CLIP-G + T5", clip_name1=m.sd35_clip_l,
                 clip_name2=m.sd35_clip_g, clip_name3=m.sd35_t5)
    pos = g.add("CLIPTextEncode", _title="Positive", text=m.positive, clip=clip[0])
    neg = g.add("CLIPTextEncode", _title="Negative", text=m.negative, clip=clip[0])
    shifted = g.add("ModelSamplingSD3", _title="Flow shift", model=ckpt[0], shift=m.sd35_shift)
    bases = _bases(g, replace(m, lora_a=m.sd35_lora_a, lora_b=m.sd35_lora_b), 0.5, 0.5)
    model = _blend(g, shifted[0], bases, 1.0)
    latent = g.add("EmptySD3LatentImage", _title="Image size", width=m.sd35_size, height=m.sd35_size, batch_size=1)
    sampled = _sampler(g, replace(m, steps=m.sd35_steps, cfg=m.sd35_cfg, sampler="euler_ancestral",
                                  scheduler="simple"), model[0], pos, neg, latent[0])
    images = g.add("VAEDecode", _title="VAE Decode", samples=sampled[0], vae=ckpt[2])
    g.add("SaveImage", _title="Save", images=images[0], filename_prefix="diffusion_blend/txt2img_sd35")
    _scores(g, m, images[0])
    return g


def kl_sweep(m: Models) -> Graph:
    """One prompt and seed at several KL strengths lambda (0 = base model, 1 = as trained)."""
    g = Graph()
    ckpt, pos, neg = _loader(g, m)
    basis = _bases(g, m, 0.5, 0.5)
    latent = g.add("EmptyLatentImage", _title="Image size", width=m.width, height=m.height, batch_size=1)
    latents = []
    for lam in KL_SWEEP:
        model = _blend(g, ckpt[0], basis, lam, title=f"Diffusion Blend λ={lam:g}")
        latents.append(_sampler(g, m, model[0], pos, neg, latent[0], title=f"KSampler λ={lam:g}")[0])
    _decoded_grid(g, m, ckpt, latents, [f"kl_scale {lam:g}" for lam in KL_SWEEP], "kl_sweep")
    return g


def weight_sweep(m: Models) -> Graph:
    """Reward weights (w, 1 - w) across the simplex at lambda = 1, as one labelled grid, scored."""
    g = Graph()
    ckpt, pos, neg = _loader(g, m)
    latent = g.add("EmptyLatentImage", _title="Image size", width=m.width, height=m.height, batch_size=1)
    latents = []
    for w in WEIGHT_SWEEP:
        basis = _bases(g, m, w, 1.0 - w, suffix=f" w={w:g}")
        model = _blend(g, ckpt[0], basis, 1.0, title=f"Diffusion Blend w={w:g}")
        latents.append(_sampler(g, m, model[0], pos, neg, latent[0], title=f"KSampler w={w:g}")[0])
    _decoded_grid(g, m, ckpt, latents, [f"{m.reward_a} {w:g} / {m.reward_b} {1 - w:g}" for w in WEIGHT_SWEEP],
                  "weight_sweep", scored=True)
    return g


def img2img_blend(m: Models) -> Graph:
    """Image to image (denoise 0.6) with the blend."""
    g = Graph()
    ckpt, pos, neg = _loader(g, m)
    model = _blend(g, ckpt[0], _bases(g, m, 0.5, 0.5), 1.0)
    image = g.add("LoadImage", _title="Load Image", image=m.input_image)
    latent = g.add("VAEEncode", _title="VAE Encode", pixels=image[0], vae=ckpt[2])
    sampled = _sampler(g, m, model[0], pos, neg, latent[0], denoise=0.6)
    images = g.add("VAEDecode", _title="VAE Decode", samples=sampled[0], vae=ckpt[2])
    g.add("SaveImage", _title="Save", images=images[0], filename_prefix="diffusion_blend/img2img")
    return g


def lora_stack_vs_blend(m: Models) -> Graph:
    """Stock LoRA stack (weights merged, 0.5 + 0.5) next to Diffusion Blend (w = 1/2, 1/2, lambda = 1)."""
    g = Graph()
    ckpt, pos, neg = _loader(g, m)
    latent = g.add("EmptyLatentImage", _title="Image size", width=m.width, height=m.height, batch_size=1)
    a = g.add("LoraLoaderModelOnly", _title=f"LoRA {m.reward_a} 0.5", model=ckpt[0], lora_name=m.lora_a,
              strength_model=0.5)
    b = g.add("LoraLoaderModelOnly", _title=f"LoRA {m.reward_b} 0.5", model=a[0], lora_name=m.lora_b,
              strength_model=0.5)
    stacked = _sampler(g, m, b[0], pos, neg, latent[0], title="KSampler LoRA stack")
    blended = _blend(g, ckpt[0], _bases(g, m, 0.5, 0.5), 1.0)
    blend_sampled = _sampler(g, m, blended[0], pos, neg, latent[0], title="KSampler Diffusion Blend")
    _decoded_grid(g, m, ckpt, [stacked[0], blend_sampled[0]], ["stock LoRA stack", "Diffusion Blend"],
                  "stack_vs_blend")
    return g


def smc_blend(m: Models) -> Graph:
    """DB-SMC: the blend as the proposal, corrected by sequential Monte Carlo toward the exact tilted
    target; the latent batch holds the particles (equally weighted at the end), the report shows the
    ESS per step, and both rewards are scored."""
    g = Graph()
    ckpt, pos, neg = _loader(g, m)
    model = _blend(g, ckpt[0], _bases(g, m, 0.5, 0.5), 1.0)
    smc = g.add("DiffusionBlendSMCSampler", _title="Diffusion Blend SMC Sampler", vae=ckpt[2],
                score_every=m.smc_score_every, resample_below=0.5, eta=1.0, rewards="", alpha=0.0, prompt=m.positive,
                potential_on="blend", temper=True, resampling="systematic", adaptive_ess=0.0, moves=0, move_step=0.5)
    sigmas = g.add("BasicScheduler", _title="Schedule (the LoRAs' chain)", model=model[0], scheduler=m.scheduler,
                   steps=m.steps, denoise=1.0)
    latent = g.add("EmptyLatentImage", _title="Particles", width=m.width, height=m.height, batch_size=m.particles)
    sampled = g.add("SamplerCustom", _title="SamplerCustom", model=model[0], add_noise=True, noise_seed=m.seed,
                    cfg=m.cfg, positive=pos[0], negative=neg[0], sampler=smc[0], sigmas=sigmas[0],
                    latent_image=latent[0])
    g.add("DiffusionBlendSMCReport", _title="SMC Report", smc_log=smc[1], samples=sampled[0])
    images = g.add("VAEDecode", _title="VAE Decode", samples=sampled[0], vae=ckpt[2])
    _scores(g, m, images[0])
    grid = g.add("DiffusionBlendImageGrid", _title="Particles", images=images[0], columns=4, labels="")
    g.add("SaveImage", _title="Save", images=grid[0], filename_prefix="diffusion_blend/smc_blend")
    return g


WORKFLOWS: dict[str, Callable[[Models], Graph]] = {
    "blend_txt2img": blend_txt2img,
    "smc_blend": smc_blend,
    "kl_sweep": kl_sweep,
    "weight_sweep": weight_sweep,
    "img2img_blend": img2img_blend,
    "lora_stack_vs_blend": lora_stack_vs_blend,
    "blend_txt2img_sdxl": blend_txt2img_sdxl,
    "blend_txt2img_flux": blend_txt2img_flux,
    "blend_txt2img_sd35": blend_txt2img_sd35,
}
#: workflows for model families the tiny test host cannot load (full-size text encoders and detection)
BIG_FAMILY_WORKFLOWS = ("blend_txt2img_sdxl", "blend_txt2img_flux", "blend_txt2img_sd35")


def build(name: str, models: Models | None = None) -> dict:
    """The API-format prompt of workflow ``name``."""
    if name not in WORKFLOWS:
        raise WorkflowFormatError(f"workflow {name!r}: expected one of {', '.join(WORKFLOWS)}")
    return WORKFLOWS[name](models or Models()).prompt()


# -- node schemas ----------------------------------------------------------------------------------
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@dataclass(frozen=True)
class _Input:
    name: str
    type: str
    widget: bool
    extra_default: tuple  # values after this widget's own in widgets_values (control_after_generate, upload)


def _schema(info: dict, class_type: str) -> tuple[list[_Input], list[tuple[str, str]]]:
    """(inputs in widget order, outputs as (name, type)) of a node class from ``/object_info``."""
    node = info.get(class_type)
    if node is None:
        raise WorkflowFormatError(f"node type {class_type!r} is not known to this ComfyUI server "
                                  "(is the custom node installed?)")
    order = node.get("input_order") or {k: list(v) for k, v in node.get("input", {}).items()}
    inputs: list[_Input] = []
    for section in ("required", "optional"):
        specs = node.get("input", {}).get(section, {})
        for name in order.get(section, []):
            spec = specs[name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            type_name = "COMBO" if isinstance(kind, list) else str(kind)
            widget = type_name in WIDGET_TYPES and not options.get("forceInput")
            extra: tuple = ()
            if widget and (options.get("control_after_generate") or (type_name == "INT" and name in ("seed", "noise_seed"))):
                extra = ("fixed",)
            elif widget and options.get("image_upload"):
                extra = ("image",)
            inputs.append(_Input(name, type_name, widget, extra))
    outputs = list(zip(node.get("output_name", node.get("output", [])), node.get("output", [])))
    return inputs, outputs


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# -- API -> UI -------------------------------------------------------------------------------------
def _depths(prompt: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str, stack: tuple = ()) -> int:
        if node_id in depth:
            return depth[node_id]
        if node_id in stack:
            raise WorkflowFormatError(f"node {node_id}: the graph has a cycle")
        sources = [v[0] for v in prompt[node_id]["inputs"].values() if _is_link(v)]
        depth[node_id] = 0 if not sources else 1 + max(visit(s, stack + (node_id,)) for s in sources)
        return depth[node_id]

    for node_id in prompt:
        visit(node_id)
    return depth


def to_ui(prompt: dict, info: dict, *, name: str = "", description: str = "") -> dict:
    """The UI-format workflow of an API-format ``prompt`` (node ids must be integers)."""
    depth = _depths(prompt)
    order = sorted(prompt, key=lambda n: (depth[n], int(n)))
    links: list[list] = []
    nodes: list[dict] = []
    outputs_of: dict[str, list[dict]] = {}
    schemas = {n: _schema(info, prompt[n]["class_type"]) for n in prompt}
    for node_id in prompt:
        outputs_of[node_id] = [{"name": oname, "type": otype, "slot_index": k, "links": []}
                               for k, (oname, otype) in enumerate(schemas[node_id][1])]
    column_y: dict[int, float] = {}
    for rank, node_id in enumerate(order):
        node = prompt[node_id]
        inputs, _ = schemas[node_id]
        ui_inputs, widgets = [], []
        known = {i.name for i in inputs}
        unknown = set(node["inputs"]) - known
        if unknown:
            raise WorkflowFormatError(f"node {node_id} ({node['class_type']}): unknown inputs {sorted(unknown)}")
        for inp in inputs:
            value = node["inputs"].get(inp.name)
            if inp.widget:
                if value is None:
                    raise WorkflowFormatError(f"node {node_id} ({node['class_type']}): widget {inp.name!r} has no value")
                if _is_link(value):
                    raise WorkflowFormatError(f"node {node_id}: widget {inp.name!r} driven by a link is not supported here")
                widgets.append(value)
                widgets.extend(inp.extra_default)
                continue
            link_id = None
            if value is not None:
                if not _is_link(value):
                    raise WorkflowFormatError(f"node {node_id}: socket {inp.name!r} needs a link, got {value!r}")
                src, slot = value
                link_id = len(links) + 1
                links.append([link_id, int(src), slot, int(node_id), len(ui_inputs), inp.type])
                outputs_of[src][slot]["links"].append(link_id)
            ui_inputs.append({"name": inp.name, "type": inp.type, "link": link_id})
        n_rows = max(len(ui_inputs), len(outputs_of[node_id]))
        height = 30 + 22 * n_rows + sum(26 + (60 if isinstance(w, str) and "\n" in w else 0) for w in widgets)
        if node["class_type"] in ("SaveImage", "PreviewImage"):
            height = max(height, 300)
        col = depth[node_id]
        y = column_y.get(col, 50.0)
        column_y[col] = y + height + 40
        ui_node = {
            "id": int(node_id),
            "type": node["class_type"],
            "pos": [50 + 360 * col, y],
            "size": [320, height],
            "flags": {},
            "order": rank,
            "mode": 0,
            "inputs": ui_inputs,
            "outputs": outputs_of[node_id],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets,
        }
        title = node.get("_meta", {}).get("title")
        if title:
            ui_node["title"] = title
        nodes.append(ui_node)
    for ui_node in nodes:  # LiteGraph writes null, not [], for an unlinked output
        for out in ui_node["outputs"]:
            out["links"] = out["links"] or None
    nodes.sort(key=lambda n: n["id"])
    return {
        "last_node_id": max(n["id"] for n in nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"diffusion_blend": {"name": name, "description": description}},
        "version": 0.4,
    }


# -- UI -> API -------------------------------------------------------------------------------------
def is_ui_format(data: dict) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def api_from_ui(ui: dict, info: dict) -> dict:
    """The API-format prompt of a UI-format workflow (muted nodes dropped; no groups/subgraphs,
    primitives or reroutes: use ComfyUI's *Export (API)* for those)."""
    link_src = {}
    for link in ui.get("links", []):
        if isinstance(link, dict):
            link_src[link["id"]] = (str(link["origin_id"]), link["origin_slot"])
        else:
            link_src[link[0]] = (str(link[1]), link[2])
    prompt: dict[str, dict] = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) == 2:  # muted
            continue
        if node.get("mode", 0) == 4:
            raise WorkflowFormatError(f"node {node['id']} ({node['type']}) is bypassed; convert with Export (API)")
        if node["type"] in ("Reroute", "PrimitiveNode", "Note", "MarkdownNote"):
            if node["type"] in ("Note", "MarkdownNote"):
                continue
            raise WorkflowFormatError(f"node {node['id']}: {node['type']} nodes are not supported; use Export (API)")
        inputs_schema, _ = _schema(info, node["type"])
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise WorkflowFormatError(f"node {node['id']} ({node['type']}): named widgets_values are not supported")
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        inputs: dict[str, Any] = {}
        pos = 0
        for inp in inputs_schema:
            if inp.widget:
                if pos < len(values):
                    inputs[inp.name] = values[pos]
                pos += 1 + len(inp.extra_default)
            if inp.name in linked:
                inputs[inp.name] = list(link_src[linked[inp.name]])
        entry: dict[str, Any] = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node["id"])] = entry
    return dict(sorted(prompt.items(), key=lambda kv: int(kv[0])))


def load_api(path: str | os.PathLike, info: dict | None = None) -> dict:
    """Read a workflow file in either format and return the API-format prompt."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise WorkflowFormatError(f"{path}: cannot read a workflow: {exc}") from None
    if is_ui_format(data):
        if info is None:
            raise WorkflowFormatError(f"{path}: a UI-format workflow needs the server's /object_info to convert")
        return api_from_ui(data, info)
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise WorkflowFormatError(f"{path}: expected an API-format prompt ({{id: {{class_type, inputs}}}}) "
                                  "or a UI-format workflow (nodes, links)")
    return data


def _dump(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_all(out_dir: str | os.PathLike, info: dict, models: Models | None = None,
              examples_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``ui/<name>.json`` and ``api/<name>.json`` for every workflow (and the UI ones into
    ``examples_dir``, ComfyUI's template folder), atomically; returns the files written."""
    out = Path(out_dir)
    written = []
    for name, fn in WORKFLOWS.items():
        prompt = fn(models or Models()).prompt()
        ui = to_ui(prompt, info, name=name, description=(fn.__doc__ or "").strip())
        targets = [(out / "api" / f"{name}.json", prompt), (out / "ui" / f"{name}.json", ui)]
        if examples_dir is not None:
            targets.append((Path(examples_dir) / f"{name}.json", ui))
        for path, data in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(_dump(data))
            os.replace(tmp, path)
            written.append(path)
    return written


def main(argv=None) -> int:
    import argparse

    from .api import ComfyClient

    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description="Regenerate workflows/{ui,api}/*.json and example_workflows/.")
    ap.add_argument("--server", default="http://127.0.0.1:8188", help="a running ComfyUI with this plugin")
    ap.add_argument("--out", default=str(root / "workflows"))
    ap.add_argument("--examples", default=str(root / "example_workflows"))
    args = ap.parse_args(argv)
    info = ComfyClient(args.server).object_info()
    for path in write_all(args.out, info, examples_dir=args.examples):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
