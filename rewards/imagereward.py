"""ImageReward's official checkpoint -> transformers' BLIP towers.

``ImageReward.pt`` is the state dict of ``ImageReward.ImageReward``: a BLIP ViT (timm layout, under
``blip.visual_encoder.``), BLIP's BERT with cross-attention (``blip.text_encoder.``, the layout
transformers' ``BlipTextModel`` kept), BLIP's ITC projections (unused by the score) and the reward
MLP (``mlp.layers.*``).  :func:`convert_imagereward` maps every key or refuses the file;
:func:`build_imagereward` builds the towers with shapes read from the checkpoint and ``med_config.json``.
"""

from __future__ import annotations

import math
import re

import torch

from .files import RewardFileError, load_strict
from .mlp import AestheticMLP

__all__ = ["convert_imagereward", "build_imagereward", "VISION_KEYS", "UNUSED_PREFIXES"]

#: timm ViT (BLIP's ``vit.py``) -> transformers ``BlipVisionModel``; ``{i}`` is the block index
VISION_KEYS: dict[str, str] = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "blocks.{i}.norm1.weight": "encoder.layers.{i}.layer_norm1.weight",
    "blocks.{i}.norm1.bias": "encoder.layers.{i}.layer_norm1.bias",
    "blocks.{i}.attn.qkv.weight": "encoder.layers.{i}.self_attn.qkv.weight",
    "blocks.{i}.attn.qkv.bias": "encoder.layers.{i}.self_attn.qkv.bias",
    "blocks.{i}.attn.proj.weight": "encoder.layers.{i}.self_attn.projection.weight",
    "blocks.{i}.attn.proj.bias": "encoder.layers.{i}.self_attn.projection.bias",
    "blocks.{i}.norm2.weight": "encoder.layers.{i}.layer_norm2.weight",
    "blocks.{i}.norm2.bias": "encoder.layers.{i}.layer_norm2.bias",
    "blocks.{i}.mlp.fc1.weight": "encoder.layers.{i}.mlp.fc1.weight",
    "blocks.{i}.mlp.fc1.bias": "encoder.layers.{i}.mlp.fc1.bias",
    "blocks.{i}.mlp.fc2.weight": "encoder.layers.{i}.mlp.fc2.weight",
    "blocks.{i}.mlp.fc2.bias": "encoder.layers.{i}.mlp.fc2.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
#: parts of the checkpoint the score does not use (BLIP's contrastive heads, a position-id buffer)
UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def _vision_key(key: str) -> str | None:
    m = _BLOCK.match(key)
    if m:
        return VISION_KEYS.get(f"blocks.{{i}}.{m.group(2)}", "").replace("{i}", m.group(1)) or None
    return VISION_KEYS.get(key)


def convert_imagereward(state: dict[str, torch.Tensor], what: str = "ImageReward.pt"):
    """Split the official state dict into ``(vision, text, mlp)`` state dicts in transformers' names.

    Raises :class:`RewardFileError` naming every key it cannot place.
    """
    vision, text, mlp, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith(UNUSED_PREFIXES):
            continue
        if key.startswith("blip.visual_encoder."):
            new = _vision_key(key[len("blip.visual_encoder."):])
            if new is None:
                unknown.append(key)
            else:
                vision[new] = value
        elif key.startswith("blip.text_encoder."):
            text[key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp."):
            mlp[key[len("mlp."):]] = value
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise RewardFileError(f"{what}: keys that are not ImageReward's: {shown}")
    for part, name in ((vision, "blip.visual_encoder"), (text, "blip.text_encoder"), (mlp, "mlp")):
        if not part:
            raise RewardFileError(f"{what}: no {name}.* weights; is this ImageReward.pt?")
    return vision, text, mlp


def vision_config_of(vision: dict[str, torch.Tensor], heads: int | None, what: str):
    """A ``BlipVisionConfig`` with the checkpoint's shapes (BLIP's ViT: LayerNorm eps 1e-6, exact GELU).

    Heads cannot be read from shapes: BLIP's ViT-B and ViT-L both use 64-dimensional heads, so the
    default is ``width // 64`` (16 for ImageReward's ViT-L).
    """
    from transformers import BlipVisionConfig

    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    n_patches = vision["embeddings.position_embedding"].shape[1] - 1
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise RewardFileError(f"{what}: pos_embed has {n_patches} patch positions, not a square grid")
    depth = len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")})
    heads = heads or max(1, width // 64)
    if width % heads:
        raise RewardFileError(f"{what}: vision width {width} is not divisible by {heads} heads")
    return BlipVisionConfig(hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=depth, num_attention_heads=heads, image_size=patch * side,
                            patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)


def text_config_of(med_config: dict, encoder_width: int):
    """A ``BlipTextConfig`` from BLIP's ``med_config.json`` (a BERT config with cross-attention)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"],
        encoder_hidden_size=encoder_width, intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"], num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"), layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=med_config.get("pad_token_id", 0),
        is_decoder=True,  # transformers builds the cross-attention only for decoder configs; the score runs it
    )                     # as an encoder (is_decoder=False in forward: no causal mask), as BLIP does


def build_imagereward(state: dict[str, torch.Tensor], med_config: dict, vision_heads: int | None, what: str):
    """``(BlipVisionModel, BlipTextModel, AestheticMLP)`` loaded from the official state dict."""
    from transformers import BlipTextModel, BlipVisionModel


    vision_sd, text_sd, mlp_sd = convert_imagereward(state, what)
    vcfg = vision_config_of(vision_sd, vision_heads, what)
    vision = BlipVisionModel(vcfg)
    load_strict(vision, vision_sd, f"{what} (vision tower)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "max_position_embeddings") if k not in med_config]
    if missing:
        raise RewardFileError(f"{what}: med_config.json lacks {', '.join(missing)}")
    text = BlipTextModel(text_config_of(med_config, vcfg.hidden_size), add_pooling_layer=False)
    load_strict(text, text_sd, f"{what} (text tower, med_config.json)")
    mlp = AestheticMLP(med_config["hidden_size"])
    load_strict(mlp, mlp_sd, f"{what} (reward MLP)")
    return vision, text, mlp
