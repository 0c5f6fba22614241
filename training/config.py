"""Training configuration: dataclasses, YAML loading, ``--key value`` overrides, validation.

Every check that can fail runs in :func:`validate` before any model is loaded, so a bad config
costs nothing and fails with one clear message naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = ["ConfigError", "TrainConfig", "load_config", "validate", "validate_training", "apply_overrides", "to_dict",
           "alpha_ref_of"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what was expected."""


@dataclass
class BaseModelConfig:
    path: str = ""  # a local diffusers folder, or a single-file .safetensors checkpoint
    single_file_config: str | None = None  # local diffusers folder with the configs for a single file
    dtype: str = "float32"


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float = 4.0
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    rslora: bool = False


@dataclass
class SamplingConfig:
    steps: int = 50
    eta: float = 1.0
    guidance: float = 7.5
    resolution: int = 512


@dataclass
class AlgorithmConfig:
    name: str = "dpok"  # dpok | ddpo | adjoint_matching
    #: the KL weight in raw reward units: the LoRA approximates p_base exp(r / alpha_ref), and this
    #: number is written into db.alpha_ref.  The paper's (beta, rho) are accepted instead and
    #: converted, alpha_ref = beta / rho.
    alpha_ref: float | None = None
    kl_weight: float | None = None  # beta (only with reward_weight, instead of alpha_ref)
    reward_weight: float | None = None  # rho
    #: "auto": the reward's std under the base, measured on the first batch and then frozen (the
    #: objective is divided by it: a step size, never a change of alpha); or a fixed number
    #: (1.0 = raw advantages).
    reward_scale: float | str = "auto"
    clip_range: float = 1e-4  # per-dimension importance ratio clamped to 1 +- clip_range
    advantage: str = "batch"  # batch | per_prompt | value: the baseline (leave-one-out means or a value net)
    value_lr: float = 1e-4
    inner_epochs: int = 1
    timestep_fraction: float = 1.0


@dataclass
class TrainConfig:
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    #: reward name -> weight; several entries train on the weighted sum w . r (the MORL oracle)
    rewards: dict[str, float] = field(default_factory=lambda: {"aesthetic": 1.0})
    #: reward name -> keyword options (e.g. ``{"aesthetic": {"path": "/models/aesthetic"}}``)
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    prompt_file: str | None = None
    batch_size: int = 2  # samples per process per sampling round
    grad_accum: int = 12  # sampling rounds per optimizer step
    lr: float = 1e-5
    adam_weight_decay: float = 1e-4
    max_grad_norm: float = 0.1
    steps: int = 1000  # optimizer steps
    seed: int = 0
    output_dir: str = "runs/dpok"
    lr_schedule: str = "constant"  # constant | cosine (to lr * 0.1 over the run)
    checkpoint_every: int = 50
    log_every: int = 1
    image_every: int = 50
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False  # recompute the UNet's activations in the backward pass
    #: encode the prompt list once, then move the text encoders off the accelerator
    offload_text_encoders: bool = True
    export_name: str = "lora.safetensors"


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def _from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key; expected one of {', '.join(fields)}")
        f = fields[key]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            kwargs[key] = _from_dict(f.default_factory, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, f.type, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """Numbers as the field's type.  PyYAML reads ``1e-5`` (no dot) as a string, and ``3`` for a
    float field as an int: both are what the user meant, anything else is an error naming the key."""
    if annotation.endswith(" | None"):
        if value is None:
            return None
        annotation = annotation[: -len(" | None")]
    if annotation in ("float", "int") and isinstance(value, bool):
        raise ConfigError(f"{key} = {value!r}: expected a number, not a boolean")
    if annotation == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} = {value!r}: expected a list of strings, e.g. [{value!r}] "
                              f"(--{key} \"[a, b]\" on the command line)" if isinstance(value, str) else
                              f"{key} = {value!r}: expected a list of strings")
        return value
    if annotation == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if annotation == "float" and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key} = {value!r}: expected a number") from None
    if annotation == "int" and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
    return value


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``["--lora.rank", "8", "--steps", "10"]`` (dotted keys) to a config mapping."""
    items = list(overrides)
    if len(items) % 2:
        raise ConfigError(f"overrides: expected --key value pairs, got {' '.join(items)}")
    for key, value in zip(items[::2], items[1::2]):
        if not key.startswith("--"):
            raise ConfigError(f"overrides: {key!r} should look like --section.key")
        node = data
        parts = key[2:].replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_value(value)
    return data


#: the configs shipped with the package (``configs/`` of the repository, installed beside the code)
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def shipped_config(name: str) -> Path | None:
    """``configs/<name>.yaml`` shipped with the package, for ``--config <name>`` (None: no such config)."""
    if Path(name).parent != Path("."):
        return None  # a path: only the file itself
    path = SHIPPED_CONFIGS / f"{Path(name).stem}.yaml"
    return path if path.is_file() and name in (path.name, path.stem) else None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config of file ``path`` (or of a shipped config by name: ``sd15_aesthetic_am``), with the
    ``key.sub=value`` ``overrides`` applied; relative paths in it are relative to its folder."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            p = path = shipped_config(str(path)) or p
        if not p.is_file():
            names = sorted(c.stem for c in SHIPPED_CONFIGS.glob("*.yaml"))
            raise ConfigError(f"--config: {p} does not exist (a file, or one of the shipped configs by name: "
                              f"{', '.join(names[:6])}, ... -- {len(names)} in {SHIPPED_CONFIGS})")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config: {p} is not valid YAML: {exc}") from None
    data = apply_overrides(data, overrides)
    cfg = _from_dict(TrainConfig, data)
    if path is not None:
        _resolve_paths(cfg, Path(path).resolve().parent)
    return cfg


def _resolve_paths(cfg: TrainConfig, folder: Path) -> None:
    """Relative paths in a config file are relative to that file's folder."""

    def fix(p):
        return p if p is None or Path(p).is_absolute() or Path(p).exists() else str(folder / p)

    cfg.base.path = fix(cfg.base.path)
    cfg.base.single_file_config = fix(cfg.base.single_file_config)
    cfg.prompt_file = fix(cfg.prompt_file)


def read_prompts(cfg: TrainConfig) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompt_file:
        prompts += [line.strip() for line in Path(cfg.prompt_file).read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    return prompts


def _need(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key} = {value!r}: expected {expected}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def alpha_ref_of(a: AlgorithmConfig) -> float:
    """The KL weight in raw reward units: ``alpha_ref``, or the paper's ``beta / rho``; 0 for DDPO."""
    if a.name == "ddpo":
        return 0.0
    if a.alpha_ref is not None and a.kl_weight is None:
        _need(_number(a.alpha_ref) and a.alpha_ref > 0, "algorithm.alpha_ref",
              "the KL weight in raw reward units, > 0 (alpha_ref = 0 is DDPO: algorithm.name: ddpo)", a.alpha_ref)
        return float(a.alpha_ref)
    if a.kl_weight is not None:
        rho = 1.0 if a.reward_weight is None else a.reward_weight
        _need(_number(a.kl_weight) and a.kl_weight > 0, "algorithm.kl_weight", "beta > 0", a.kl_weight)
        _need(_number(rho) and rho > 0, "algorithm.reward_weight", "rho > 0", rho)
        converted = float(a.kl_weight) / float(rho)
        if a.alpha_ref is not None and not math.isclose(converted, a.alpha_ref, rel_tol=1e-9):
            raise ConfigError(f"algorithm.alpha_ref = {a.alpha_ref!r} disagrees with kl_weight / reward_weight = "
                              f"{converted!r}: give alpha_ref alone (raw reward units)")
        return converted
    raise ConfigError("algorithm.alpha_ref = None: expected the KL weight in raw reward units (the LoRA approximates "
                      "p_base * exp(r / alpha_ref)), or kl_weight (beta) with reward_weight (rho)")


def reward_scale_of(a: AlgorithmConfig) -> float | None:
    """The fixed reward scale, or None for ``auto`` (measured on the base's first batch)."""
    if a.reward_scale == "auto":
        return None
    value = a.reward_scale
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    _need(_number(value) and value > 0, "algorithm.reward_scale", '"auto" or a number > 0', a.reward_scale)
    return float(value)


def _check_output_dir(output_dir: str) -> None:
    """The run's folder can be created and written, and is not a place no run belongs in."""
    import os
    import tempfile

    if not output_dir:
        raise ConfigError("output_dir = '': expected a folder for the run")
    path = Path(output_dir).expanduser().resolve()
    if path == Path(path.anchor) or path == Path.home().resolve():
        raise ConfigError(f"output_dir = {output_dir!r}: expected a folder of its own, not {path}")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir = {output_dir!r}: {path} is a file; expected a folder")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    # try it: os.access answers for the permission bits only (root "may" write into /proc, a
    # read-only mount, a full disk); a folder made in the nearest existing one, then removed
    why = f"{ancestor} is not a folder"
    if ancestor.is_dir():
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".diffusion-blend-check-", dir=ancestor))
            return
        except OSError as exc:
            why = f"creating a folder in {ancestor} failed: {exc.strerror or exc}"
    raise ConfigError(f"output_dir = {output_dir!r}: cannot create or write it ({why})")


def validate(cfg: TrainConfig) -> None:
    """Every check that needs no model; raises :class:`ConfigError` naming the key."""
    from .pipeline import BaseModelError, check_base
    from ..rewards import DIFFERENTIABLE, REWARDS, RULE_BASED

    need = _need
    need(bool(cfg.base.path), "base.path", "a local diffusers folder or .safetensors checkpoint", cfg.base.path)
    try:
        check_base(cfg.base.path, cfg.base.single_file_config)
    except BaseModelError as exc:
        raise ConfigError(str(exc)) from None
    need(cfg.base.dtype in ("float32", "float16", "bfloat16"), "base.dtype", "float32, float16 or bfloat16", cfg.base.dtype)
    need(cfg.sampling.resolution % 8 == 0 and cfg.sampling.resolution > 0, "sampling.resolution", "a positive multiple of 8",
         cfg.sampling.resolution)
    need(isinstance(cfg.rewards, dict) and len(cfg.rewards) > 0, "rewards", "a mapping name -> weight", cfg.rewards)
    for name, w in cfg.rewards.items():
        if name not in REWARDS:
            raise ConfigError(f"rewards.{name}: unknown reward; known rewards: {', '.join(sorted(REWARDS))}")
        if cfg.algorithm.name == "adjoint_matching" and name not in DIFFERENTIABLE:
            raise ConfigError(f"rewards.{name}: not differentiable, and algorithm.name = adjoint_matching regresses onto "
                              f"the reward's gradient; train it with algorithm.name = dpok (any reward), or choose a "
                              f"differentiable reward: {', '.join(DIFFERENTIABLE)}")
        need(_number(w), f"rewards.{name}", "a finite weight", w)
        if name not in RULE_BASED:
            path = cfg.reward_options.get(name, {}).get("path")
            need(path is not None and Path(path).exists(), f"reward_options.{name}.path",
                 "a local file or folder with the reward model (learned rewards are never downloaded)", path)
    if cfg.prompt_file is not None and not Path(cfg.prompt_file).is_file():
        raise ConfigError(f"prompt_file = {cfg.prompt_file!r}: file not found")
    if not read_prompts(cfg):
        raise ConfigError("prompts: expected at least one prompt (prompts: [...] or prompt_file)")
    validate_training(cfg)


def validate_training(cfg: TrainConfig) -> None:
    """The checks of the objective, the adapter and the loop (every family, the toy included)."""
    from .algorithms import ALGORITHMS

    need = _need
    need(isinstance(cfg.lora.rank, int) and cfg.lora.rank >= 1, "lora.rank", "an integer >= 1", cfg.lora.rank)
    need(cfg.lora.alpha > 0, "lora.alpha", "> 0", cfg.lora.alpha)
    need(len(cfg.lora.targets) > 0, "lora.targets", "at least one module name", cfg.lora.targets)
    need(isinstance(cfg.sampling.steps, int) and 1 <= cfg.sampling.steps <= 1000, "sampling.steps", "1..1000", cfg.sampling.steps)
    need(0 < cfg.sampling.eta <= 1.0, "sampling.eta", "in (0, 1] (a stochastic sampler)", cfg.sampling.eta)
    a = cfg.algorithm
    need(a.name in ALGORITHMS, "algorithm.name", " or ".join(ALGORITHMS), a.name)
    if a.name == "adjoint_matching":
        need(cfg.sampling.eta == 1.0, "sampling.eta", "1 with algorithm.name = adjoint_matching (it fine-tunes on the "
             "memoryless chain, eta = 1; the LoRA then holds for any sampler)", cfg.sampling.eta)
    alpha_ref_of(a)
    reward_scale_of(a)
    need(a.clip_range > 0, "algorithm.clip_range", "> 0 (per dimension)", a.clip_range)
    need(a.advantage in ("value", "per_prompt", "batch"), "algorithm.advantage", "value, per_prompt or batch", a.advantage)
    need(a.inner_epochs >= 1, "algorithm.inner_epochs", ">= 1", a.inner_epochs)
    need(0 < a.timestep_fraction <= 1, "algorithm.timestep_fraction", "in (0, 1]", a.timestep_fraction)
    need(cfg.lr_schedule in ("constant", "cosine"), "lr_schedule", "constant or cosine", cfg.lr_schedule)
    for key in ("log_every", "image_every", "checkpoint_every"):
        value = getattr(cfg, key)
        need(isinstance(value, int) and value >= 1, key, "an integer >= 1 (steps between two)", value)
    _check_output_dir(cfg.output_dir)
    need(cfg.batch_size >= 1, "batch_size", ">= 1", cfg.batch_size)
    need(cfg.grad_accum >= 1, "grad_accum", ">= 1", cfg.grad_accum)
    need(cfg.lr > 0, "lr", "> 0", cfg.lr)
    need(cfg.max_grad_norm > 0, "max_grad_norm", "> 0", cfg.max_grad_norm)
    need(cfg.steps >= 1, "steps", ">= 1", cfg.steps)
    need(cfg.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", "no, fp16 or bf16", cfg.mixed_precision)
