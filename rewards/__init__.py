"""Reward registry: ``name -> factory(**options) -> callable(images, prompts) -> tensor (B,)``.

``images`` are float tensors ``(B, 3, H, W)`` in [0, 1]; ``prompts`` a list of B strings.
Rule-based rewards need no weights; learned rewards load the files their projects publish from local
paths only (``path=`` a file or a folder holding it, plus per-reward companions), never from a hub at
run time; see :mod:`.learned` for each reward's files and options.
"""

from __future__ import annotations

import inspect

import torch
from typing import Any, Callable, Iterable

from .learned import AestheticReward, CLIPScoreReward, HPSv2Reward, ImageRewardReward, PickScoreReward
from .rules import Brightness, JpegCompressibility, JpegIncompressibility, Saturation

RewardFn = Callable[..., Any]  # (images, prompts) -> tensor (B,)

REWARDS: dict[str, Callable[..., RewardFn]] = {
    "jpeg_compressibility": JpegCompressibility,
    "jpeg_incompressibility": JpegIncompressibility,
    "brightness": Brightness,
    "saturation": Saturation,
    "aesthetic": AestheticReward.from_pretrained,
    "clip_score": CLIPScoreReward.from_pretrained,
    "pickscore": PickScoreReward.from_pretrained,
    "hpsv2": HPSv2Reward.from_pretrained,
    "imagereward": ImageRewardReward.from_pretrained,
}
RULE_BASED = ("jpeg_compressibility", "jpeg_incompressibility", "brightness", "saturation")
#: the rewards with a gradient (every learned one through its ``score``; of the rules, these two)
DIFFERENTIABLE = ("brightness", "saturation", "aesthetic", "clip_score", "pickscore", "hpsv2", "imagereward")


class UnknownRewardError(ValueError):
    pass


def check_reward_name(name: str) -> None:
    if name not in REWARDS:
        raise UnknownRewardError(f"reward {name!r} is not registered; known rewards: {', '.join(sorted(REWARDS))}")


def get_reward(name: str, **options) -> RewardFn:
    """Build the reward ``name``; learned rewards need ``path=`` (a local file or folder)."""
    check_reward_name(name)
    return REWARDS[name](**options)


def differentiable_score(fn: RewardFn, images, prompts):
    """``fn``'s reward of ``images`` with its graph kept (``(B,)``), for a gradient with respect to the
    images: a learned reward's ``score`` (its ``__call__`` runs without gradients), a rule that says
    ``differentiable = True``, or any other callable (the toy rewards of the validation) whose output
    depends on the images through autograd.  A reward with no gradient is refused, naming it."""
    if getattr(fn, "differentiable", None) is False:
        raise TypeError(f"reward {type(fn).__name__} is not differentiable; train it with algorithm.name = dpok")
    score = getattr(fn, "score", None)
    out = score(images, prompts) if callable(score) else fn(images, prompts)
    if not (torch.is_tensor(out) and out.requires_grad):
        raise TypeError(f"reward {getattr(fn, '__name__', type(fn).__name__)} returned a value without a gradient with "
                        "respect to the images; adjoint_matching needs a differentiable reward (use dpok)")
    return out


def reward_options(paths: Iterable[str] = (), options: Iterable[str] = ()) -> dict[str, dict[str, str]]:
    """``get_reward`` options from command-line items ``REWARD=PATH`` and ``REWARD.KEY=VALUE``.

    ``PATH`` is the official file or a folder holding it; ``KEY`` is any other option of that reward's
    loader (e.g. ``aesthetic.clip=/models/clip-vit-large-patch14``, ``hpsv2.arch=ViT-H-14``).
    """
    out: dict[str, dict[str, str]] = {}
    for item in paths:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"reward path {item!r}: expected REWARD=PATH (a file or folder)")
        check_reward_name(name)
        out.setdefault(name, {})["path"] = path
    for item in options:
        target, sep, value = item.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise ValueError(f"reward option {item!r}: expected REWARD.KEY=VALUE")
        check_reward_name(name)
        known = [p for p in inspect.signature(REWARDS[name]).parameters if p != "path"]
        if key not in known:
            raise ValueError(f"reward option {item!r}: {name} has no option {key!r}; "
                             f"its options: {', '.join(known) or 'none'}")
        out.setdefault(name, {})[key] = value
    return out


__all__ = ["DIFFERENTIABLE", "REWARDS", "RULE_BASED", "differentiable_score", "UnknownRewardError", "check_reward_name", "get_reward", "reward_options"]
