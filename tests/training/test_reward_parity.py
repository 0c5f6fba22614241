"""Learned rewards vs. their official implementations, on random-weight replicas of the official files.

How each reference is computed is documented in ``official_rewards.py``: the ``image-reward`` and
``hpsv2x`` packages' own scoring functions, the PickScore README snippet, torchmetrics' ``clip_score``,
and a re-computation of the LAION aesthetic predictor's published formula.

Images are uint8 (as the official code reads them from files) and the references get them as PIL
images; ours get the same pixels as floats in [0, 1].
"""

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import official_rewards  # noqa: E402

from diffusion_blend.rewards import get_reward  # noqa: E402
from diffusion_blend.rewards.files import RewardFileError  # noqa: E402
from diffusion_blend.rewards.learned import preprocess  # noqa: E402

LEARNED = ["imagereward", "hpsv2", "pickscore", "aesthetic", "clip_score"]
PROMPTS = ["a photo of a cat", "a red house with a big tree", "sunset over the sea"]


@pytest.fixture(scope="module")
def official(reward_replicas):
    return official_rewards.official_scorers(reward_replicas)


@pytest.fixture(scope="module")
def ours(reward_replicas):
    return {name: get_reward(name, **options) for name, options in reward_replicas.items()}


def uint8_images(h: int, w: int, seed: int) -> tuple[torch.Tensor, list[Image.Image]]:
    u8 = (torch.rand(len(PROMPTS), 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255).round().byte()
    return u8.float() / 255, [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in u8]


@pytest.mark.parametrize("name", LEARNED)
def test_scores_equal_the_official_code(name, ours, official):
    images, pils = uint8_images(32, 32, seed=0)  # the replicas' input size: no resampling involved
    got = ours[name](images, PROMPTS)
    want = torch.tensor([official[name](pil, prompt) for pil, prompt in zip(pils, PROMPTS)])
    assert got.shape == (3,) and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), (got, want)
    assert want.std() > 1e-3 * want.abs().max()  # the replica separates the images: a real check
    if name == "clip_score":
        assert (want == 0).any() and (want > 0).any()  # both sides of max(100 cos, 0) are exercised


def test_hps_scores_equal_the_official_code_after_resizing(ours, official):
    """HPS resizes float tensors in the official code too (ToTensor before ResizeMaxSize): exact."""
    for h, w, seed in ((48, 40, 1), (40, 64, 2)):
        images, pils = uint8_images(h, w, seed)
        got = ours["hpsv2"](images, PROMPTS)
        want = torch.tensor([official["hpsv2"](pil, prompt) for pil, prompt in zip(pils, PROMPTS)])
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (h, w, got, want)


def _official_pixels(name: str, reward_replicas, pil: Image.Image) -> torch.Tensor:
    """The official preprocessing of ``pil``, un-normalised back to [0, 1]."""
    from transformers import CLIPImageProcessor

    if name == "imagereward":
        ir, _, _ = official_rewards._imagereward_modules()
        x = ir._transform(32)(pil)
    elif name == "aesthetic":
        x = official_rewards.openai_clip_transform(32)(pil)
    elif name == "hpsv2":
        x = official_rewards._hpsv2_preprocess(32)(pil)
    else:
        folder = Path(reward_replicas[name]["path"])
        folder = folder if name == "clip_score" else folder.parent / "CLIP-ViT-H-14-laion2B-s32B-b79K"
        x = torch.from_numpy(CLIPImageProcessor.from_pretrained(folder)(images=[pil])["pixel_values"][0])
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    return x * std + mean


def smooth_uint8_images(h: int, w: int, seed: int) -> tuple[torch.Tensor, list[Image.Image]]:
    """Photograph-like images (smooth at the scale of a pixel): upsampled coarse noise, as uint8."""
    coarse = torch.rand(len(PROMPTS), 3, 6, 5, generator=torch.Generator().manual_seed(seed))
    u8 = (torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear") * 255).round().byte()
    return u8.float() / 255, [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in u8]


@pytest.mark.parametrize("name", LEARNED)
def test_preprocessing_matches_the_official_transform(name, ours, reward_replicas):
    """Resize + crop (or pad) + normalise agree with the official transform on non-square images:
    exactly for HPS (the official code resizes float tensors too), and within 1.5/255 per pixel where
    the official code resizes PIL images (PIL resamples in two passes, each rounded to uint8; on
    pixel noise that rounding alone differs by up to 12 levels, on photograph-like images by one)."""
    tol = 1e-6 if name == "hpsv2" else 1.5 / 255
    for h, w, seed in ((48, 40, 1), (40, 64, 2), (50, 33, 3)):
        images, pils = smooth_uint8_images(h, w, seed)
        t = ours[name].transform
        mine = preprocess(images, t) * torch.tensor(t.std)[:, None, None] + torch.tensor(t.mean)[:, None, None]
        for i, pil in enumerate(pils):
            theirs = _official_pixels(name, reward_replicas, pil)
            assert mine[i].shape == theirs.shape
            err = (mine[i] - theirs).abs().max().item()
            assert err <= tol, f"{name} {h}x{w}: max pixel error {err * 255:.3f}/255"


@pytest.mark.parametrize("name", LEARNED)
def test_differentiable_path_matches_scores_and_finite_differences(name, reward_replicas):
    """``score`` is ``__call__`` with gradients; its gradient along a random direction equals a
    central difference (float64; float32 for transformers' CLIP text tower, which cannot build its
    causal mask in float64)."""
    wide = name not in ("clip_score", "pickscore")
    dtype, eps, rel = (torch.float64, 1e-6, 1e-5) if wide else (torch.float32, 1e-3, 1e-2)
    reward = get_reward(name, **reward_replicas[name], dtype="float64" if wide else "float32")
    images, _ = uint8_images(32, 32, seed=4)
    x = images.to(dtype).requires_grad_(True)
    values = reward.score(x, PROMPTS)
    assert torch.allclose(values.float(), get_reward(name, **reward_replicas[name])(images, PROMPTS), atol=1e-4)
    (grad,) = torch.autograd.grad(values.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    with torch.no_grad():
        fd = (reward.score(x + eps * direction, PROMPTS).sum() - reward.score(x - eps * direction, PROMPTS).sum()) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(float(fd), rel=rel)


def test_half_precision_scores_are_close(reward_replicas):
    images, _ = uint8_images(32, 32, seed=6)
    full = get_reward("pickscore", **reward_replicas["pickscore"])(images, PROMPTS)
    half = get_reward("pickscore", **reward_replicas["pickscore"], dtype="bfloat16")
    assert half.dtype == torch.float32 and half(images, PROMPTS).dtype == torch.float32
    assert torch.allclose(half(images, PROMPTS), full, atol=0.05 * float(full.abs().max()))


# --- the ImageReward converter, key by key ------------------------------------------------------------------

def test_imagereward_converter_maps_every_official_key(reward_replicas):
    """Every tensor of the official vision tower lands on its transformers parameter, and every
    parameter of ``BlipVisionModel``/``BlipTextModel``/the MLP is filled from the file."""
    from diffusion_blend.rewards.imagereward import VISION_KEYS, build_imagereward, convert_imagereward

    folder = Path(reward_replicas["imagereward"]["path"]).parent
    state = torch.load(folder / "ImageReward.pt", map_location="cpu", weights_only=True)
    vision, text, mlp = convert_imagereward(state)
    for old, new in VISION_KEYS.items():
        for i in ("0", "1"):
            src, dst = "blip.visual_encoder." + old.replace("{i}", i), new.replace("{i}", i)
            assert vision[dst] is state[src], (src, dst)
    used = len(vision) + len(text) + len(mlp)
    assert used == len(state) - 5  # all but vision_proj and text_proj (weight, bias) and the position ids
    import json

    v_model, t_model, m_model = build_imagereward(state, json.loads((folder / "med_config.json").read_text()), None, "t")
    for module, part in ((v_model, vision), (t_model, text), (m_model, mlp)):
        own = module.state_dict()
        assert set(own) == set(part)
        assert all(torch.equal(own[k], part[k]) for k in own)


def _save(tmp_path, state, name="ImageReward.pt"):
    torch.save(state, tmp_path / name)
    return tmp_path / name


@pytest.fixture()
def imagereward_copy(tmp_path, reward_replicas):
    import shutil

    src = Path(reward_replicas["imagereward"]["path"]).parent
    shutil.copy(src / "med_config.json", tmp_path)
    shutil.copytree(src / "bert-base-uncased", tmp_path / "bert-base-uncased")
    return tmp_path, torch.load(src / "ImageReward.pt", map_location="cpu", weights_only=True)


def test_imagereward_refuses_unknown_and_missing_keys(imagereward_copy):
    folder, state = imagereward_copy
    _save(folder, {**state, "blip.itm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(RewardFileError, match=r"not ImageReward's: blip\.itm_head\.weight"):
        get_reward("imagereward", path=str(folder))
    broken = dict(state)
    del broken["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    _save(folder, broken)
    with pytest.raises(RewardFileError, match=r"missing keys: encoder\.layer\.1\.crossattention\.self\.key\.weight"):
        get_reward("imagereward", path=str(folder))
    _save(folder, {k.replace("blocks.1.", "blocks.1.extra."): v for k, v in state.items()})
    with pytest.raises(RewardFileError, match=r"blocks\.1\.extra\.attn\.qkv\.weight"):
        get_reward("imagereward", path=str(folder))


def test_imagereward_names_the_missing_companion_files(imagereward_copy):
    folder, state = imagereward_copy
    _save(folder, state)
    assert get_reward("imagereward", path=str(folder))  # the folder form finds all three
    (folder / "med_config.json").rename(folder / "med.json")
    with pytest.raises(RewardFileError, match="med_config="):
        get_reward("imagereward", path=str(folder / "ImageReward.pt"))
    assert get_reward("imagereward", path=str(folder / "ImageReward.pt"), med_config=str(folder / "med.json"))
    (folder / "bert-base-uncased").rename(folder / "bert")
    with pytest.raises(RewardFileError, match="tokenizer="):
        get_reward("imagereward", path=str(folder), med_config=str(folder / "med.json"))


class Evil(dict):
    """Any class outside torch's allow-list: loading it needs arbitrary unpickling."""


def test_pickled_objects_are_refused(tmp_path, reward_replicas):
    """``torch.load(weights_only=True)`` only: a file that needs arbitrary unpickling is refused."""
    mlp = torch.load(reward_replicas["aesthetic"]["path"], weights_only=True)
    folder = Path(reward_replicas["aesthetic"]["path"]).parent
    bad = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(Evil(mlp), bad)
    with pytest.raises(RewardFileError, match=r"weights_only=True.*never unpickle"):
        get_reward("aesthetic", path=str(bad), clip=str(folder / "clip-vit-large-patch14"))


def test_hps_refuses_weights_of_another_architecture(reward_replicas, tmp_path):
    import json

    src = Path(reward_replicas["hpsv2"]["path"]).parent
    cfg = json.loads((src / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["width"] = 48
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(RewardFileError, match=r"shape mismatches: .*visual"):
        get_reward("hpsv2", path=reward_replicas["hpsv2"]["path"], arch=str(tmp_path))
    with pytest.raises(RewardFileError, match="arch='ViT-Q-99' is neither"):
        get_reward("hpsv2", path=reward_replicas["hpsv2"]["path"], arch="ViT-Q-99")


def test_pickscore_finds_its_processor_and_names_it_when_absent(reward_replicas, tmp_path):
    import shutil

    model = Path(reward_replicas["pickscore"]["path"])
    assert get_reward("pickscore", path=str(model), processor=str(model.parent / "CLIP-ViT-H-14-laion2B-s32B-b79K"))
    shutil.copytree(model, tmp_path / "PickScore_v1")
    with pytest.raises(RewardFileError, match="processor="):
        get_reward("pickscore", path=str(tmp_path / "PickScore_v1"))


def test_prompts_must_match_the_images(ours):
    images, _ = uint8_images(32, 32, seed=7)
    with pytest.raises(ValueError, match="expected 3 prompts"):
        ours["pickscore"](images, ["one"])
    with pytest.raises(ValueError, match=r"images: expected \(B, 3, H, W\)"):
        ours["aesthetic"](images[:, :1])


@pytest.mark.parametrize("name", ["pickscore", "hpsv2"])
def test_each_prompt_is_encoded_once(name, reward_replicas):
    """The text tower runs once per distinct prompt (training rounds and SMC scorings repeat them);
    the scores are those of a fresh model whatever the order and repetition of the prompts."""
    reward, fresh = get_reward(name, **reward_replicas[name]), get_reward(name, **reward_replicas[name])
    tower = reward.model.get_text_features if name == "pickscore" else reward.model.encode_text
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return tower(*args, **kwargs)

    setattr(reward.model, "get_text_features" if name == "pickscore" else "encode_text", counted)
    images, _ = uint8_images(32, 32, seed=8)
    first = reward(images, PROMPTS)
    assert torch.equal(reward(images.flip(0), PROMPTS[::-1]).flip(0), first) and len(calls) == 1
    same = [PROMPTS[1]] * 3
    assert torch.allclose(reward(images, same), fresh(images, same), rtol=1e-6, atol=1e-6) and len(calls) == 1
