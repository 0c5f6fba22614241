"""The official scoring code of each learned reward, run on the random-weight replicas.

Each function returns ``score(pil_image, prompt) -> float`` computed by the official implementation,
loading the replica files the way that implementation does (``strict=True`` wherever it can, so a
replica whose key names or shapes differ from the official format fails here):

* ``imagereward`` -- the ``image-reward`` package (1.5): ``ImageReward.ImageReward.score`` itself, with
  the package's own BLIP ``VisionTransformer``, ``med.BertModel``, ``MLP`` and ``_transform``.  Its full
  constructor builds a ViT-L and downloads ``bert-base-uncased``, so the instance is assembled from the
  same classes at tiny size.  Compatibility shim: the package imports three helpers from
  ``transformers.modeling_utils`` that moved to ``transformers.pytorch_utils``; they are aliased.
* ``hpsv2`` -- the ``hpsv2x`` package (1.2.0, the maintained re-upload of ``hpsv2`` that ships the BPE
  file): ``hpsv2.img_score.score`` itself, with its vendored open_clip, its ``preprocess_val`` and its
  tokenizer; ``model_dict`` is pre-filled with the tiny model so that it does not fetch ViT-H-14.  The
  download-progress module it imports (``clint``) is stubbed.
* ``pickscore`` -- the inference snippet of the PickScore README, verbatim in substance
  (``AutoProcessor``/``AutoModel``, normalised embeddings, ``logit_scale.exp() * text @ image``).
* ``clip_score`` -- torchmetrics' ``clip_score`` (the de-facto official CLIP score).
* ``aesthetic`` -- no installable package exists (the official script is ``simple_inference.py`` of
  improved-aesthetic-predictor, on OpenAI's ``clip``); an independent re-computation of its formula:
  OpenAI CLIP's preprocessing (torchvision, written out), transformers' ``CLIPModel.get_image_features``
  (the ``openai/clip-vit-large-patch14`` files are that model), numpy L2 normalisation, then the five
  affine layers as numpy matrix products from the ``.pth`` tensors.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _package_stub(name: str, path: Path) -> None:
    """Register ``name`` as a package at ``path`` without running its ``__init__`` (which imports
    training code and download helpers the scoring code does not need)."""
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module


@functools.lru_cache(maxsize=None)
def _imagereward_modules():
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for helper in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(modeling_utils, helper):
            setattr(modeling_utils, helper, getattr(pytorch_utils, helper))
    root = Path(importlib.util.find_spec("ImageReward").submodule_search_locations[0])
    _package_stub("ImageReward", root)
    _package_stub("ImageReward.models", root / "models")
    _package_stub("ImageReward.models.BLIP", root / "models" / "BLIP")
    ir = importlib.import_module("ImageReward.ImageReward")
    med = importlib.import_module("ImageReward.models.BLIP.med")
    vit = importlib.import_module("ImageReward.models.BLIP.vit")
    return ir, med, vit


def imagereward(folder: Path, vision_heads: int = 2):
    """``ImageReward.score(prompt, image)`` of the official package on the replica in ``folder``."""
    from transformers import BertTokenizer

    ir, med, vit = _imagereward_modules()
    state = torch.load(folder / "ImageReward.pt", map_location="cpu")
    width = state["blip.visual_encoder.cls_token"].shape[-1]
    patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    side = int(round((state["blip.visual_encoder.pos_embed"].shape[1] - 1) ** 0.5))
    depth = len({k.split(".")[3] for k in state if k.startswith("blip.visual_encoder.blocks.")})

    blip = nn.Module()  # BLIP_Pretrain's attributes, built as its __init__ builds them
    blip.visual_encoder = vit.VisionTransformer(img_size=patch * side, patch_size=patch, embed_dim=width,
                                                depth=depth, num_heads=vision_heads, drop_path_rate=0)
    tokenizer = BertTokenizer.from_pretrained(folder / "bert-base-uncased")  # blip.init_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
    blip.tokenizer = tokenizer
    config = med.BertConfig.from_json_file(str(folder / "med_config.json"))
    config.encoder_width = width
    blip.text_encoder = med.BertModel(config=config, add_pooling_layer=False)
    blip.vision_proj = nn.Linear(width, 256)
    blip.text_proj = nn.Linear(config.hidden_size, 256)

    model = ir.ImageReward.__new__(ir.ImageReward)
    nn.Module.__init__(model)
    model.device = "cpu"
    model.blip = blip
    model.preprocess = ir._transform(patch * side)
    model.mlp = ir.MLP(config.hidden_size)
    model.mean, model.std = 0.16717362830052426, 1.0333394966054072
    model.load_state_dict(state, strict=True)
    model.eval()
    return lambda image, prompt: float(model.score(prompt, image))


def _hpsv2_img_score():
    for name in ("clint", "clint.textui"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["clint.textui"].progress = None
    return importlib.import_module("hpsv2.img_score")


def hpsv2(checkpoint: Path):
    """``hpsv2.img_score.score(image, prompt, cp=checkpoint)`` with the tiny architecture (from the
    replica's ``open_clip_config.json``) pre-loaded in place of ViT-H-14."""
    img_score = _hpsv2_img_score()
    from hpsv2.src import open_clip as vendored

    config = json.loads((checkpoint.parent / "open_clip_config.json").read_text())["model_cfg"]
    registered = Path(tempfile.mkdtemp()) / "tiny-hps.json"  # the vendored open_clip reads configs from files
    registered.write_text(json.dumps(config))
    vendored.add_model_config(registered)
    model, _, preprocess_val = vendored.create_model_and_transforms(
        "tiny-hps", None, precision="amp", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    img_score.model_dict.clear()
    img_score.model_dict.update(model=model, preprocess_val=preprocess_val)
    return lambda image, prompt: float(img_score.score(image, prompt, cp=str(checkpoint))[0])


def _hpsv2_preprocess(image_size: int):
    """HPS's ``preprocess_val``: the vendored open_clip ``image_transform(resize_longest_max=True)``."""
    _hpsv2_img_score()
    from hpsv2.src import open_clip as vendored

    return vendored.image_transform(image_size, is_train=False, resize_longest_max=True)


def pickscore(model_dir: Path, processor_dir: Path):
    """The PickScore README's ``calc_probs`` scoring, one image at a time."""
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(processor_dir)
    model = AutoModel.from_pretrained(model_dir).eval()

    @torch.no_grad()
    def score(image, prompt):
        image_inputs = processor(images=[image], padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = model.get_image_features(**image_inputs)
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs)
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        return float((model.logit_scale.exp() * (text_embs @ image_embs.T))[0, 0])

    return score


def clip_score(model_dir: Path):
    """torchmetrics' functional ``clip_score`` with the replica as its model."""
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(model_dir).eval(), CLIPProcessor.from_pretrained(model_dir)

    @torch.no_grad()
    def score(image, prompt):
        uint8 = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        return float(tm_clip_score(uint8, prompt, model_name_or_path=lambda: (model, processor)))

    return score


def openai_clip_transform(n_px: int):
    """OpenAI ``clip.clip._transform`` (the preprocessing of ``clip.load``), written out."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(n_px, interpolation=InterpolationMode.BICUBIC), CenterCrop(n_px),
                    lambda image: image.convert("RGB"), ToTensor(),
                    Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


def aesthetic(mlp_file: Path, clip_dir: Path):
    """Re-computation of improved-aesthetic-predictor's ``simple_inference.py``."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    preprocess = openai_clip_transform(model.config.vision_config.image_size)
    layers = {k: v.double().numpy() for k, v in torch.load(mlp_file, map_location="cpu").items()}

    @torch.no_grad()
    def score(image, prompt=None):
        features = model.get_image_features(pixel_values=preprocess(image)[None]).double().numpy()
        x = features / np.linalg.norm(features, axis=-1, keepdims=True)  # simple_inference's normalized()
        for i in (0, 2, 4, 6, 7):  # Linear, (Dropout), ..., no activations
            x = x @ layers[f"layers.{i}.weight"].T + layers[f"layers.{i}.bias"]
        return float(x[0, 0])

    return score


def official_scorers(options: dict[str, dict]) -> dict:
    """``{reward: score(pil, prompt)}`` for the replica options of ``reward_replicas.build_replicas``."""
    ir_folder = Path(options["imagereward"]["path"]).parent
    aesthetic_file = Path(options["aesthetic"]["path"])
    pick = Path(options["pickscore"]["path"])
    return {
        "imagereward": imagereward(ir_folder, vision_heads=2),
        "hpsv2": hpsv2(Path(options["hpsv2"]["path"])),
        "pickscore": pickscore(pick, pick.parent / "CLIP-ViT-H-14-laion2B-s32B-b79K"),
        "clip_score": clip_score(Path(options["clip_score"]["path"])),
        "aesthetic": aesthetic(aesthetic_file, aesthetic_file.parent / "clip-vit-large-patch14"),
    }
