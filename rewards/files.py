"""Reading the files learned rewards are published as, safely and with errors that say what is missing.

* :func:`load_tensor_file` reads ``.safetensors`` or a ``.pt``/``.pth``/``.bin`` file with
  ``torch.load(weights_only=True)`` only: a file that needs arbitrary unpickling is refused.
* :func:`resolve_file` / :func:`resolve_dir` turn "a file, or a folder holding it" into a path.
* :func:`load_strict` loads a state dict and fails on any missing or unexpected key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = ["RewardFileError", "load_tensor_file", "resolve_file", "resolve_dir", "load_strict", "unwrap_state_dict"]


class RewardFileError(ValueError):
    """A learned reward's files are missing, unreadable or do not match the expected format."""


def load_tensor_file(path: str | os.PathLike, what: str) -> dict:
    """Tensors of ``path``: safetensors, or a torch file read with ``weights_only=True`` (never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise RewardFileError(f"{what}: file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise RewardFileError(
            f"{what}: {path} cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Rewards never unpickle arbitrary objects; "
            f"re-save the weights as a plain state dict (torch.save(model.state_dict(), ...)) or as safetensors"
        ) from None
    if not isinstance(data, Mapping):
        raise RewardFileError(f"{what}: {path} holds a {type(data).__name__}, expected a state dict of tensors")
    return dict(data)


def unwrap_state_dict(data: dict, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: ``data['state_dict']`` if present, with a DDP ``module.`` prefix removed."""
    state = data.get("state_dict", data)
    if not isinstance(state, Mapping):
        raise RewardFileError(f"{what}: 'state_dict' is a {type(state).__name__}, expected a mapping of tensors")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not state:
        raise RewardFileError(f"{what}: the checkpoint holds no tensors")
    return state


def resolve_file(path: str | os.PathLike | None, names: Iterable[str], what: str) -> Path:
    """``path`` if it is a file, else the first of ``names`` inside the folder ``path``."""
    names = tuple(names)
    if path is None or str(path).strip() == "":
        raise RewardFileError(f"{what}: needs path=<local file or folder> ({' or '.join(names)}); "
                              "learned rewards are never downloaded")
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for name in names:
            if (p / name).is_file():
                return p / name
        raise RewardFileError(f"{what}: none of {', '.join(names)} is in the folder {p}")
    raise RewardFileError(f"{what}: {p} does not exist (expected {' or '.join(names)}, or a folder holding it)")


def resolve_dir(path: str | os.PathLike | None, what: str, marker: str = "config.json") -> Path:
    """``path`` as a folder that holds ``marker`` (a transformers model or tokenizer folder)."""
    if path is None or str(path).strip() == "":
        raise RewardFileError(f"{what}: needs path=<local folder>; learned rewards are never downloaded")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise RewardFileError(f"{what}: folder {p} does not exist")
    if marker and not (p / marker).is_file():
        raise RewardFileError(f"{what}: {p} has no {marker}; expected a transformers folder")
    return p


def first_dir(candidates: Iterable[Path], marker: str) -> Path | None:
    """The first existing folder among ``candidates`` that holds ``marker``."""
    for c in candidates:
        if c.is_dir() and (c / marker).is_file():
            return c
    return None


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state)``, failing loudly on any missing, unexpected or misshapen key."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def head(items):
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = [f"missing keys: {head(missing)}" if missing else "",
                 f"unexpected keys: {head(unexpected)}" if unexpected else "",
                 f"shape mismatches: {head(shapes)}" if shapes else ""]
        raise RewardFileError(f"{what}: the weights do not match the model; " + "; ".join(p for p in parts if p))
    module.load_state_dict(dict(state), strict=True)
