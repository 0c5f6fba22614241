"""ComfyUI nodes for trade-off graphs: ``DiffusionBlendScore`` (reward of images) and
``DiffusionBlendImageGrid`` (a labelled grid of a batch).

The work is in :func:`score_images` and :func:`labelled_grid`; the V3 node classes declare the inputs."""

from __future__ import annotations

import os

import comfy.utils
import folder_paths
import torch

from ..blend.grid import image_grid, parse_labels
from ..rewards import REWARDS, RULE_BASED, get_reward
from .cache import LruCache
from .schema import check_choices, io

CATEGORY = "diffusion_blend"
#: learned reward models are looked up under ``<ComfyUI models>/diffusion_blend_rewards/<name>``
REWARD_FOLDER = "diffusion_blend_rewards"
_REWARD_CACHE: LruCache = LruCache(2)  # learned reward models are large: keep two

if REWARD_FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path(REWARD_FOLDER, os.path.join(folder_paths.models_dir, REWARD_FOLDER))


def _reward_path(reward: str, model_path: str) -> str | None:
    """Where a learned reward's files are: ``model_path`` (an official file such as ``ImageReward.pt``
    or a model folder; absolute, or relative to a ``diffusion_blend_rewards`` folder) if given, else
    the first ``diffusion_blend_rewards/<reward>`` folder ComfyUI knows of."""
    if reward in RULE_BASED:
        return None
    roots = folder_paths.get_folder_paths(REWARD_FOLDER)
    model_path = model_path.strip()
    if model_path:
        candidates = [model_path] if os.path.isabs(model_path) else [os.path.join(r, model_path) for r in roots]
        for candidate in candidates:
            if os.path.exists(candidate):
                return candidate
        raise ValueError(f"model_path={model_path!r}: no such file or folder"
                         + ("" if os.path.isabs(model_path) else f" under {', '.join(roots)}"))
    for root in roots:
        candidate = os.path.join(root, reward)
        if os.path.isdir(candidate):
            return candidate
    raise ValueError(f"reward={reward!r}: a learned reward needs its official files; put them in "
                     f"<{', '.join(roots)}>/{reward}/ or give model_path (a file or folder; see the README's "
                     f"reward table) (rule-based rewards: {', '.join(RULE_BASED)})")


def _reward_fn(reward: str, path: str | None):
    return _REWARD_CACHE.get((reward, path or ""), lambda: get_reward(reward, **({"path": path} if path else {})))


def score_images(images: torch.Tensor, reward: str, prompt: str = "", model_path: str = "",
                 batch_size: int = 8) -> tuple[float, str, list[float]]:
    """``(mean, text, scores)``: ``reward`` of each image of a ComfyUI IMAGE batch (B, H, W, C)."""
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"images: expected an IMAGE batch (B, H, W, 3), got shape {tuple(images.shape)}")
    fn = _reward_fn(reward, _reward_path(reward, model_path))
    chw = images[..., :3].permute(0, 3, 1, 2).float()
    pbar = comfy.utils.ProgressBar(chw.shape[0])
    scores: list[float] = []
    for start in range(0, chw.shape[0], batch_size):
        chunk = chw[start : start + batch_size]
        with torch.no_grad():
            scores += [float(s) for s in fn(chunk, [prompt] * chunk.shape[0])]
        pbar.update(chunk.shape[0])
    mean = sum(scores) / len(scores)
    text = f"{reward}: mean {mean:.4f}\n" + "\n".join(f"#{i}: {s:.4f}" for i, s in enumerate(scores))
    return mean, text, scores


def labelled_grid(images: torch.Tensor, columns: int, labels: str) -> torch.Tensor:
    """One IMAGE (1, H, W, 3): the batch laid out ``columns`` to a row (0: one row), captioned."""
    captions = parse_labels(labels)
    if captions and len(captions) != images.shape[0]:
        raise ValueError(f"labels: got {len(captions)} captions for {images.shape[0]} images; "
                         "expected one per image (or none)")
    return image_grid(images[..., :3], columns or images.shape[0], captions)[None]


class DiffusionBlendScore(io.ComfyNode):
    """Score images with a reward of the registry."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionBlendScore",
            display_name="Diffusion Blend Score (reward)",
            category=CATEGORY,
            description="Scores images with a basis reward, to build trade-off graphs inside ComfyUI.",
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="Images to score (a batch scores each image)."),
                io.Combo.Input("reward", options=sorted(REWARDS), default="brightness", tooltip=(
                    "Reward from the registry. Rule-based ones need nothing; learned ones read their "
                    "official files from models/diffusion_blend_rewards/<reward>/ or model_path.")),
                io.String.Input("prompt", default="", multiline=False, optional=True,
                                tooltip="Prompt for text-conditioned rewards (CLIP score, PickScore, ...)."),
                io.String.Input("model_path", default="", optional=True, tooltip=(
                    "A learned reward's official file (ImageReward.pt, HPS_v2.1_compressed.pt, "
                    "sac+logos+ava1-l14-linearMSE.pth) or model folder (PickScore_v1, CLIP), absolute or "
                    "relative to models/diffusion_blend_rewards; companions are found beside it.")),
                io.Int.Input("batch_size", default=8, min=1, max=256, optional=True, tooltip="Images scored at once."),
            ],
            outputs=[io.Float.Output(display_name="mean", tooltip="Mean reward over the batch."),
                     io.String.Output(display_name="scores", tooltip="One line per image: its index and reward.")],
        )

    @classmethod
    def validate_inputs(cls, reward: str | None = None) -> bool | str:
        return check_choices(reward=(reward, sorted(REWARDS)))

    @classmethod
    def execute(cls, images: torch.Tensor, reward: str, prompt: str = "", model_path: str = "",
                batch_size: int = 8) -> io.NodeOutput:
        mean, text, scores = score_images(images, reward, prompt, model_path, batch_size)
        return io.NodeOutput(mean, text, ui={"text": [text], "scores": scores})


class DiffusionBlendImageGrid(io.ComfyNode):
    """Lay out a batch of images as a grid with a caption above each cell."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffusionBlendImageGrid",
            display_name="Diffusion Blend Image Grid",
            category=CATEGORY,
            description="Labelled image grid, e.g. for a reward-weight or KL-strength sweep.",
            inputs=[
                io.Image.Input("images", tooltip="The batch to lay out, row by row."),
                io.Int.Input("columns", default=0, min=0, max=64,
                             tooltip="Cells per row; 0 puts the whole batch in one row."),
                io.String.Input("labels", default="", multiline=True,
                                tooltip="One caption per image, separated by new lines or '|'."),
            ],
            outputs=[io.Image.Output(tooltip="One image: the labelled grid.")],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, columns: int, labels: str) -> io.NodeOutput:
        return io.NodeOutput(labelled_grid(images, columns, labels))


NODES: list[type[io.ComfyNode]] = [DiffusionBlendScore, DiffusionBlendImageGrid]
