"""Learned rewards, loaded from the files their projects publish (local paths only, never downloaded).

=============== ================================================ ============================================
registry name   official files                                   score
=============== ================================================ ============================================
``imagereward`` ``ImageReward.pt`` + ``med_config.json`` + a      ``(MLP(BLIP_text(prompt | ViT(img))[CLS]) -
                ``bert-base-uncased`` tokenizer folder            mean) / std``
``hpsv2``       ``HPS_v2.1_compressed.pt`` (or v2.0): OpenCLIP    ``cos(img, text)``
                ViT-H-14
``pickscore``   ``PickScore_v1`` (transformers CLIP folder) + the ``logit_scale.exp() * cos(img, text)``
                CLIP-H processor
``aesthetic``   ``sac+logos+ava1-l14-linearMSE.pth`` + CLIP       ``MLP(normalize(CLIP_img(img)))``
                ViT-L/14 (``openai/clip-vit-large-patch14``)
``clip_score``  ``openai/clip-vit-large-patch14``                 ``max(100 * cos(img, text), 0)``
=============== ================================================ ============================================

The networks are the maintained libraries' (transformers' CLIP and BLIP, open-clip-torch); the only
converter is ImageReward's (:mod:`.imagereward`).  Each reward preprocesses the way its official code
does (:class:`ImageTransform`): the resize and crop rules, the normalisation, HPS's pad-to-square.

Every reward is an ``nn.Module`` with

* ``score(images, prompts)``: differentiable from pixels (images ``(B, 3, H, W)`` in [0, 1]), on the
  model's device, for reward-gradient guidance and direct reward back-propagation;
* ``__call__(images, prompts)``: ``score`` under ``no_grad``, as float32 on the CPU (the registry's
  contract).

The model follows the images: the first call on a CUDA batch moves it there (in float16 unless
``dtype`` says otherwise); it stays there for the next calls.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .imagereward import build_imagereward
from .mlp import AestheticMLP
from .files import RewardFileError, first_dir, load_strict, load_tensor_file, resolve_dir, resolve_file, unwrap_state_dict

__all__ = ["ImageTransform", "preprocess", "LearnedReward", "AestheticMLP", "AestheticReward", "CLIPScoreReward",
           "PickScoreReward", "HPSv2Reward", "ImageRewardReward"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageTransform:
    """How an official implementation turns an image into the network's input.

    ``fit="crop"``: resize the short side to ``size`` (long side ``int(size * long / short)``), then
    center-crop; the crop's top-left is ``(H - size) // 2`` (``crop_rounding="floor"``, transformers'
    image processors) or ``round((H - size) / 2)`` (``"round"``, torchvision's ``CenterCrop``).  These
    official pipelines resize uint8 PIL images, so the resized pixels are clamped to [0, 1].
    ``fit="pad"``: resize the long side to ``size`` and pad the short side with zeros, centred
    (open_clip's ``ResizeMaxSize``, which HPS v2 uses).  Resizing is bicubic with antialiasing.
    """

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    fit: Literal["crop", "pad"] = "crop"
    crop_rounding: Literal["floor", "round"] = "floor"


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if (h, w) == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)


def preprocess(images: torch.Tensor, t: ImageTransform) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> the normalized ``(B, 3, size, size)`` network input (differentiable)."""
    x = images if images.dtype == torch.float64 else images.float()
    h, w = x.shape[-2:]
    if t.fit == "pad":
        scale = t.size / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        x = _resize(x, nh, nw)
        pad_h, pad_w = t.size - nh, t.size - nw
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    else:
        short, long = min(h, w), max(h, w)
        new_long = int(t.size * long / short)
        nh, nw = (t.size, new_long) if h <= w else (new_long, t.size)
        if (nh, nw) != (h, w):  # the official code resizes uint8 (PIL) images: no overshoot
            x = _resize(x, nh, nw).clamp(0, 1)
        if t.crop_rounding == "floor":
            top, left = (nh - t.size) // 2, (nw - t.size) // 2
        else:
            top, left = int(round((nh - t.size) / 2.0)), int(round((nw - t.size) / 2.0))
        x = x[..., top : top + t.size, left : left + t.size]
    mean = torch.tensor(t.mean, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(t.std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


def transform_from_processor(folder: Path | None, default_size: int) -> ImageTransform:
    """The ``ImageTransform`` of a transformers ``preprocessor_config.json`` (CLIP defaults without one)."""
    if folder is None or not (folder / "preprocessor_config.json").is_file():
        return ImageTransform(default_size)
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    size = cfg.get("size", default_size)
    size = size.get("shortest_edge", size.get("height", default_size)) if isinstance(size, dict) else size
    crop = cfg.get("crop_size", size)
    crop = crop.get("height", size) if isinstance(crop, dict) else crop
    if crop != size:
        raise RewardFileError(f"{folder}/preprocessor_config.json: resize {size} with crop {crop} is not supported; "
                              "expected the CLIP convention (crop size = resize size)")
    return ImageTransform(int(size), tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD)))


# --------------------------------------------------------------------------------------------------
# the common part
# --------------------------------------------------------------------------------------------------

DTypeName = Literal["auto", "float32", "float16", "bfloat16", "float64"]


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _dtype_for(device: torch.device, dtype: DTypeName) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision activations -> float32 for the reductions of the score; float32/64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class LearnedReward(nn.Module):
    """A frozen scoring network plus its official preprocessing; see the module docstring."""

    def __init__(self, transform: ImageTransform, dtype: DTypeName = "auto"):
        super().__init__()
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected auto, {', '.join(DTYPES)}")
        self.transform = transform
        self.dtype_name = dtype
        self._text_cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def freeze(self) -> "LearnedReward":
        return self.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def follow(self, images: torch.Tensor) -> None:
        """Move the network to the images' device (and its dtype for that device) once."""
        device, dtype = images.device, _dtype_for(images.device, self.dtype_name)
        if self.device != device or self.dtype != dtype:
            self.to(device=device, dtype=dtype)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        self.follow(images)
        return preprocess(images, self.transform).to(self.dtype)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        """Differentiable reward ``(B,)`` of ``images`` in [0, 1]."""
        raise NotImplementedError

    TEXT_CACHE_SIZE = 1024

    def cached_text(self, prompts: list[str], encode) -> torch.Tensor:
        """``encode(prompts)`` (a text tower that does not see the image), each distinct prompt encoded
        once per device and dtype: training rounds and SMC scorings repeat the same prompts."""
        key = (self.device, self.dtype)
        missing = list(dict.fromkeys(p for p in prompts if (p, *key) not in self._text_cache))
        if missing:
            if len(self._text_cache) + len(missing) > self.TEXT_CACHE_SIZE:
                self._text_cache.clear()
            with torch.no_grad():
                for prompt, row in zip(missing, encode(missing)):
                    self._text_cache[(prompt, *key)] = row
        return torch.stack([self._text_cache[(p, *key)] for p in prompts])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        return self.score(images, prompts).float().cpu()


def _prompts(prompts: Sequence[str] | None, n: int, what: str) -> list[str]:
    if prompts is None or len(prompts) != n:
        raise ValueError(f"{what}: expected {n} prompts (one per image), got "
                         f"{'none' if prompts is None else len(prompts)}")
    return [str(p) for p in prompts]


# --------------------------------------------------------------------------------------------------
# transformers CLIP: clip_score, pickscore, aesthetic
# --------------------------------------------------------------------------------------------------

def _load_transformers_clip(folder: Path, tokenizer_folder: Path, what: str):
    from transformers import CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    except OSError as exc:
        raise RewardFileError(f"{what}: cannot load a transformers CLIP from {folder} ({exc})") from None
    return model, tokenizer


class TransformersCLIPReward(LearnedReward):
    """A transformers ``CLIPModel`` with its tokenizer; subclasses turn the embeddings into a score."""

    def __init__(self, model, tokenizer, transform: ImageTransform | None = None, dtype: DTypeName = "auto"):
        super().__init__(transform or ImageTransform(model.config.vision_config.image_size), dtype)
        self.model = model
        self.tokenizer = tokenizer
        self.freeze()

    #: the processor/tokenizer lives in the model folder or in one of these next to / inside it
    PROCESSOR_DIRS: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, path=None, processor=None, dtype: DTypeName = "auto"):
        what = f"{cls.__name__}({cls.NAME})"
        folder = resolve_dir(path, what)
        if processor:
            proc = resolve_dir(processor, f"{what} processor", marker="")
        else:
            candidates = [folder] + [base / d for d in cls.PROCESSOR_DIRS for base in (folder, folder.parent)]
            proc = first_dir(candidates, "tokenizer_config.json")
            if proc is None:
                raise RewardFileError(f"{what}: no tokenizer next to {folder}; pass processor=<folder with the CLIP "
                                      f"tokenizer and preprocessor_config.json> (looked in {', '.join(map(str, candidates))})")
        model, tokenizer = _load_transformers_clip(folder, proc, what)
        return cls(model, tokenizer, transform_from_processor(proc, model.config.vision_config.image_size), dtype)

    def _projected(self, output) -> torch.Tensor:
        """``get_*_features``' projected embedding: a tensor up to transformers 4.x, a model output
        whose ``pooler_output`` holds it from 5.x on."""
        if not isinstance(output, torch.Tensor):
            output = output.pooler_output
        if output.shape[-1] != self.model.config.projection_dim:
            raise RuntimeError(f"{self.NAME}: CLIP features of width {output.shape[-1]}, expected the projection "
                               f"width {self.model.config.projection_dim} (unsupported transformers version?)")
        return _wide(output)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._projected(self.model.get_image_features(pixel_values=self.pixels(images))), dim=-1)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

        def encode(texts: list[str]) -> torch.Tensor:
            tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                                 return_tensors="pt").to(self.device)
            return F.normalize(self._projected(self.model.get_text_features(**tok)), dim=-1)

        return self.cached_text(prompts, encode)

    def cosine(self, images: torch.Tensor, prompts) -> torch.Tensor:
        prompts = _prompts(prompts, images.shape[0], self.NAME)
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


class CLIPScoreReward(TransformersCLIPReward):
    """CLIP score (Hessel et al.; torchmetrics' ``clip_score``): ``max(100 cos(img, text), 0)``."""

    NAME = "clip_score"

    def score(self, images, prompts):
        return (100.0 * self.cosine(images, prompts)).clamp_min(0)


class PickScoreReward(TransformersCLIPReward):
    """PickScore v1: ``logit_scale.exp() * cos(img, text)`` on the fine-tuned CLIP-H."""

    NAME = "pickscore"
    PROCESSOR_DIRS = ("processor", "CLIP-ViT-H-14-laion2B-s32B-b79K")

    def score(self, images, prompts):
        return _wide(self.model.logit_scale.exp()) * self.cosine(images, prompts)


class AestheticReward(TransformersCLIPReward):
    """LAION aesthetic predictor v2: ``MLP(normalize(CLIP ViT-L/14 image embedding))``; ignores prompts.

    The official code preprocesses with OpenAI CLIP's torchvision pipeline (``CenterCrop`` rounding).
    """

    NAME = "aesthetic"
    MLP_FILES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic_mlp.safetensors", "aesthetic_mlp.pth")
    CLIP_DIRS = ("clip-vit-large-patch14", "clip")

    def __init__(self, model, tokenizer, mlp: AestheticMLP, transform: ImageTransform | None = None,
                 dtype: DTypeName = "auto"):
        super().__init__(model, tokenizer, transform, dtype)
        self.mlp = mlp.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path=None, clip=None, dtype: DTypeName = "auto"):
        what = "AestheticReward(aesthetic)"
        mlp_file = resolve_file(path, cls.MLP_FILES, what)
        if clip:
            clip_dir = resolve_dir(clip, f"{what} clip")
        else:
            here = mlp_file.parent
            candidates = [here / d for d in cls.CLIP_DIRS] + [here]
            clip_dir = first_dir(candidates, "config.json")
            if clip_dir is None:
                raise RewardFileError(f"{what}: no CLIP ViT-L/14 folder next to {mlp_file}; pass clip=<folder of "
                                      f"openai/clip-vit-large-patch14> (looked in {', '.join(map(str, candidates))})")
        model, tokenizer = _load_transformers_clip(clip_dir, clip_dir, what)
        mlp = AestheticMLP(model.config.projection_dim)
        load_strict(mlp, unwrap_state_dict(load_tensor_file(mlp_file, what), what), what)
        transform = replace(transform_from_processor(clip_dir, model.config.vision_config.image_size),
                            crop_rounding="round")
        return cls(model, tokenizer, mlp, transform, dtype)

    def score(self, images, prompts=None):
        return _wide(self.mlp(self.image_embeds(images).to(self.dtype)).squeeze(-1))


# --------------------------------------------------------------------------------------------------
# OpenCLIP: hpsv2
# --------------------------------------------------------------------------------------------------

class HPSv2Reward(LearnedReward):
    """HPS v2 / v2.1: ``cos(img, text)`` of an OpenCLIP ViT-H-14 fine-tuned on human preferences.

    ``arch`` is an open_clip model name or a folder with an ``open_clip_config.json`` (open_clip's own
    local format, ``{"model_cfg": ...}``); by default the folder of the checkpoint if it holds one,
    else ``ViT-H-14`` (both HPS releases).  Preprocessing is HPS's evaluation transform: resize the
    long side to 224 and pad with black (open_clip's ``ResizeMaxSize``).
    """

    NAME = "hpsv2"
    FILES = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")
    DEFAULT_ARCH = "ViT-H-14"

    def __init__(self, model, tokenizer, transform: ImageTransform, dtype: DTypeName = "auto"):
        super().__init__(transform, dtype)
        self.model = model
        self.tokenizer = tokenizer
        self.freeze()

    @staticmethod
    def build(arch: str):
        """``(model, tokenizer)`` of open_clip for a model name or a folder with ``open_clip_config.json``."""
        import open_clip

        folder = Path(arch).expanduser()
        if folder.is_dir():
            if not (folder / "open_clip_config.json").is_file():
                raise RewardFileError(f"hpsv2: arch folder {folder} has no open_clip_config.json")
            arch = f"local-dir:{folder}"
        elif arch not in open_clip.list_models():
            raise RewardFileError(f"hpsv2: arch={arch!r} is neither an open_clip model name nor a folder with "
                                  "open_clip_config.json")
        logging.disable(logging.WARNING)  # "no pretrained weights loaded": we load them next, strictly
        try:
            model = open_clip.create_model(arch, pretrained=None, load_weights=False, device="cpu")
        finally:
            logging.disable(logging.NOTSET)
        return model, open_clip.get_tokenizer(arch)

    @classmethod
    def from_pretrained(cls, path=None, arch: str | None = None, dtype: DTypeName = "auto"):
        what = "HPSv2Reward(hpsv2)"
        file = resolve_file(path, cls.FILES, what)
        if not arch:
            arch = str(file.parent) if (file.parent / "open_clip_config.json").is_file() else cls.DEFAULT_ARCH
        state = unwrap_state_dict(load_tensor_file(file, what), what)
        model, tokenizer = cls.build(arch)
        load_strict(model, state, f"{what} {file.name} into open_clip {arch}")
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return cls(model, tokenizer, ImageTransform(int(size), fit="pad"), dtype)

    def score(self, images, prompts):
        prompts = _prompts(prompts, images.shape[0], self.NAME)
        image = _wide(self.model.encode_image(self.pixels(images), normalize=True))
        text = self.cached_text(prompts, lambda texts: _wide(
            self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True)))
        return (image * text).sum(-1)


# --------------------------------------------------------------------------------------------------
# BLIP: imagereward
# --------------------------------------------------------------------------------------------------

class ImageRewardReward(LearnedReward):
    """ImageReward: ``(MLP(text_encoder(prompt | ViT(image))[CLS]) - mean) / std``.

    The BLIP towers are transformers' ``BlipVisionModel`` and ``BlipTextModel``, filled from the
    official ``ImageReward.pt`` by :mod:`.imagereward`'s key converter; the text tower's shape comes
    from the official ``med_config.json``, the tokenizer is ``bert-base-uncased`` with BLIP's two added
    special tokens.  Prompts are padded/truncated to 35 tokens, as in ``ImageReward.score``.
    """

    NAME = "imagereward"
    MEAN, STD = 0.16717362830052426, 1.0333394966054072
    MAX_TOKENS = 35
    TOKENIZER_DIRS = ("bert-base-uncased", "tokenizer")

    def __init__(self, vision, text, tokenizer, mlp: AestheticMLP, transform: ImageTransform,
                 dtype: DTypeName = "auto"):
        super().__init__(transform, dtype)
        self.vision, self.text, self.mlp = vision, text, mlp
        self.tokenizer = tokenizer
        self.freeze()

    @classmethod
    def from_pretrained(cls, path=None, med_config=None, tokenizer=None, vision_heads: int | None = None,
                        dtype: DTypeName = "auto"):
        from transformers import BertTokenizer


        what = "ImageRewardReward(imagereward)"
        file = resolve_file(path, ("ImageReward.pt",), what)
        here = file.parent
        med = Path(med_config).expanduser() if med_config else here / "med_config.json"
        if not med.is_file():
            raise RewardFileError(f"{what}: {med} does not exist; pass med_config=<ImageReward's med_config.json>")
        if tokenizer:
            tok_dir = resolve_dir(tokenizer, f"{what} tokenizer", marker="vocab.txt")
        else:
            candidates = [here / d for d in cls.TOKENIZER_DIRS] + [here]
            tok_dir = first_dir(candidates, "vocab.txt")
            if tok_dir is None:
                raise RewardFileError(f"{what}: no bert-base-uncased tokenizer (vocab.txt) next to {file}; pass "
                                      f"tokenizer=<folder> (looked in {', '.join(map(str, candidates))})")
        state = unwrap_state_dict(load_tensor_file(file, what), what)
        heads = int(vision_heads) if vision_heads else None  # a string when it comes from the command line
        vision, text, mlp = build_imagereward(state, json.loads(med.read_text()), heads, what)
        tok = BertTokenizer.from_pretrained(tok_dir, local_files_only=True)
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        transform = ImageTransform(vision.config.image_size, crop_rounding="round")
        return cls(vision, text, tok, mlp, transform, dtype)

    def score(self, images, prompts):
        prompts = _prompts(prompts, images.shape[0], self.NAME)
        image_embeds = self.vision(pixel_values=self.pixels(images)).last_hidden_state
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.MAX_TOKENS,
                             return_tensors="pt").to(self.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        text = self.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                         encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
        raw = _wide(self.mlp(text.last_hidden_state[:, 0]).squeeze(-1))
        return (raw - self.MEAN) / self.STD

