"""Test-only ComfyUI plugin: tiny SDXL and Flux-dev files load through the stock loader nodes.

ComfyUI recognises these families by full-size shapes: SDXL's model config matches 320 base
channels, a 2048-wide context and a 2816-wide label input; Flux's detection hard-codes 24 heads and
RoPE axes (16, 56, 56); CLIP-G and T5-XXL are built from fixed JSON configs and T5-XXL is detected by
its 24th block.  The test files (``scripts/tiny_comfy_files.py``) are these models shrunk, so this
plugin teaches the host the shrunk shapes and nothing else:

* ``TinySDXL`` / ``TinyFlux``: model configs that match only the tiny UNet / transformer (registered
  ahead of the stock ones) and otherwise are ComfyUI's own ``SDXL`` / ``Flux`` classes (same
  ``model_base``, latent format, sampling, LoRA key map);
* text encoders: the tiny widths are handed to ComfyUI's own CLIP/T5 classes as the
  ``<name>_model_config`` overrides its ``SDClipModel`` reads; a 32-wide T5 is reported as T5-XXL.

The loaders (``CheckpointLoaderSimple``, ``UNETLoader``, ``DualCLIPLoader``, ``VAELoader``),
``CLIPTextEncodeSDXL``, ``FluxGuidance``, the samplers, the VAE and the blend all run stock code.
Loaded only by the test server (``ComfyServer(extra_custom_nodes=...)``); it adds no nodes.
"""

from __future__ import annotations

import comfy.sd
import comfy.supported_models as supported_models
import comfy.supported_models_base
from comfy import sdxl_clip

#: The tiny CLIP-L / CLIP-G stand-ins (``tiny_comfy_files._clip``): 32 wide, 3 layers, pooled 32.
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
             "projection_dim": 32, "hidden_act": "quick_gelu"}
#: The tiny T5 of the Flux test files (``tiny_fixtures.build_tiny_flux``): 32 wide, 2 blocks.
TINY_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2, "num_decoder_layers": 2}
#: ``<model name>_model_config``: the config overrides ComfyUI's ``SDClipModel`` reads.
TINY_TEXT_ENCODERS = {"clip_l_model_config": TINY_CLIP, "clip_g_model_config": TINY_CLIP, "t5xxl_model_config": TINY_T5}


class TinySDXLClipModel(sdxl_clip.SDXLClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, model_options={**model_options, **TINY_TEXT_ENCODERS})


class TinySDXL(supported_models.SDXL):
    """``scripts/tiny_comfy_files.py``'s SDXL: SDXL's layout at 32 channels, context 64, label 1568."""

    unet_config = {"model_channels": 32, "use_linear_in_transformer": True, "context_dim": 64,
                   "adm_in_channels": 6 * 256 + 32, "use_temporal_attention": False}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(sdxl_clip.SDXLTokenizer, TinySDXLClipModel)


class TinyFlux(supported_models.Flux):
    """``tiny_fixtures.build_tiny_flux``'s transformer: 64 wide, 2 heads of 32, RoPE axes (8, 12, 12)."""

    unet_config = {"image_model": "flux", "hidden_size": 64}

    def __init__(self, unet_config):
        super().__init__(dict(unet_config, num_heads=2, axes_dim=[8, 12, 12]))


def _is_tiny_t5(sd) -> bool:
    key = "encoder.block.0.layer.0.SelfAttention.k.weight"
    return key in sd and sd[key].shape[-1] == TINY_T5["d_model"] and "encoder.block.23.layer.0.SelfAttention.k.weight" not in sd


_stock_detect_te_model = comfy.sd.detect_te_model
_stock_load_text_encoders = comfy.sd.load_text_encoder_state_dicts


def detect_te_model(sd):
    return comfy.sd.TEModel.T5_XXL if _is_tiny_t5(sd) else _stock_detect_te_model(sd)


def load_text_encoder_state_dicts(state_dicts=[], embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                  model_options={}, **kwargs):
    tiny = any(_is_tiny_t5(sd) or sd.get("text_model.embeddings.token_embedding.weight", None) is not None
               and sd["text_model.embeddings.token_embedding.weight"].shape[-1] == TINY_CLIP["hidden_size"]
               for sd in state_dicts)
    if tiny:  # "model_config": what ComfyUI's long-CLIP check rewrites "clip_l_model_config" from
        model_options = {**model_options, **TINY_TEXT_ENCODERS, "model_config": dict(TINY_CLIP)}
    return _stock_load_text_encoders(state_dicts, embedding_directory=embedding_directory, clip_type=clip_type,
                                     model_options=model_options, **kwargs)  # v0.16+: disable_dynamic=


if not any(cls is TinySDXL or cls.__name__ == "TinySDXL" for cls in supported_models.models):
    supported_models.models[:0] = [TinySDXL, TinyFlux]
    comfy.sd.detect_te_model = detect_te_model
    comfy.sd.load_text_encoder_state_dicts = load_text_encoder_state_dicts

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
