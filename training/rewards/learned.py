"""Learned rewards, loaded from local folders only (``local_files_only=True``).

All but ImageReward are CLIP-family scorers on transformers' ``CLIPModel``:

* ``aesthetic`` -- LAION aesthetic predictor v2: an MLP on the L2-normalized CLIP ViT-L/14 image
  embedding. Folder: a CLIP model (``clip/`` or the folder itself) and ``aesthetic_mlp.safetensors``
  (or the original ``.pth`` state dict, read with ``weights_only=True``).
* ``clip_score`` -- ``100 * cos(image, text)`` (clamped at 0), CLIP ViT-L/14.
* ``pickscore`` -- PickScore v1: ``logit_scale.exp() * cos(image, text)``.
* ``hpsv2`` -- HPS v2 (a fine-tuned CLIP ViT-H/14) in transformers layout: ``cos(image, text)``.
* ``imagereward`` -- ImageReward: BLIP image-grounded text encoder + MLP on the [CLS] feature,
  standardized with the published mean/std; transformers ``BlipForImageTextRetrieval`` layout plus
  ``imagereward_mlp.safetensors``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AestheticReward", "CLIPScoreReward", "PickScoreReward", "HPSv2Reward", "ImageRewardReward", "AestheticMLP"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _require_dir(path: str | os.PathLike | None, what: str) -> Path:
    if path is None:
        raise ValueError(f"{what}: needs path=<local folder with the model>; learned rewards are never downloaded")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: model folder {p} does not exist")
    return p


def preprocess(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic), center-crop, normalize."""
    x = images.float().clamp(0, 1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - m) / s


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


class _CLIPScorer(nn.Module):
    def __init__(self, model, tokenizer):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @classmethod
    def _load_clip(cls, folder: Path):
        from transformers import CLIPModel, CLIPTokenizer

        clip_dir = folder / "clip" if (folder / "clip").is_dir() else folder
        return (CLIPModel.from_pretrained(clip_dir, local_files_only=True),
                CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True))

    @classmethod
    def from_pretrained(cls, path=None, **kwargs):
        folder = _require_dir(path, cls.__name__)
        model, tokenizer = cls._load_clip(folder)
        return cls(model, tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = preprocess(images.to(self.device), self.model.config.vision_config.image_size)
        return F.normalize(self.model.get_image_features(pixel_values=pixels), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").to(self.device)
        return F.normalize(self.model.get_text_features(**tok), dim=-1)

    def cosine(self, images, prompts) -> torch.Tensor:
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)


class CLIPScoreReward(_CLIPScorer):
    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (100.0 * self.cosine(images, prompts)).clamp_min(0).float().cpu()


class PickScoreReward(_CLIPScorer):
    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (self.model.logit_scale.exp() * self.cosine(images, prompts)).float().cpu()


class HPSv2Reward(_CLIPScorer):
    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.cosine(images, prompts).float().cpu()


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor v2 head (state-dict keys ``layers.{0,2,4,6,7}``)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


class AestheticReward(_CLIPScorer):
    MLP_FILES = ("aesthetic_mlp.safetensors", "sac+logos+ava1-l14-linearMSE.pth")

    def __init__(self, model, tokenizer, mlp: AestheticMLP | None = None):
        super().__init__(model, tokenizer)
        self.mlp = (mlp or AestheticMLP(model.config.projection_dim)).eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path=None, **kwargs):
        folder = _require_dir(path, cls.__name__)
        model, tokenizer = cls._load_clip(folder)
        mlp = AestheticMLP(model.config.projection_dim)
        for name in cls.MLP_FILES:
            if (folder / name).exists():
                mlp.load_state_dict(_load_state_dict(folder / name))
                break
        else:
            raise FileNotFoundError(f"AestheticReward: none of {cls.MLP_FILES} in {folder}")
        return cls(model, tokenizer, mlp)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        return self.mlp(self.image_features(images)).squeeze(-1).float().cpu()


class ImageRewardReward(nn.Module):
    """ImageReward: ``(MLP(text_encoder(prompt | image)[CLS]) - mean) / std``."""

    MEAN, STD = 0.16717362830052426, 1.0333394966054072

    def __init__(self, blip, tokenizer, mlp: nn.Module):
        super().__init__()
        self.blip = blip.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.mlp = mlp.eval().requires_grad_(False)

    @staticmethod
    def make_mlp(dim: int) -> nn.Module:
        return AestheticMLP(dim)

    @classmethod
    def from_pretrained(cls, path=None):
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        folder = _require_dir(path, cls.__name__)
        blip = BlipForImageTextRetrieval.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        mlp = cls.make_mlp(blip.config.text_config.hidden_size)
        mlp_file = folder / "imagereward_mlp.safetensors"
        if not mlp_file.exists():
            raise FileNotFoundError(f"ImageRewardReward: {mlp_file} is missing")
        mlp.load_state_dict(_load_state_dict(mlp_file))
        return cls(blip, tokenizer, mlp)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.blip.parameters()).device
        size = self.blip.config.vision_config.image_size
        pixels = preprocess(images.to(device), size)
        image_embeds = self.blip.vision_model(pixel_values=pixels).last_hidden_state
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                             return_tensors="pt").to(device)
        attn = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        text = self.blip.text_encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                                      encoder_hidden_states=image_embeds, encoder_attention_mask=attn)
        score = self.mlp(text.last_hidden_state[:, 0]).squeeze(-1)
        return ((score - self.MEAN) / self.STD).float().cpu()
