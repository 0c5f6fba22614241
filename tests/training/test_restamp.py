"""``diffusion-blend-train restamp``: LoRAs trained before alpha_ref was in raw reward units."""

import json

import pytest
import torch

from diffusion_blend.blend.lora_file import LoraModule, read_lora, write_lora
from diffusion_blend.training.cli import main


def _old_run(tmp_path, advantage="batch", stds=(0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.3, 0.2)):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"algorithm": {"advantage": advantage}}))
    (run / "log.jsonl").write_text("".join(json.dumps({"step": i + 1, "reward_std": s}) + "\n"
                                           for i, s in enumerate(stds)))
    g = torch.Generator().manual_seed(0)
    modules = {"down_blocks.0.attn.to_q": LoraModule(torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g), 4.0)}
    write_lora(run / "lora.safetensors", modules, {"db.alpha_ref": "0.001", "db.reward": "saturation"})
    return run


def test_restamp_multiplies_by_the_final_reward_std_and_keeps_the_weights(tmp_path, capsys):
    run = _old_run(tmp_path)
    before = read_lora(run / "lora.safetensors")
    assert main(["restamp", "--lora", str(run / "lora.safetensors"), "--log", str(run / "log.jsonl"),
                 "--out", str(tmp_path / "new.safetensors")]) == 0
    after = read_lora(tmp_path / "new.safetensors")
    # the last quarter of 8 steps: (0.3, 0.2), median 0.25
    assert after.alpha_ref == pytest.approx(0.001 * 0.25, rel=1e-12)
    assert after.metadata["db.alpha_ref_restamped_from"] == "0.001" and after.metadata["db.reward"] == "saturation"
    assert "median batch reward_std of the last 2 logged steps" in after.metadata["db.restamp_note"]
    m0, m1 = before.modules, after.modules
    assert all(torch.equal(m0[k].down, m1[k].down) and torch.equal(m0[k].up, m1[k].up) for k in m0)
    assert read_lora(run / "lora.safetensors").alpha_ref == 0.001  # --out leaves the original alone
    assert "0.00025" in capsys.readouterr().out
    # a second re-stamp, or a file that already states raw units, is refused
    assert main(["restamp", "--lora", str(tmp_path / "new.safetensors"), "--log", str(run / "log.jsonl")]) == 2


def test_restamp_refuses_per_prompt_runs_and_unreadable_logs(tmp_path, capsys):
    run = _old_run(tmp_path, advantage="per_prompt")
    assert main(["restamp", "--lora", str(run / "lora.safetensors"), "--log", str(run / "log.jsonl")]) == 2
    assert "per_prompt" in capsys.readouterr().err
    (run / "log.jsonl").write_text("not json\n")
    assert main(["restamp", "--lora", str(run / "lora.safetensors"), "--log", str(run / "log.jsonl"), "--force"]) == 2
    assert "--log" in capsys.readouterr().err
    assert read_lora(run / "lora.safetensors").alpha_ref == 0.001  # nothing was written
