"""Training checkpoints, written atomically and without pickle.

``<output_dir>/checkpoints/step-000010/`` (``step-000010-1`` when step 10 is written again) holds ``state.safetensors`` (LoRA weights, value net,
optimizer moments, torch RNG state) and ``state.json`` (step, optimizer hyper-parameters, python
and numpy RNG states, config).  The folder is written under a temporary name, fsynced and renamed;
``latest`` is replaced atomically after that, and no folder is removed before ``latest`` names
another, so whenever the writer is killed ``latest`` names a complete checkpoint.

Old checkpoints are rotated by the step each one records in its own ``state.json`` (never by folder
name, never the one just written).  :func:`find_checkpoint` returns the newest *usable* checkpoint:
a corrupt or half-written newest one is reported and the previous good one used.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "find_checkpoint",
           "checkpoint_step", "atomic_write_text", "remove_partial", "has_checkpoints"]


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required; the message names the folder and why."""


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, s in state["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    output_dir: Path,
    step: int,
    modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer],
    extra: dict | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically; returns its folder.  Older ones beyond ``keep`` are removed."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=root))
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        sd = m if isinstance(m, dict) else m.state_dict()
        for k, v in sd.items():
            tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
    opt_meta = {}
    for name, opt in optimizers.items():
        t, meta = _optimizer_tensors(opt)
        tensors.update({f"{name}:{k}": v for k, v in t.items()})
        opt_meta[name] = meta
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "step": step,
        "optimizers": opt_meta,
        "rng_python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "rng_numpy": [x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()],
        "extra": extra or {},
    }
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    # never remove or overwrite a folder ``latest`` may name before ``latest`` names the new one:
    # the same step written again (a resumed run) goes to a free name, the old folder after it
    superseded = [p for p in (final, *root.glob(f"{final.name}-*")) if p.is_dir()]
    suffix = 1
    while final.exists():
        final = root / f"step-{step:06d}-{suffix}"
        suffix += 1
    os.rename(tmp, final)
    atomic_write_text(root / "latest", final.name)
    for old in superseded:
        shutil.rmtree(old, ignore_errors=True)
    # rotation by the step each checkpoint records; the one just written is never removed
    others = sorted(((checkpoint_step(p), p) for p in root.glob("step-*") if p.is_dir() and p != final),
                    key=lambda sp: -1 if sp[0] is None else sp[0])
    newer_kept = [p for s, p in others if s is not None and s > step]
    for s, old in others[: max(0, len(others) - (keep - 1))]:
        if old not in newer_kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial(output_dir: Path) -> None:
    """Remove temporary folders left by a run killed while writing a checkpoint."""
    for tmp in (Path(output_dir) / "checkpoints").glob(".step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_step(folder: Path) -> int | None:
    """The step ``folder/state.json`` records, or None when it is missing or unreadable."""
    try:
        return int(json.loads((Path(folder) / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def has_checkpoints(output_dir: Path) -> bool:
    root = Path(output_dir) / "checkpoints"
    return root.is_dir() and any(p.is_dir() for p in root.glob("step-*"))


def _usable(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when it can (header and metadata read)."""
    from safetensors import safe_open

    if checkpoint_step(folder) is None:
        return "state.json missing or unreadable"
    try:
        with safe_open(str(folder / "state.safetensors"), framework="pt") as f:
            list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        return f"state.safetensors unreadable ({type(exc).__name__}: {exc})"
    return None


def find_checkpoint(output_dir: Path, report=print) -> Path | None:
    """The newest usable checkpoint of a run (by recorded step), or None.  Unusable newer ones
    (corrupt, half-written, a dangling ``latest``) are reported through ``report``."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()),
                        key=lambda p: (checkpoint_step(p) or -1, p.name), reverse=True)
    pointer = root / "latest"
    if pointer.exists():  # the last checkpoint written comes first when it is usable
        named = root / pointer.read_text().strip()
        if named.is_dir():
            candidates = [named] + [p for p in candidates if p != named]
        else:
            report(f"[checkpoint] {pointer} names {named.name}, which does not exist; looking for another")
    for folder in candidates:
        why = _usable(folder)
        if why is None:
            return folder
        report(f"[checkpoint] skipping {folder}: {why}")
    return None


def load_checkpoint(
    folder: Path,
    modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer],
) -> dict:
    """Restore modules (a module, or a dict of parameters updated in place), optimizers and RNG
    states; returns the checkpoint's metadata (``step``, ``extra``)."""
    tensors = load_file(str(Path(folder) / "state.safetensors"))
    meta = json.loads((Path(folder) / "state.json").read_text())
    for name, m in modules.items():
        prefix = name + "."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if isinstance(m, dict):
            if set(sd) != set(m):
                raise RuntimeError(f"checkpoint {folder}: {name} keys differ from the model's")
            with torch.no_grad():
                for k, v in sd.items():
                    m[k].copy_(v)
        else:
            m.load_state_dict(sd, strict=True)
    for name, opt in optimizers.items():
        prefix = name + ":"
        _restore_optimizer(opt, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                           meta["optimizers"][name])
    torch.set_rng_state(tensors["rng.torch"])
    version, state, gauss = meta["rng_python"]
    random.setstate((version, tuple(state), gauss))
    np_state = meta["rng_numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return meta
