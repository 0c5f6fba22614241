"""Learned models for the toy problem: an MLP noise predictor, and LoRAs on it trained with the
project's own DPOK core (``training.sampler`` + ``training.algorithms.dpok_loss``).

* :func:`fit_base` distils the exact noise prediction of the base mixture into an MLP;
* :func:`train_dpok_lora` fine-tunes a peft LoRA on that MLP for a reward at KL weight ``alpha``
  (``rho = 1``, ``beta = alpha``), sampling with the same stochastic DDIM chain as SD training;
* :func:`lora_file_of` turns the adapter into a :class:`~diffusion_blend.blend.lora_file.LoraFile`
  so the blend runtime (``LowRankBank``, ``evaluate_plan``) runs on the MLP exactly as on a UNet.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from ..blend.lora_file import LoraFile
from ..training.algorithms import dpok_loss
from ..training.export import lora_modules_from_unet
from ..training.sampler import DDIMSchedule, ddim_step_stats, gaussian_log_prob, kl_same_std, sample_trajectory
from .gmm import GMM

__all__ = ["EpsMLP", "fit_base", "train_dpok_lora", "lora_file_of", "mlp_model"]


class EpsMLP(nn.Module):
    """``eps(x_t, t)`` for points in R^d: an MLP on ``[x_t, sinusoidal(t)]``."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, t_features: int = 32):
        super().__init__()
        self.t_features = t_features
        layers: list[nn.Module] = [nn.Linear(dim + t_features, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.t_features // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=x.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.net(torch.cat([x.float(), args.sin(), args.cos()], dim=-1))


def fit_base(gmm: GMM, steps: int = 3000, batch: int = 1024, lr: float = 2e-3, seed: int = 0,
             num_train_timesteps: int = 1000) -> EpsMLP:
    """Denoising score matching on samples of ``gmm`` (its minimiser is the exact ``E[eps | x_t]``)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = EpsMLP(gmm.dim)
    schedule = DDIMSchedule.stable_diffusion(num_train_timesteps, steps_offset=0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    abar = schedule.alphas_cumprod
    for _ in range(steps):
        t = torch.randint(num_train_timesteps, (batch,), generator=g)
        x0 = gmm.sample(batch, g)
        noise = torch.randn(batch, gmm.dim, generator=g, dtype=x0.dtype)
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


def train_dpok_lora(
    base: EpsMLP,
    reward: Callable[[torch.Tensor], torch.Tensor],
    alpha: float,
    *,
    iterations: int = 300,
    batch: int = 512,
    steps: int = 50,
    lr: float = 3e-3,
    rank: int = 4,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``base`` with a peft LoRA trained by DPOK on ``reward`` with KL weight ``alpha``."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                               init_lora_weights="gaussian"), model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    opt = torch.optim.Adam(params, lr=lr)
    schedule = DDIMSchedule.stable_diffusion(steps)
    g = torch.Generator().manual_seed(seed)

    def set_adapters(on: bool):
        for m in model.modules():
            if hasattr(m, "enable_adapters") and hasattr(m, "lora_A"):
                m.enable_adapters(on)

    for _ in range(iterations):
        x_T = torch.randn(batch, base.net[-1].out_features, generator=g)
        traj = sample_trajectory(lambda x, t: model(x, t), schedule, x_T, g)
        r = reward(traj.final.double()).float()
        adv = r - r.mean()  # unnormalised, so rho = 1 and beta = alpha target p ~ p_pre exp(r / alpha)
        opt.zero_grad()
        for i in range(schedule.num_steps):
            x_i, x_next = traj.latents[:, i], traj.latents[:, i + 1]
            t = schedule.timesteps[i].expand(batch)
            stats = ddim_step_stats(schedule, i, x_i, model(x_i, t))
            with torch.no_grad():
                set_adapters(False)
                ref = ddim_step_stats(schedule, i, x_i, model(x_i, t))
                set_adapters(True)
            loss, _ = dpok_loss(gaussian_log_prob(x_next, stats.mean, stats.std), traj.log_probs[:, i], adv,
                                kl_same_std(stats.mean, ref.mean, stats.std), reward_weight=1.0, kl_weight=alpha,
                                clip_range=0.2)
            (loss / schedule.num_steps).backward()
        opt.step()
    return model.eval()


def lora_file_of(model: nn.Module, name: str) -> LoraFile:
    """The trained adapter as a LoraFile keyed by module path (for ``LowRankBank``)."""
    return LoraFile(path=name, modules=lora_modules_from_unet(model))
