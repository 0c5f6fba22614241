"""The Score node reads the learned rewards' official files (in-process ComfyUI, tiny replicas)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

import official_rewards  # noqa: E402

PROMPT = "a red house with a big tree"


@pytest.fixture()
def score_node(comfy_inprocess, monkeypatch):
    """The node module, with ComfyUI's reward folders restored after each test (they are global)."""
    import folder_paths

    from diffusion_blend.nodes import tool_nodes

    entry = folder_paths.folder_names_and_paths[tool_nodes.REWARD_FOLDER]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, tool_nodes.REWARD_FOLDER, (list(entry[0]), set(entry[1])))
    return tool_nodes


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE batch (B, H, W, 3) of uint8 levels, at the replicas' 32 px."""
    return (torch.rand(n, 32, 32, 3, generator=torch.Generator().manual_seed(seed)) * 255).round() / 255


@pytest.mark.parametrize("name", ["imagereward", "hpsv2", "pickscore", "aesthetic", "clip_score"])
def test_score_node_with_official_files_equals_the_official_code(name, score_node, reward_replicas, tmp_path):
    """Each reward's files in ``models/diffusion_blend_rewards/<reward>/`` (the official names, no
    options), scored by the node, equal the official implementation's scores."""
    import folder_paths

    src = Path(reward_replicas[name]["path"])
    root = tmp_path / "diffusion_blend_rewards"
    folder = root / name
    if name in ("pickscore", "clip_score"):  # a transformers folder: the model folder itself
        shutil.copytree(src, folder)
        if name == "pickscore":  # PickScore_v1 with the CLIP-H processor inside it as processor/
            shutil.copytree(src.parent / "CLIP-ViT-H-14-laion2B-s32B-b79K", folder / "processor")
    else:  # the official file with its companions beside it
        shutil.copytree(src.parent, folder)
    folder_paths.add_model_folder_path(score_node.REWARD_FOLDER, str(root), is_default=True)
    kwargs = {"model_path": f"{name}/HPS_v2.1_compressed.pt"} if name == "hpsv2" else {}  # a file, relative
    images = _images()
    mean, _, scores = score_node.score_images(images, name, prompt=PROMPT, batch_size=1, **kwargs)
    official = {
        "imagereward": lambda: official_rewards.imagereward(folder),
        "hpsv2": lambda: official_rewards.hpsv2(folder / "HPS_v2.1_compressed.pt"),
        "pickscore": lambda: official_rewards.pickscore(folder, folder / "processor"),
        "aesthetic": lambda: official_rewards.aesthetic(folder / "sac+logos+ava1-l14-linearMSE.pth",
                                                        folder / "clip-vit-large-patch14"),
        "clip_score": lambda: official_rewards.clip_score(folder),
    }[name]()
    pils = [Image.fromarray((img.numpy() * 255).round().astype(np.uint8)) for img in images]
    want = [official(pil, PROMPT) for pil in pils]
    scale = 100.0 if name == "clip_score" else max(abs(w) for w in want)  # CLIP score: 100 x a cosine
    assert scores == pytest.approx(want, rel=1e-5, abs=1e-5 * scale)
    assert mean == pytest.approx(sum(scores) / len(scores))


def test_score_node_names_what_is_missing(score_node, tmp_path):
    import folder_paths

    root = tmp_path / "diffusion_blend_rewards"
    (root / "imagereward").mkdir(parents=True)
    folder_paths.add_model_folder_path(score_node.REWARD_FOLDER, str(root), is_default=True)
    with pytest.raises(ValueError, match="none of ImageReward.pt is in the folder"):
        score_node.score_images(_images(1), "imagereward", prompt=PROMPT)
    with pytest.raises(ValueError, match="model_path='nope.pt': no such file or folder under"):
        score_node.score_images(_images(1), "imagereward", prompt=PROMPT, model_path="nope.pt")
