"""Rule-based reward values; the learned rewards are checked against their official code in
``test_reward_parity.py``."""

import io

import pytest
import torch
from PIL import Image

from diffusion_blend.rewards import REWARDS, UnknownRewardError, get_reward


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


def test_learned_rewards_refuse_to_download():
    for name in ("aesthetic", "clip_score", "pickscore", "hpsv2", "imagereward"):
        with pytest.raises(ValueError, match="never downloaded"):
            REWARDS[name]()
