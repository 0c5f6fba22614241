"""The training loop end to end on the tiny base (CPU)."""

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusion_blend.training.families import load_policy
from diffusion_blend.training.train import evaluate_policy, run_training

from trainkit import PROMPTS, tiny_config, write_yaml

VENV_BIN = Path(sys.executable).parent
HELD_OUT = list(range(1000, 1016))


def test_dpok_raises_brightness_and_alpha_regularizes(tiny_base, tmp_path):
    """The paper's (beta, rho) with rho != 1: the file states beta / rho, and a 10x larger alpha
    gives clearly less reward gain and less KL."""
    base_cfg = tiny_config(tiny_base["diffusers"], tmp_path / "base")
    prompts = PROMPTS * (len(HELD_OUT) // 2)
    base = evaluate_policy(load_policy(base_cfg), base_cfg, HELD_OUT, prompts)
    results = {}
    for beta, rho in ((2e-5, 4.0), (2e-3, 4.0)):  # alpha_ref 5e-6 and 5e-4 (brightness std ~5e-3)
        cfg = tiny_config(tiny_base["diffusers"], tmp_path / f"beta{beta}", **{
            "algorithm.alpha_ref": "null", "algorithm.kl_weight": beta, "algorithm.reward_weight": rho})
        trained = run_training(cfg, progress=False)
        results[beta] = evaluate_policy(trained.policy, cfg, HELD_OUT, prompts)
        meta = safe_open(str(trained.lora_path), "pt").metadata()
        assert float(meta["db.alpha_ref"]) == beta / rho  # never beta * rho, never beta
        assert float(meta["db.reward_scale"]) == trained.reward_scale == trained.history[0]["reward_scale"]
        assert meta["db.algorithm"] == "dpok" and meta["db.reward"] == "brightness"
    low, high = results[2e-5], results[2e-3]
    se = math.sqrt(base["reward_se"] ** 2 + low["reward_se"] ** 2)
    gain_low, gain_high = low["reward_mean"] - base["reward_mean"], high["reward_mean"] - base["reward_mean"]
    print(f"base {base['reward_mean']:.4f}; alpha 5e-6: gain {gain_low:.4f} ({gain_low / se:.1f} SE), KL {low['kl_mean']:.1f}; "
          f"alpha 5e-4: gain {gain_high:.4f}, KL {high['kl_mean']:.1f}")
    assert gain_low > 3 * se
    assert gain_high < 0.7 * gain_low and high["kl_mean"] < 0.5 * low["kl_mean"]
    assert base["kl_mean"] == 0.0


def _cli(*args, **kw):
    return subprocess.run([str(VENV_BIN / "diffusion-blend-train"), *args], capture_output=True, text=True, **kw)


def test_accelerate_two_cpu_processes_keep_identical_weights(tiny_base, tmp_path):
    """Two DDP workers on the CPU (gloo), DPOK then Adjoint Matching in one launch: each rank draws its
    own chains (different samples: the batch is split, not duplicated) and both end with the same
    weights.  accelerate 1.11's ``--cpu`` launches a single process unless mpirun is set up;
    ``--multi_gpu`` on a machine without GPUs starts torchrun workers whose Accelerator falls back to
    MULTI_CPU with the gloo backend."""
    out = tmp_path / "ddp"
    cfg = write_yaml(tiny_config(tiny_base["diffusers"], out, **{"steps": 2, "batch_size": 2, "sampling.steps": 2}),
                     tmp_path / "ddp.yaml")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([str(VENV_BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
                          "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                          str(Path(__file__).with_name("ddp_probe.py")), str(cfg), "dpok", "adjoint_matching"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    for algorithm in ("dpok", "adjoint_matching"):
        ran = out / algorithm
        assert (ran / "rank0.world").read_text() == "2"
        assert (ran / "rank0.sha").read_text() == (ran / "rank1.sha").read_text()
        assert (ran / "rank0.samples").read_text() != (ran / "rank1.samples").read_text(), algorithm
        lora = load_file(str(ran / "lora.safetensors"))
        assert any(k.endswith("lora_up.weight") and lora[k].abs().max() > 0 for k in lora)  # it trained


BAD = {
    "unknown reward": ({"rewards": {"beauty": 1.0}}, "rewards.beauty: unknown reward"),
    "missing prompt file": ({"prompt_file": "/nonexistent/prompts.txt"}, "prompt_file"),
    "rank 0": ({"lora.rank": 0}, "lora.rank = 0"),
    "negative alpha": ({"algorithm.alpha_ref": -0.1}, "algorithm.alpha_ref = -0.1"),
    "unreadable base": ({"base.path": "/nonexistent/base"}, "base.path: /nonexistent/base does not exist"),
    "learned reward without weights": ({"rewards": {"aesthetic": 1.0}}, "reward_options.aesthetic.path"),
    "log_every 0": ({"log_every": 0}, "log_every = 0: expected an integer >= 1"),
    "image_every -1": ({"image_every": -1}, "image_every = -1: expected an integer >= 1"),
    "a string for the prompt list": ({"prompts": "a cat"}, "prompts = 'a cat': expected a list of strings"),
    "a string for the targets": ({"lora.targets": "to_q"}, "lora.targets = 'to_q': expected a list of strings"),
    "a boolean reward weight": ({"rewards": {"saturation": True}}, "rewards.saturation = True: expected a finite weight"),
    "a boolean for a number": ({"lr": True}, "lr = True: expected a number, not a boolean"),
    "output folder under a file": ({"output_dir": "/etc/hostname/run"}, "output_dir = '/etc/hostname/run'"),
    "output folder is the root": ({"output_dir": "/"}, "output_dir = '/': expected a folder of its own"),
    # root may "write" anywhere by os.access, yet nothing can be created in /proc: the check creates
    "output folder that cannot be created": ({"output_dir": "/proc/db_run/out"},
                                             "output_dir = '/proc/db_run/out': cannot create or write it"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_fails_before_any_compute(tiny_base, tmp_path, case):
    overrides, message = BAD[case]
    cfg = tiny_config(tiny_base["diffusers"], tmp_path / "out")
    path = write_yaml(cfg, tmp_path / "bad.yaml")
    args = []
    for k, v in overrides.items():
        args += [f"--{k}", repr(v) if not isinstance(v, str) else v]
    t0 = time.monotonic()
    res = _cli("--config", str(path), *args)
    assert res.returncode == 2
    assert message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "out").exists()  # nothing was started
    assert time.monotonic() - t0 < 30


def test_export_subcommand_reproduces_the_final_lora(tiny_base, tmp_path):
    cfg = tiny_config(tiny_base["diffusers"], tmp_path / "run", **{"steps": 2, "batch_size": 2, "sampling.steps": 2,
                                                                     "lora.alpha": 6.0, "lora.rslora": True})
    result = run_training(cfg, progress=False)
    res = _cli("export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "exported.safetensors"))
    assert res.returncode == 0, res.stderr
    a, b = load_file(str(result.lora_path)), load_file(str(tmp_path / "exported.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    alpha = next(v for k, v in a.items() if k.endswith(".alpha"))
    assert alpha.item() == pytest.approx(6.0 / math.sqrt(4) * 4)  # kohya alpha/rank == peft lora_alpha/sqrt(r)


def test_ddpo_and_multi_reward_runs(tiny_base, tmp_path):
    """DDPO (no KL) on the same sampler, trained on a weighted sum of two rewards (the MORL oracle)."""
    cfg = tiny_config(tiny_base["diffusers"], tmp_path / "ddpo", **{
        "algorithm.name": "ddpo", "rewards": {"brightness": 0.7, "saturation": 0.3}, "steps": 2, "batch_size": 2,
        "sampling.steps": 2, "image_every": 1})
    result = run_training(cfg, progress=False)
    meta = safe_open(str(result.lora_path), "pt").metadata()
    assert meta["db.algorithm"] == "ddpo" and meta["db.reward"] == "brightness:0.7,saturation:0.3"
    assert "db.alpha_ref" not in meta  # no KL term, no reference KL weight
    h = result.history[-1]
    assert {"reward/brightness_mean", "reward/saturation_mean", "grad_norm", "samples_per_s"} <= set(h)
    assert h["reward_mean"] == pytest.approx(0.7 * h["reward/brightness_mean"] + 0.3 * h["reward/saturation_mean"], rel=1e-5)
    assert (tmp_path / "ddpo" / "samples" / "step-000001.png").exists()
    assert any((tmp_path / "ddpo" / "tensorboard").iterdir())


def test_training_reads_the_official_reward_files(tiny_base, tmp_path, reward_replicas, monkeypatch):
    """``reward_options`` point at the official files (ImageReward.pt, the aesthetic .pth): the run
    validates, loads each reward model once and logs both rewards (the MORL oracle's two bases)."""
    from diffusion_blend import rewards

    loads = []
    for name in ("imagereward", "aesthetic"):
        monkeypatch.setitem(rewards.REWARDS, name, lambda _f=rewards.REWARDS[name], _n=name, **k: loads.append(_n) or _f(**k))
    cfg = tiny_config(tiny_base["diffusers"], tmp_path / "learned", **{
        "rewards": {"imagereward": 0.5, "aesthetic": 0.5}, "steps": 2, "batch_size": 2, "sampling.steps": 2,
        "reward_options": {"imagereward": {"path": reward_replicas["imagereward"]["path"]},
                           "aesthetic": {"path": reward_replicas["aesthetic"]["path"]}}})
    result = run_training(cfg, progress=False)
    assert sorted(loads) == ["aesthetic", "imagereward"]  # once per run, not per step
    h = result.history[-1]
    assert math.isfinite(h["reward/imagereward_mean"]) and math.isfinite(h["reward/aesthetic_mean"])
    assert h["reward_mean"] == pytest.approx(0.5 * h["reward/imagereward_mean"] + 0.5 * h["reward/aesthetic_mean"],
                                             rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_the_demo_config_trains_any_family_through_the_cli(family, tiny_sdxl, tiny_sd3, tiny_flux, tmp_path):
    """The family is read from the base: the shipped demo config, unchanged but for --base.path."""
    from diffusion_blend.blend.lora_file import read_lora

    base = {"sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}[family]
    config = Path(__file__).resolve().parents[2] / "configs" / "demo_tiny.yaml"
    out = tmp_path / family
    res = _cli("--config", str(config), "--base.path", str(base), "--steps", "2", "--batch_size", "2",
               "--sampling.steps", "2", "--output_dir", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    lora = read_lora(out / "lora.safetensors")
    assert lora.chain.get("family", "sd") == ("sd" if family == "sdxl" else family)
    assert lora.chain["sampler"] == ("ddim" if family == "sdxl" else "flow_ancestral")


def test_single_file_checkpoint_with_local_config(tiny_base, tmp_path):
    """The same base from ComfyUI's single-file checkpoint plus the local diffusers configs."""
    from diffusion_blend.training.pipeline import load_base

    folder = load_base(tiny_base["diffusers"])
    single = load_base(tiny_base["checkpoint"], single_file_config=tiny_base["diffusers"])
    a, b = folder.unet.state_dict(), single.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
