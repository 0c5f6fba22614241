"""LoRA safetensors files: the one reader and the one writer of every key format we accept.

A LoRA adds ``scale * up @ down`` to the weight ``W`` (out x in) of a Linear layer, or the
equivalent pair of convolutions to a Conv2d (``down``: r x in x kh x kw, ``up``: out x r x 1 x 1).

Accepted key formats (module name ``M``, a dotted diffusers path ``P`` or a ComfyUI path ``C``):

================  ====================================================  ========================
format            keys                                                  scale
================  ====================================================  ========================
kohya             ``lora_unet_<P with _>.lora_down.weight/.lora_up.weight``  ``alpha / rank``
                  and ``.alpha``
diffusers / peft  ``unet.P.lora_A.weight`` / ``.lora_B.weight`` (also      ``alpha / rank`` when an
                  ``base_model.model.P`` and bare ``P``, optional ``.alpha``) ``.alpha`` key exists,
                                                                            else 1 (as ComfyUI)
ComfyUI           ``diffusion_model.C.lora_down.weight`` ... (either pair)  as above
================  ====================================================  ========================

Text-encoder modules (``lora_te*``, ``text_encoder*``) are not part of a UNet blend: they are
listed in :attr:`LoraFile.ignored_keys` and skipped.  Pickle files are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "LoraFormatError",
    "LoraModule",
    "LoraFile",
    "read_lora",
    "write_lora",
    "update_metadata",
    "lora_module_names",
    "kohya_name",
    "METADATA_ALPHA_REF",
    "METADATA_REWARD",
    "METADATA_FINGERPRINT",
    "METADATA_CHAIN",
]

METADATA_ALPHA_REF = "db.alpha_ref"
METADATA_REWARD = "db.reward"
METADATA_FINGERPRINT = "db.base_fingerprint"
#: how the LoRA was trained to be sampled (JSON: sampler, eta, steps, spacing, prediction, cfg, ...)
METADATA_CHAIN = "db.chain"

_PAIRS = {  # suffix -> (role); every low-rank pair ComfyUI's LoRA adapter reads
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_A": "down",
    ".lora_B": "up",
    ".alpha": "alpha",
}
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te.", "te1.", "te2.", "lora_te1_", "lora_te2_")
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


class LoraFormatError(ValueError):
    """A LoRA file cannot be used; the message names the file and the offending key."""


@dataclass(frozen=True)
class LoraModule:
    """The low-rank update of one module: ``delta_W = scale * up @ down``."""

    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None  # None: no alpha stored, scale = 1 (ComfyUI's convention)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    def delta_weight(self) -> torch.Tensor:
        """The dense ``scale * up @ down`` in float32, shaped like the Linear/Conv weight."""
        up = self.up.float().flatten(1)
        down = self.down.float().flatten(1)
        delta = (up @ down) * self.scale
        if self.down.ndim == 4:
            delta = delta.reshape(self.up.shape[0], *self.down.shape[1:])
        return delta


@dataclass(frozen=True)
class LoraFile:
    """A parsed LoRA file: modules keyed by the module name used in the file."""

    path: str
    modules: Mapping[str, LoraModule]
    metadata: Mapping[str, str] = field(default_factory=dict)
    ignored_keys: tuple[str, ...] = ()
    #: every non-text-encoder tensor of the file by key (shared with ``modules``): what a host's
    #: own loader reads, including adapters that are not plain low-rank pairs (LoHa, LoKr, DoRA, ...)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    #: keys that are not plain low-rank pairs (only with ``read_lora(..., strict=False)``)
    other_keys: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def alpha_ref(self) -> float | None:
        """``db.alpha_ref`` from the metadata, or None when the file has none."""
        raw = self.metadata.get(METADATA_ALPHA_REF)
        if raw is None or raw == "":
            return None
        try:
            return float(raw)
        except ValueError:
            raise LoraFormatError(
                f"{self.name}: metadata {METADATA_ALPHA_REF}={raw!r} is not a number"
            ) from None

    @property
    def reward(self) -> str | None:
        return self.metadata.get(METADATA_REWARD)

    @property
    def chain(self) -> dict | None:
        """``db.chain``: the sampling chain the LoRA was trained on, or None when the file has none."""
        raw = self.metadata.get(METADATA_CHAIN)
        if not raw:
            return None
        try:
            chain = json.loads(raw)
        except ValueError:
            chain = None
        if not isinstance(chain, dict):
            raise LoraFormatError(f"{self.name}: metadata {METADATA_CHAIN}={raw!r} is not a JSON object")
        return chain

    def num_bytes(self) -> int:
        if self.tensors:
            return sum(t.numel() * t.element_size() for t in self.tensors.values())
        return sum(m.down.numel() * m.down.element_size() + m.up.numel() * m.up.element_size()
                   for m in self.modules.values())


def kohya_name(path: str) -> str:
    """kohya's module name for the dotted diffusers path ``path``."""
    return "lora_unet_" + path.replace(".", "_")


def lora_module_names(path: str) -> list[str]:
    """Every module name a LoRA file may use for the UNet module at dotted ``path``."""
    return [path, "unet." + path, "base_model.model." + path, "diffusion_model." + path, kohya_name(path)]


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _PAIRS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def read_lora(path: str | os.PathLike, strict: bool = True) -> LoraFile:
    """Read a LoRA ``.safetensors`` file (kohya, diffusers/peft or ComfyUI keys).

    Raises :class:`LoraFormatError` naming the file and key for pickle files, corrupt or truncated
    files, unknown keys, inconsistent shapes and non-finite values.  With ``strict=False`` keys
    that are not plain low-rank pairs (LoHa, LoKr, DoRA scales, LoCon mids, full diffs, ...) are
    kept in :attr:`LoraFile.tensors` and listed in :attr:`LoraFile.other_keys` for a host loader
    that understands them (the ComfyUI nodes hand them to ComfyUI's weight adapters), and a
    module that has any of them is not listed in :attr:`LoraFile.modules`.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    if path.lower().endswith(_PICKLE_SUFFIXES):
        raise LoraFormatError(
            f"{name}: pickle-based LoRA files are refused (they can run code when loaded); "
            "convert it to .safetensors"
        )
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise LoraFormatError(f"{name}: file not found ({path})") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers/data
        raise LoraFormatError(
            f"{name}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
            "is it truncated or corrupt?"
        ) from None

    parts: dict[str, dict[str, torch.Tensor]] = {}
    ignored: list[str] = []
    other: list[str] = []
    for key, tensor in tensors.items():
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            ignored.append(key)
            continue
        split = _split_key(key)
        if split is None and not strict:
            if not torch.isfinite(tensor.float()).all():
                raise LoraFormatError(f"{name}: {key} contains NaN or inf")
            other.append(key)
            continue
        if split is None:
            raise LoraFormatError(
                f"{name}: key {key!r} is not a LoRA key this loader understands "
                "(expected .lora_down/.lora_up, .lora_A/.lora_B or .alpha)"
            )
        module_name, role = split
        parts.setdefault(module_name, {})[role] = tensor

    modules: dict[str, LoraModule] = {}
    # a module with parts that are not a plain pair (a DoRA scale, a LoCon mid, ...) is the host's
    with_other = {k.rsplit(".", 1)[0] for k in other} | {k.rsplit(".", 2)[0] for k in other}
    for module_name, p in parts.items():
        if ("down" in p) != ("up" in p) and module_name not in with_other:  # half a pair: never silently dropped
            raise LoraFormatError(f"{name}: module {module_name!r} has no {'up' if 'down' in p else 'down'} matrix")
        if not strict and (module_name in with_other or "down" not in p or "up" not in p):
            other.extend(f"{module_name}{suffix}" for suffix, role in _PAIRS.items() if role in p
                         and f"{module_name}{suffix}" in tensors)
            continue
        if "down" not in p or "up" not in p:
            missing = "up" if "down" in p else "down"
            raise LoraFormatError(f"{name}: module {module_name!r} has no {missing} matrix")
        down, up = p["down"], p["up"]
        for role, t in (("down", down), ("up", up)):
            if t.ndim not in (2, 4):
                raise LoraFormatError(
                    f"{name}: {module_name}.{role} has shape {tuple(t.shape)}; expected a 2-D or 4-D matrix"
                )
            if not torch.isfinite(t.float()).all():
                raise LoraFormatError(f"{name}: {module_name}.{role} contains NaN or inf")
        if up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"{name}: {module_name} has up {tuple(up.shape)} and down {tuple(down.shape)}: ranks differ"
            )
        if down.shape[0] < 1:
            raise LoraFormatError(f"{name}: {module_name} has rank {down.shape[0]}; expected a rank >= 1")
        alpha = None
        if "alpha" in p:
            if p["alpha"].numel() != 1:
                raise LoraFormatError(f"{name}: {module_name}.alpha has shape {tuple(p['alpha'].shape)}; expected a scalar")
            alpha = float(p["alpha"].float().reshape(-1)[0])
            if not torch.isfinite(torch.tensor(alpha)):
                raise LoraFormatError(f"{name}: {module_name}.alpha is {alpha}; expected a finite number")
            if alpha == 0.0:
                raise LoraFormatError(f"{name}: {module_name}.alpha is 0, so the module would do nothing "
                                      "(scale = alpha / rank); expected alpha != 0")
        modules[module_name] = LoraModule(down=down, up=up, alpha=alpha)
    if not modules and not other:
        raise LoraFormatError(f"{name}: no UNet LoRA modules found")
    kept = {k: t for k, t in tensors.items() if k not in set(ignored)}
    return LoraFile(path=path, modules=modules, metadata=metadata, ignored_keys=tuple(sorted(ignored)),
                    tensors=kept, other_keys=tuple(sorted(set(other))))


KeyFormat = Literal["kohya", "peft", "transformer"]


def _file_key(path: str, key_format: KeyFormat) -> str:
    if key_format == "kohya":
        return kohya_name(path)
    if key_format == "peft":
        return "unet." + path
    if key_format == "transformer":  # diffusers' naming for transformer models (SD3, Flux), which ComfyUI maps
        return "transformer." + path
    raise ValueError(f"key_format={key_format!r}: expected 'kohya', 'peft' or 'transformer'")


def write_lora(
    path: str | os.PathLike,
    modules: Mapping[str, LoraModule],
    metadata: Mapping[str, object] | None = None,
    key_format: KeyFormat = "kohya",
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``modules`` (keyed by dotted diffusers paths) atomically as a LoRA safetensors file.

    kohya keys are ``lora_unet_<path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``;
    peft keys are ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``, and ``transformer``
    keys the same under ``transformer.<path>`` (diffusers' SD3/Flux naming).  ``alpha`` is
    always written, so any reader applies ``scale = alpha / rank`` exactly as stored.
    """
    tensors: dict[str, torch.Tensor] = {}
    down_suffix, up_suffix = (
        (".lora_down.weight", ".lora_up.weight") if key_format == "kohya" else (".lora_A.weight", ".lora_B.weight")
    )
    for module_path, m in modules.items():
        key = _file_key(module_path, key_format)
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        tensors[key + down_suffix] = cast(m.down).contiguous()
        tensors[key + up_suffix] = cast(m.up).contiguous()
        alpha = float(m.rank) if m.alpha is None else float(m.alpha)
        tensors[key + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    str_metadata = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    atomic_save_safetensors(tensors, path, str_metadata)


def update_metadata(path: str | os.PathLike, updates: Mapping[str, str]) -> dict[str, str]:
    """Rewrite ``path`` atomically with its tensors unchanged and ``updates`` merged into its
    metadata; returns the new metadata.  The file is validated by :func:`read_lora` first."""
    read_lora(path)
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata.update({str(k): str(v) for k, v in updates.items()})
    atomic_save_safetensors(tensors, path, metadata)
    return metadata


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` to a temporary file in the same folder, fsync, rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata else None)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def index_module_names(paths: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Map every LoRA module name for each ``(alias_path, target)`` pair to ``target``."""
    index: dict[str, str] = {}
    for alias_path, target in paths:
        for n in lora_module_names(alias_path):
            index.setdefault(n, target)
    return index
