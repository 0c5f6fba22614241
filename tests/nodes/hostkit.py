"""Graph builders and result readers for tests against the real ComfyUI server."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from diffusion_blend.client.graph import Graph

CKPT = "tiny-sd15.safetensors"


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0


def blend_chain(bases, kl_scale=1.0, mode="exact", normalize=True, alpha_ref=0.0, **extra):
    """``model_chain`` inserting Basis nodes for ``bases = [(lora_name, weight), ...]`` and a blend."""

    def chain(g: Graph, model):
        basis = None
        for name, weight in bases:
            kw = {"basis": basis[0]} if basis is not None else {}
            basis = g.add("DiffusionBlendBasis", lora_name=name, weight=weight, alpha_ref=alpha_ref, **kw)
        return g.add("DiffusionBlend", model=model, basis=basis[0], kl_scale=kl_scale, normalize=normalize,
                     mode=mode, **extra)[0]

    return chain


def stock_lora_chain(*loras):
    """``model_chain`` applying stock ``LoraLoaderModelOnly`` for ``(lora_name, strength)`` pairs."""

    def chain(g: Graph, model):
        for name, strength in loras:
            model = g.add("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=strength)[0]
        return model

    return chain


def then(*chains):
    def chain(g, model):
        for c in chains:
            model = c(g, model)
        return model

    return chain


def sample_graph(
    model_chain=None, *, sampler="euler", scheduler="normal", cfg=7.0, steps=4, batch=1, denoise=1.0, seed=0,
    custom_advanced=False, conds=None, size=64, text="a photo of a cat", latent_chain=None,
) -> Graph:
    """Checkpoint -> model_chain -> sampler -> SaveLatent + VAEDecode -> SaveImage.

    ``denoise < 1`` samples from a latent made by the plain model first (img2img).
    ``conds(g, clip, pos, neg) -> (pos, neg)`` may rewrite the conditioning, and
    ``latent_chain(g, latent) -> latent`` the latent sampled from (e.g. a noise mask).
    """
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    model = ckpt[0] if model_chain is None else model_chain(g, ckpt[0])
    pos = g.add("CLIPTextEncode", text=text, clip=ckpt[1])[0]
    neg = g.add("CLIPTextEncode", text="", clip=ckpt[1])[0]
    if conds is not None:
        pos, neg = conds(g, ckpt[1], pos, neg)
    latent = g.add("EmptyLatentImage", width=size, height=size, batch_size=batch)[0]
    if denoise < 1.0:
        init = g.add("KSampler", model=ckpt[0], seed=seed + 1000, steps=2, cfg=1.0, sampler_name="euler",
                     scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0)
        latent = init[0]
    if latent_chain is not None:
        latent = latent_chain(g, latent)
    if custom_advanced:
        noise = g.add("RandomNoise", noise_seed=seed)
        guider = g.add("CFGGuider", model=model, positive=pos, negative=neg, cfg=cfg)
        samp = g.add("KSamplerSelect", sampler_name=sampler)
        sigmas = g.add("BasicScheduler", model=model, scheduler=scheduler, steps=steps, denoise=denoise)
        out = g.add("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=samp[0], sigmas=sigmas[0],
                    latent_image=latent)[0]
    else:
        out = g.add("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                    scheduler=scheduler, positive=pos, negative=neg, latent_image=latent, denoise=denoise)[0]
    g.add("SaveLatent", node_id="latent_out", samples=out, filename_prefix="t/latent")
    img = g.add("VAEDecode", samples=out, vae=ckpt[2])
    g.add("SaveImage", node_id="image_out", images=img[0], filename_prefix="t/image")
    return g


def run(server, graph: Graph) -> dict:
    """Run ``graph``; returns ``{"images": [HxWx3 float arrays], "latent": tensor}``."""
    result = server.client.run(graph.prompt())
    images = [decode_png(server.client.view(i)) for i in result.images]
    latent = None
    for node_id, out in result.history.get("outputs", {}).items():
        for entry in out.get("latents", []):
            path = server.output_dir / entry.get("subfolder", "") / entry["filename"]
            latent = load_file(str(path))["latent_tensor"]
    return {"images": images, "latent": latent}


def max_pixel_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a["images"], b["images"]))


def max_latent_diff(a: dict, b: dict) -> float:
    return float((a["latent"].float() - b["latent"].float()).abs().max())


def hooked_cond_list(branches):
    """Stock-node reference of the blend: ``branches = [(lora_name or None, strength), ...]``.

    Every cond is duplicated per branch, with a hook LoRA for the branch's basis and the branch's
    strength; ComfyUI averages overlapping conds by strength.
    """

    def conds(g: Graph, clip, pos, neg):
        hooks = [None if name is None else g.add("CreateHookLora", lora_name=name, strength_model=1.0,
                                                 strength_clip=0.0)[0] for name, _ in branches]

        def combined(cond):
            parts = []
            for hook, (_, strength) in zip(hooks, branches):
                c = cond
                if hook is not None:
                    c = g.add("ConditioningSetProperties", cond_NEW=c, strength=1.0, set_cond_area="default",
                              hooks=hook)[0]
                # (ConditioningSetProperties applies its strength only with a mask)
                parts.append(g.add("ConditioningSetAreaStrength", conditioning=c, strength=strength)[0])
            acc = parts[0]
            for p in parts[1:]:
                acc = g.add("ConditioningCombine", conditioning_1=acc, conditioning_2=p)[0]
            return acc

        return combined(pos), combined(neg)

    return conds


def assert_close_latents(a: dict, b: dict, rel: float) -> None:
    """``max|a - b| <= rel * max(1, max|a|)``.

    The tiny base has random weights, so it does not remove the noise: its final latents have a
    magnitude of ~200 (sigma_max / 0.18215 times the noise) instead of ~4 for a trained model.
    Float32 round-off then scales with that magnitude, hence a bound relative to it.
    """
    la, lb = a["latent"].float(), b["latent"].float()
    scale = max(1.0, float(la.abs().max()))
    diff = float((la - lb).abs().max())
    assert diff <= rel * scale, f"max |diff| = {diff:.3g} > {rel:g} * {scale:.3g}"
