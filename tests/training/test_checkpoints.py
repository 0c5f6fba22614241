"""Checkpoints that cannot lose work: rotation by recorded step, corrupt or dangling newest ones,
runs that refuse to mix, and SIGKILL at random points (a checkpoint write included)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_blend.training.checkpoint import (CheckpointError, checkpoint_step, find_checkpoint, load_checkpoint,
                                                 save_checkpoint)

from trainkit import tiny_config, write_yaml

VENV_BIN = Path(sys.executable).parent


def _state(value: float):
    weights = {"w": torch.full((3,), value)}
    return {"lora": weights}, {}


def test_rotation_is_by_recorded_step_and_never_drops_the_new_checkpoint(tmp_path):
    modules, opts = _state(1.0)
    for step in (10, 11):  # an earlier run left higher-numbered checkpoints behind
        save_checkpoint(tmp_path, step, modules, opts)
    new = save_checkpoint(tmp_path, 4, *_state(4.0))
    root = tmp_path / "checkpoints"
    assert new.exists() and (root / "latest").read_text() == "step-000004"
    assert {checkpoint_step(p) for p in root.glob("step-*")} >= {4, 11}
    assert find_checkpoint(tmp_path) == new  # the last one written, not the highest name
    for step in (5, 6, 7):
        save_checkpoint(tmp_path, step, *_state(float(step)))
    kept = sorted(checkpoint_step(p) for p in root.glob("step-*"))
    assert 7 in kept and 4 not in kept and 5 not in kept  # keep=2 among the run's own: 6, 7


def test_a_corrupt_or_dangling_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, capsys):
    save_checkpoint(tmp_path, 1, *_state(1.0))
    second = save_checkpoint(tmp_path, 2, *_state(2.0))
    (second / "state.safetensors").write_bytes(b"\xff" * 64)  # a corrupt header
    found = find_checkpoint(tmp_path)
    assert checkpoint_step(found) == 1
    report = capsys.readouterr().out
    assert "skipping" in report and "state.safetensors unreadable" in report
    weights, _ = _state(0.0)
    load_checkpoint(found, weights, {})
    assert torch.equal(weights["lora"]["w"], torch.full((3,), 1.0))
    (tmp_path / "checkpoints" / "latest").write_text("step-000009")  # dangling
    (second / "state.json").unlink()
    assert checkpoint_step(find_checkpoint(tmp_path)) == 1
    assert "step-000009, which does not exist" in capsys.readouterr().out


class _Killed(BaseException):
    """The process dies here (a BaseException: no ``except Exception`` in the writer can catch it)."""


def _die_at(monkeypatch, n: int) -> list[int]:
    """Every file-system step a checkpoint write takes (create, write, fsync, rename, replace, unlink,
    rmdir), counted; the ``n``-th one never happens: the process is killed just before it."""
    import diffusion_blend.training.checkpoint as ckpt

    count = [0]

    def deadly(fn):
        def step(*args, **kwargs):
            count[0] += 1
            if count[0] == n:
                raise _Killed(f"killed before step {n} ({fn.__name__})")
            return fn(*args, **kwargs)
        return step

    for name in ("mkdir", "open", "fsync", "rename", "replace", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, deadly(getattr(os, name)))
    monkeypatch.setattr(Path, "write_text", deadly(Path.write_text))
    monkeypatch.setattr(ckpt, "save_file", deadly(ckpt.save_file))
    return count


@pytest.mark.parametrize("again", [False, True], ids=["next_step", "same_step_again"])
def test_latest_names_a_complete_checkpoint_whenever_the_writer_is_killed(tmp_path, again):
    """Kill the writer before each of its file-system steps in turn, from a run with checkpoints 10 and
    20: ``latest`` always names a complete checkpoint (20, or the new one), which the reader takes
    without falling back, and after the write it names the new one.  ``again``: step 20 written a
    second time (a resumed run reaching a step it had saved)."""
    import shutil as sh

    start = tmp_path / "start"
    save_checkpoint(start, 10, *_state(10.0))
    save_checkpoint(start, 20, *_state(20.0))
    step, value = (20, 21.0) if again else (30, 30.0)
    n = 0
    while True:
        n += 1
        run = tmp_path / f"kill{n}"
        sh.copytree(start, run)
        with pytest.MonkeyPatch.context() as mp:
            count = _die_at(mp, n)
            try:
                save_checkpoint(run, step, *_state(value))
                killed = False
            except _Killed:
                killed = True
        root = run / "checkpoints"
        named = root / (root / "latest").read_text().strip()
        reports: list[str] = []
        assert find_checkpoint(run, report=reports.append) == named and not reports, (n, reports)
        weights, _ = _state(0.0)
        load_checkpoint(named, weights, {})
        got = float(weights["lora"]["w"][0])
        assert got in (20.0, value), (n, got)
        if not killed:
            assert got == value and count[0] == n - 1
            break
    assert n > 8  # every step of the write was tried


def test_runs_refuse_to_mix_and_strict_resume_needs_a_checkpoint(tmp_path):
    from diffusion_blend.training.train import _resume_point

    out = tmp_path / "run"
    assert _resume_point(out, "auto", False) is None  # nothing yet: auto starts fresh
    with pytest.raises(CheckpointError, match="--resume: no usable checkpoint"):
        _resume_point(out, True, False)
    save_checkpoint(out, 3, *_state(3.0))
    with pytest.raises(CheckpointError, match="holds checkpoints of another run"):
        _resume_point(out, False, False)
    assert checkpoint_step(_resume_point(out, "strict", False)) == 3
    assert _resume_point(out, False, True) is None and not (out / "checkpoints").exists()  # --overwrite


def _cli(*args, env=None):
    return subprocess.run([str(VENV_BIN / "diffusion-blend-train"), *args], capture_output=True, text=True, env=env)


def test_cli_refuses_a_second_fresh_run_and_export_without_config_says_why(tmp_path):
    out = tmp_path / "run"
    save_checkpoint(out, 1, *_state(1.0), extra={})
    res = _cli("export", "--checkpoint", str(out), "--out", str(tmp_path / "x.safetensors"))
    assert res.returncode == 2 and "has no config, base_fingerprint, reward_scale, chain" in res.stderr
    assert not (tmp_path / "x.safetensors").exists()


def _kill_config(tiny_base, out):
    return tiny_config(tiny_base["diffusers"], out, **{
        "steps": 5, "checkpoint_every": 1, "batch_size": 2, "sampling.steps": 2, "algorithm.advantage": "value"})


@pytest.fixture(scope="module")
def uninterrupted(tiny_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    cfg = write_yaml(_kill_config(tiny_base, d / "run"), d / "full.yaml")
    res = _cli("--config", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(d / "run" / "lora.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kill", ["random:1", "random:2", "random:3", "rename:3", "latest:2"])
def test_sigkill_anywhere_then_resume_equals_uninterrupted(tiny_base, tmp_path, uninterrupted, kill):
    mode, _, arg = kill.partition(":")
    out = tmp_path / "run"
    cfg = write_yaml(_kill_config(tiny_base, out), tmp_path / "run.yaml")
    if mode == "random":  # a random moment after the first checkpoint (seeded)
        proc = subprocess.Popen([str(VENV_BIN / "diffusion-blend-train"), "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "latest").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
            time.sleep(0.02)
        time.sleep(random.Random(int(arg)).uniform(0.0, 4.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    else:  # inside the N-th checkpoint write
        env = dict(os.environ, DB_KILL_AT=kill)
        res = subprocess.run([sys.executable, str(Path(__file__).with_name("kill_probe.py")), "--config", str(cfg)],
                             capture_output=True, text=True, env=env)
        assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    for folder in (out / "checkpoints").glob("step-*"):  # every visible checkpoint is complete
        load_file(str(folder / "state.safetensors"))
        json.loads((folder / "state.json").read_text())
    assert _cli("--config", str(cfg)).returncode == 2 if (out / "checkpoints").exists() else True  # no silent restart
    resumed = _cli("--config", str(cfg), "--resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _same(uninterrupted, load_file(str(out / "lora.safetensors")))
