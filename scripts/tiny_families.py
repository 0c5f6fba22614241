"""Tiny random models of the families ComfyUI runs, built in-process for parity tests.

Each builder returns a :class:`Family`: a ComfyUI ``ModelPatcher`` over a real ``comfy.model_base``
model (SDXL, SD3, SD3.5, Flux-dev, Qwen-Image) with random weights from a fixed seed, and the inputs
one ``apply_model`` call needs (latent, sigma, conditioning).  They take a second or two to build,
so nothing is cached on disk.

How each is made, and why:

* **SD3, SD3.5, Flux, Qwen-Image: detected by ComfyUI.**  A model is built once from a small
  config, its state dict is handed to ``comfy.model_detection.model_config_from_unet`` (the code
  that detects checkpoints), and the test asserts the family it returns.  Where detection hard-codes
  full-size attention shapes (Flux: 24 heads with RoPE axes (16, 56, 56), i.e. hidden 3072; Qwen-Image:
  24 x 128 hidden and a 3584-wide text input) the detected config is *shrunk after detection*
  (heads, head width, RoPE axes, text width), and the final model is built from it and loaded with
  the state dict.  SD3 vs SD3.5 is what detection reads from the weights: SD3.5 has RMS q/k norms
  (``ln_q``) and, for Medium, extra self-attention blocks (``attn2``).
* **SDXL: built directly.**  ComfyUI matches SDXL by its full-size UNet config (320 channels,
  transformer depths 0/0/2/2/10/10, 2048-wide context), so a tiny SDXL cannot be detected; the
  test builds ``comfy.supported_models.SDXL`` / ``comfy.model_base.SDXL`` with a shrunk UNet config
  of the same layout (linear projections in the transformers, ``adm`` label embedding, 2 text widths).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch

FAMILIES = ("SDXL", "SD3", "SD3.5", "Flux", "QwenImage")


@dataclass
class Family:
    name: str
    patcher: object  # comfy.model_patcher.ModelPatcher
    make_inputs: Callable[[int], tuple[torch.Tensor, torch.Tensor, dict]]
    detected: str  # the supported_models class ComfyUI picked (or "built directly")
    extra: dict = field(default_factory=dict)


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", ".scale")) or \
                    ".norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in sorted(model.named_buffers()):  # SD3's pos_embed is an uninitialised buffer
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g) * std)


def _patcher(model):
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _build(model_config, state_dict=None, seed=0):
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "")
    model.diffusion_model.to(torch.float32)
    if state_dict is None:
        _randomize(model.diffusion_model, seed)
    else:
        missing, unexpected = model.diffusion_model.load_state_dict(state_dict, strict=False)
        assert not unexpected and not missing, (missing[:4], unexpected[:4])
    return model.eval()


def _detect_and_shrink(first_config, expected_cls, shrink: dict, seed: int):
    """Build from ``first_config``, let ComfyUI detect the family from the state dict, shrink the
    detected config's hard-coded attention shapes (``shrink``), rebuild and load the weights."""
    import comfy.model_detection

    first = _build(first_config, seed=seed)
    sd = {k: v for k, v in first.diffusion_model.state_dict().items()}
    detected = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(detected) is expected_cls, f"ComfyUI detected {type(detected).__name__}, not {expected_cls.__name__}"
    detected.unet_config.update(shrink)
    return _build(detected, sd), type(detected).__name__


def flux_version_fields() -> dict:
    """Flux config fields a newer host requires and Flux-dev leaves empty (v0.33.0: ``txt_ids_dims``,
    which ComfyUI's detection sets to ``[]`` for Flux-dev); none on 0.3.75."""
    import dataclasses

    import comfy.ldm.flux.model

    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return {"txt_ids_dims": []} if "txt_ids_dims" in fields else {}


def build_flux(seed: int = 0, hidden: int = 64, depth: int = 2) -> Family:
    """Flux-dev with ``hidden`` channels (heads of 32), ``depth`` double and ``depth`` single blocks."""
    import comfy.supported_models as sm

    heads = hidden // 32
    tiny = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 24, "context_in_dim": 32,
            "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads, "depth": depth, "depth_single_blocks": depth,
            "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2,
            **flux_version_fields()}
    model, detected = _detect_and_shrink(sm.Flux(copy.deepcopy(tiny)), sm.Flux,
                                         {"num_heads": heads, "axes_dim": [8, 12, 12]}, seed)

    def inputs(batch: int = 1, s: int = 0):
        g = torch.Generator().manual_seed(100 + s)
        return (torch.randn(batch, 16, 8, 8, generator=g), torch.full((batch,), 0.7),
                {"c_crossattn": torch.randn(batch, 6, 32, generator=g), "y": torch.randn(batch, 24, generator=g),
                 "guidance": torch.full((batch,), 3.5)})

    return Family("Flux", _patcher(model), inputs, detected)


def _mmdit_config(depth: int, sd35: bool) -> dict:
    cfg = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
           "adm_in_channels": 24, "num_patches": 64, "pos_embed_max_size": 8, "pos_embed_scaling_factor": None,
           "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 64 * depth}},
           "x_block_self_attn_layers": []}
    if sd35:
        cfg.update({"qk_norm": "rms", "x_block_self_attn_layers": [0]})
    return cfg


def build_sd3(seed: int = 0, sd35: bool = False) -> Family:
    import comfy.supported_models as sm

    expected = sm.SD35 if sd35 and hasattr(sm, "SD35") else sm.SD3
    model, detected = _detect_and_shrink(expected(_mmdit_config(2, sd35)), expected, {}, seed)

    def inputs(batch: int = 1, s: int = 0):
        g = torch.Generator().manual_seed(200 + s)
        return (torch.randn(batch, 16, 8, 8, generator=g), torch.full((batch,), 0.6),
                {"c_crossattn": torch.randn(batch, 6, 32, generator=g), "y": torch.randn(batch, 24, generator=g)})

    return Family("SD3.5" if sd35 else "SD3", _patcher(model), inputs, detected)


def build_qwen_image(seed: int = 0) -> Family:
    import comfy.supported_models as sm

    shape = {"attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 40, "axes_dims_rope": (8, 12, 12)}
    tiny = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2, **shape}
    model, detected = _detect_and_shrink(sm.QwenImage(tiny), sm.QwenImage, shape, seed)

    def inputs(batch: int = 1, s: int = 0):
        g = torch.Generator().manual_seed(300 + s)
        return (torch.randn(batch, 16, 1, 8, 8, generator=g), torch.full((batch,), 0.8),
                {"c_crossattn": torch.randn(batch, 6, 40, generator=g)})

    return Family("QwenImage", _patcher(model), inputs, detected)


def build_sdxl(seed: int = 0, channels: int = 32, depth: int = 1) -> Family:
    """SDXL's layout (no attention at the first level, linear transformer projections, label
    embedding) with ``channels`` base channels and ``depth`` transformer blocks per attention."""
    import comfy.supported_models as sm

    cfg = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
           "num_classes": "sequential", "adm_in_channels": 48, "in_channels": 4, "out_channels": 4,
           "model_channels": channels, "num_res_blocks": [1, 1], "transformer_depth": [0, depth],
           "channel_mult": [1, 2], "transformer_depth_middle": depth, "use_linear_in_transformer": True,
           "context_dim": 40, "num_head_channels": 16, "transformer_depth_output": [0, 0, depth, depth],
           "use_temporal_attention": False, "use_temporal_resblock": False}
    model = _build(sm.SDXL(cfg), seed=seed)

    def inputs(batch: int = 1, s: int = 0):
        g = torch.Generator().manual_seed(400 + s)
        return (torch.randn(batch, 4, 8, 8, generator=g) * 2.0, torch.full((batch,), 2.0),
                {"c_crossattn": torch.randn(batch, 6, 40, generator=g), "y": torch.randn(batch, 48, generator=g)})

    return Family("SDXL", _patcher(model), inputs, "built directly (SDXL is matched by full-size shapes)")


def sdxl_from_diffusers(unet) -> object:
    """A ComfyUI ``ModelPatcher`` over ``comfy.model_base.SDXL`` holding the weights of a diffusers
    SDXL-layout UNet (``tiny_fixtures.SDXL_UNET_CONFIG``), mapped with ComfyUI's own
    ``comfy.utils.unet_to_diffusers``: the model a ComfyUI user gets for the same base."""
    import comfy.supported_models as sm
    import comfy.utils

    from tiny_fixtures import SDXL_COMFY_UNET_CONFIG

    names = comfy.utils.unet_to_diffusers(SDXL_COMFY_UNET_CONFIG)  # diffusers name -> ComfyUI name
    source = unet.state_dict()
    unmapped = [k for k in source if k not in names]
    assert not unmapped, unmapped[:4]
    state = {names[k]: v.detach().float() for k, v in source.items()}
    return _patcher(_build(sm.SDXL(dict(SDXL_COMFY_UNET_CONFIG)), state))


def _comfy_state_from_diffusers(names: dict, source: dict) -> dict:
    """ComfyUI tensors from diffusers ones through ComfyUI's own map (``diffusers name -> ComfyUI
    name``, ``(name, (dim, offset, size))`` for a slice of a fused tensor, ``(name, None, fn)`` for a
    transformed one: ComfyUI's transforms there swap halves, their own inverse)."""
    unmapped = [k for k in source if k not in names]
    assert not unmapped, unmapped[:4]
    sizes: dict[str, tuple[int, int]] = {}  # fused name -> (dim, total size)
    for key, target in names.items():
        if key in source and not isinstance(target, str) and target[1] is not None:
            dim, offset, size = target[1]
            sizes[target[0]] = (dim, max(sizes.get(target[0], (dim, 0))[1], offset + size))
    state: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        target = names[key]
        if isinstance(target, str):
            state[target] = value
        elif target[1] is None:
            state[target[0]] = target[2](value)
        else:
            name, (dim, offset, size) = target
            if name not in state:
                shape = list(value.shape)
                shape[dim] = sizes[name][1]
                state[name] = torch.zeros(shape)
            state[name].narrow(dim, offset, size).copy_(value)
    return state


def sd3_from_diffusers(transformer) -> object:
    """A ComfyUI ``ModelPatcher`` over the model ComfyUI detects (SD3) for the weights of a diffusers
    ``SD3Transformer2DModel``, mapped with ComfyUI's own ``comfy.utils.mmdit_to_diffusers`` (q/k/v
    concatenated into ComfyUI's fused ``qkv``, the last context block's scale/shift swapped)."""
    import comfy.model_detection
    import comfy.utils

    depth = transformer.config.num_layers
    names = comfy.utils.mmdit_to_diffusers({"depth": depth, "num_blocks": depth})
    state = _comfy_state_from_diffusers(names, {k: v.detach().float() for k, v in transformer.state_dict().items()})
    detected = comfy.model_detection.model_config_from_unet(state, "")
    assert type(detected).__name__ == "SD3", type(detected).__name__
    return _patcher(_build(detected, state))


def flux_from_diffusers(transformer) -> object:
    """The same for a diffusers ``FluxTransformer2DModel`` (``comfy.utils.flux_to_diffusers``: fused
    qkv and the single blocks' fused qkv + MLP input).  ComfyUI detects Flux, then its hard-coded
    full-size attention shapes are shrunk to the model's (heads, RoPE axes), as in :func:`build_flux`."""
    import comfy.model_detection
    import comfy.utils

    c = transformer.config
    hidden = c.num_attention_heads * c.attention_head_dim
    names = comfy.utils.flux_to_diffusers({"depth": c.num_layers, "depth_single_blocks": c.num_single_layers,
                                           "hidden_size": hidden})
    state = _comfy_state_from_diffusers(names, {k: v.detach().float() for k, v in transformer.state_dict().items()})
    detected = comfy.model_detection.model_config_from_unet(state, "")
    assert type(detected).__name__ == "Flux", type(detected).__name__
    detected.unet_config.update({"num_heads": c.num_attention_heads, "axes_dim": list(c.axes_dims_rope)})
    return _patcher(_build(detected, state))


def build(name: str, seed: int = 0, **size) -> Family:
    """A tiny model of family ``name``; ``size``: ``channels``/``depth`` (SDXL), ``hidden``/``depth`` (Flux)."""
    return {"SDXL": build_sdxl, "SD3": build_sd3, "SD3.5": lambda seed: build_sd3(seed, sd35=True),
            "Flux": build_flux, "QwenImage": build_qwen_image}[name](seed, **size)


def apply(patcher, x, sigma, cond: dict) -> torch.Tensor:
    """One ``apply_model`` call as ComfyUI's sampler makes it (patches and wrappers applied)."""
    import comfy.model_management
    import comfy.patcher_extension

    comfy.model_management.load_models_gpu([patcher])
    options = comfy.patcher_extension.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
    options.update({"wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers),
                    "cond_or_uncond": [0] * x.shape[0], "uuids": [object() for _ in range(x.shape[0])],
                    "sigmas": sigma[:1]})
    kwargs = dict(cond)
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, transformer_options=options, **kwargs).float()
