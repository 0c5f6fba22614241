import pytest
import torch
from safetensors.torch import save_file

from diffusion_blend.blend.lora_file import (
    LoraFormatError, LoraModule, index_module_names, kohya_name, read_lora, write_lora,
)

from helpers import random_lora, toy_net


@pytest.mark.parametrize("key_format", ["kohya", "peft"])
def test_roundtrip(tmp_path, key_format):
    net = toy_net()
    modules = random_lora(net, seed=3, alpha=0.5)
    path = tmp_path / "l.safetensors"
    write_lora(path, modules, {"db.alpha_ref": "0.0001", "db.reward": "brightness"}, key_format=key_format)
    lora = read_lora(path)
    assert lora.alpha_ref == 1e-4 and lora.reward == "brightness"
    names = {kohya_name(p) if key_format == "kohya" else "unet." + p: p for p in modules}
    assert set(lora.modules) == set(names)
    for name, p in names.items():
        got = lora.modules[name]
        assert torch.equal(got.down, modules[p].down) and torch.equal(got.up, modules[p].up)
        assert got.scale == 0.5 / 2
        assert torch.equal(got.delta_weight(), modules[p].delta_weight())


def test_every_format_resolves_to_the_same_module():
    index = index_module_names([("down_blocks.0.attentions.0.proj_in", "input_blocks.1.1.proj_in")])
    for name in ["lora_unet_down_blocks_0_attentions_0_proj_in", "unet.down_blocks.0.attentions.0.proj_in",
                 "down_blocks.0.attentions.0.proj_in", "base_model.model.down_blocks.0.attentions.0.proj_in"]:
        assert index[name] == "input_blocks.1.1.proj_in"


def test_peft_without_alpha_uses_scale_one(tmp_path):
    path = tmp_path / "p.safetensors"
    save_file({"unet.a.lora_A.weight": torch.ones(2, 4), "unet.a.lora_B.weight": torch.ones(3, 2)}, str(path))
    assert read_lora(path).modules["unet.a"].scale == 1.0


def test_text_encoder_keys_are_listed_and_skipped(tmp_path):
    path = tmp_path / "te.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(3, 2),
               "lora_te_x.lora_down.weight": torch.ones(2, 4)}, str(path))
    lora = read_lora(path)
    assert list(lora.modules) == ["lora_unet_a"] and lora.ignored_keys == ("lora_te_x.lora_down.weight",)


@pytest.mark.parametrize("tensors,match", [
    ({"lora_unet_a.lora_down.weight": torch.full((2, 4), float("nan")), "lora_unet_a.lora_up.weight": torch.ones(3, 2)},
     r"lora_unet_a\.down contains NaN or inf"),
    ({"lora_unet_a.lora_down.weight": torch.ones(2, 4)}, "lora_unet_a.*no up"),
    ({"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(3, 5)}, "ranks differ"),
    ({"model.weird": torch.ones(2)}, "model.weird"),
    ({"lora_unet_a.lora_down.weight": torch.ones(0, 4), "lora_unet_a.lora_up.weight": torch.ones(3, 0)},
     r"bad\.safetensors: lora_unet_a has rank 0; expected a rank >= 1"),
    ({"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(3, 2),
      "lora_unet_a.alpha": torch.tensor(0.0)}, r"bad\.safetensors: lora_unet_a\.alpha is 0, so the module would do nothing"),
    ({"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(3, 2),
      "lora_unet_a.alpha": torch.tensor(float("inf"))}, r"lora_unet_a\.alpha is inf; expected a finite number"),
])
@pytest.mark.parametrize("strict", [True, False])
def test_bad_files(tmp_path, tensors, match, strict):
    """Refused in both modes: ``strict=False`` (the hosts' reading, which hands adapters it does not know
    to the host's loader) must not let half a low-rank pair through either."""
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    if not strict and match == "model.weird":
        assert read_lora(path, strict=False).other_keys == ("model.weird",)  # a host adapter's key: kept
        return
    with pytest.raises(LoraFormatError, match=match):
        read_lora(path, strict=strict)


def test_truncated_file(tmp_path):
    net = toy_net()
    path = tmp_path / "t.safetensors"
    write_lora(path, random_lora(net, 1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFormatError, match="t.safetensors.*truncated or corrupt"):
        read_lora(path)


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.pt", "evil.bin"])
def test_pickles_are_refused_unopened(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04 this would be unpickled")
    with pytest.raises(LoraFormatError, match="pickle"):
        read_lora(path)


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"previous")
    import diffusion_blend.blend.lora_file as lf

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(lf, "save_file", boom)
    with pytest.raises(OSError):
        write_lora(path, {"x": LoraModule(torch.ones(1, 2), torch.ones(2, 1), None)})
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
