"""Learned models for the toy problems: an MLP noise predictor, and LoRAs on it trained by the
project's own training loop (:func:`diffusion_blend.training.train.run_training` with the toy
family), so what validation measures is what the CLI runs.

* :func:`fit_base` distils the exact noise prediction of a base distribution into an MLP;
* :func:`train_dpok_lora` trains one LoRA for a reward at ``alpha_ref`` (raw reward units) with the
  shipped defaults of the objective (frozen reward scale, leave-one-out baseline, KL still to come);
* :func:`lora_file_of` turns the adapter into a :class:`~diffusion_blend.blend.lora_file.LoraFile`
  so the blend runtime (``LowRankBank``, ``evaluate_plan``) runs on the MLP exactly as on a UNet.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..blend.lora_file import LoraFile, read_lora
from ..training.config import TrainConfig, load_config
from ..training.export import lora_modules_from_unet
from ..training.families.toy import EpsMLP, ToyPolicy
from ..training.sampler import DDIMSchedule
from ..training.train import TrainResult, run_training

__all__ = ["EpsMLP", "fit_base", "toy_config", "train_toy", "train_dpok_lora", "lora_file_of", "mlp_model",
           "merged_copy"]

PointReward = Callable[[torch.Tensor], torch.Tensor]


def fit_base(sampler, steps: int = 3000, batch: int = 1024, lr: float = 2e-3, seed: int = 0,
             num_train_timesteps: int = 1000, dim: int | None = None) -> EpsMLP:
    """Denoising score matching on samples of ``sampler`` (anything with ``.sample(n, generator)``
    and ``.dim``; its minimiser is the exact ``E[eps | x_t]``)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = EpsMLP(dim or sampler.dim)
    schedule = DDIMSchedule.stable_diffusion(num_train_timesteps, steps_offset=0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    abar = schedule.alphas_cumprod
    for _ in range(steps):
        t = torch.randint(num_train_timesteps, (batch,), generator=g)
        x0 = sampler.sample(batch, g)
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        a = abar[t][:, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = ((model(x_t, t) - noise.float()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def mlp_model(model: nn.Module, schedule: DDIMSchedule) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The MLP as a validation ``EpsModel`` ``(x, i) -> eps`` (float64 in and out)."""

    @torch.no_grad()
    def eps(x, i):
        t = schedule.timesteps[i].expand(x.shape[0])
        return model(x, t).double()

    return eps


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of a LoRA-carrying MLP with every adapter merged into its base weight (``W + s B A``).

    The same function as ``model`` up to float32 rounding, at the cost of the base MLP: sampling through
    the unmerged rank-64 adapters of the mixture LoRAs costs 2.4x the base.  For drawing samples only;
    the blend itself reads the unmerged adapter (:func:`lora_file_of`)."""
    import copy

    merged = copy.deepcopy(model)
    for module in merged.modules():
        if hasattr(module, "lora_A") and hasattr(module, "merge"):
            module.merge()
    return merged.eval()


def toy_config(alpha_ref: float, output_dir: str | Path, *, iterations: int = 300, batch: int = 512, steps: int = 50,
               lr: float = 3e-3, rank: int = 4, seed: int = 0, **overrides) -> TrainConfig:
    """A training config for the toy family: the loop's defaults except the sizes given here."""
    items = {"lora.rank": rank, "lora.alpha": float(rank), "sampling.steps": steps, "sampling.guidance": 1.0,
             "algorithm.name": "dpok", "algorithm.alpha_ref": float(alpha_ref), "algorithm.clip_range": 0.2,
             "rewards": {"toy": 1.0}, "prompts": [""], "batch_size": batch, "grad_accum": 1, "lr": lr,
             "max_grad_norm": 1.0, "steps": iterations, "seed": seed, "output_dir": str(output_dir),
             "checkpoint_every": 10**9, "image_every": 10**9, "log_every": 1}
    items.update(overrides)
    args = []
    for k, v in items.items():
        args += [f"--{k}", repr(v) if not isinstance(v, str) else v]
    return load_config(None, args)


def train_toy(base: EpsMLP, reward: PointReward, cfg: TrainConfig) -> TrainResult:
    """``run_training`` on the toy family; ``reward`` scores final points ``(B, d)``."""
    policy = ToyPolicy.from_config(base, cfg)
    return run_training(cfg, progress=False, policy=policy,
                        reward_fns={"toy": lambda x, prompts: reward(x.double()).float()})


def train_dpok_lora(base: EpsMLP, reward: PointReward, alpha: float, *, iterations: int = 300, batch: int = 512,
                    steps: int = 50, lr: float = 3e-3, rank: int = 4, seed: int = 0, **overrides) -> nn.Module:
    """A copy of ``base`` with a LoRA trained by the shipped loop on ``reward`` at ``alpha_ref = alpha``."""
    with tempfile.TemporaryDirectory(prefix="db-toy-") as out:
        cfg = toy_config(alpha, out, iterations=iterations, batch=batch, steps=steps, lr=lr, rank=rank, seed=seed,
                         **overrides)
        result = train_toy(base, reward, cfg)
        stated = read_lora(result.lora_path).alpha_ref
    model = result.policy.network.eval()
    model.stated_alpha_ref = stated  # what the exported file promises (db.alpha_ref) ...
    model.chain = result.policy.schedule  # ... for the chain it was trained on
    return model


def lora_file_of(model: nn.Module, name: str) -> LoraFile:
    """The trained adapter as a LoraFile keyed by module path (for ``LowRankBank``)."""
    return LoraFile(path=name, modules=lora_modules_from_unet(model))
