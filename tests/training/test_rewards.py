"""Rewards: rule-based values, and every learned reward's code path on tiny random networks."""

import io

import pytest
import torch
from PIL import Image

from diffusion_blend.training.rewards import REWARDS, UnknownRewardError, get_reward


def test_rule_based_values():
    black, white = torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1.0
    imgs = torch.cat([black, white, red])
    assert get_reward("brightness")(imgs, [""] * 3).tolist() == pytest.approx([0.0, 1.0, 1 / 3])
    assert get_reward("saturation")(imgs, [""] * 3).tolist() == pytest.approx([0.0, 0.0, 1.0])
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    flat = torch.full((1, 3, 64, 64), 0.5)
    both = torch.cat([noise, flat])
    inc = get_reward("jpeg_incompressibility")(both, ["", ""])
    buf = io.BytesIO()
    Image.fromarray((noise[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(buf, format="JPEG", quality=95)
    assert inc[0].item() == pytest.approx(buf.tell() / 1000.0)
    assert inc[0] > inc[1]
    assert torch.equal(get_reward("jpeg_compressibility")(both, ["", ""]), -inc)


def test_unknown_reward_lists_the_known_ones():
    with pytest.raises(UnknownRewardError, match="brightness"):
        get_reward("beauty")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, tiny_base):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(d)
    CLIPTokenizer.from_pretrained(tiny_base["diffusers"] / "tokenizer").save_pretrained(d)
    return d


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "hpsv2", "aesthetic"])
def test_clip_family_rewards_run_offline(tiny_clip_dir, name):
    from safetensors.torch import save_file

    from diffusion_blend.training.rewards.learned import AestheticMLP

    if name == "aesthetic":
        torch.manual_seed(1)
        save_file(AestheticMLP(16).state_dict(), str(tiny_clip_dir / "aesthetic_mlp.safetensors"))
    reward = get_reward(name, path=str(tiny_clip_dir))
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(2))
    scores = reward(images, ["a cat", "a dog", "a bird"])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    if name == "clip_score":  # 100 * max(cos, 0): random towers give cosines of either sign
        assert (scores >= 0).all()
    else:
        assert scores.std() > 0


def test_imagereward_runs_offline(tmp_path):
    from safetensors.torch import save_file
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    from diffusion_blend.training.rewards.learned import ImageRewardReward

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "bird", "photo", "of"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=len(vocab), encoder_hidden_size=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, image_text_hidden_size=16,
    )
    BlipForImageTextRetrieval(config).save_pretrained(tmp_path)
    save_file(ImageRewardReward.make_mlp(32).state_dict(), str(tmp_path / "imagereward_mlp.safetensors"))
    reward = get_reward("imagereward", path=str(tmp_path))
    scores = reward(torch.rand(2, 3, 32, 32), ["a photo of a cat", "a dog"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_learned_rewards_refuse_to_download():
    for name in ("aesthetic", "clip_score", "pickscore", "hpsv2", "imagereward"):
        with pytest.raises(ValueError, match="never downloaded"):
            REWARDS[name]()
