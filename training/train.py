"""The training loop, for every family: sample -> reward -> (advantages | adjoint) -> update -> log -> checkpoint.

DPOK/DDPO form advantages from the rewards; Adjoint Matching (``algorithm.name: adjoint_matching``)
takes the reward's gradient at each chain's end, solves the lean adjoint backward along the chain
through the frozen base and regresses the control onto it (:mod:`.algorithms.adjoint_matching`).

The objective is :mod:`.objective`'s: ``E[r] - alpha_ref * KL(path)`` in raw reward units, divided
by one frozen reward scale.  The family (:mod:`.families`) only supplies the network of the chain.
All randomness of a step derives from ``(seed, step, round, process)``, so a resumed run draws
exactly the samples the uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .algorithms import adjoint_matching_loss, ddpo_loss, dpok_loss, lean_adjoint_step, terminal_adjoint
from .algorithms.value import ValueNet
from .checkpoint import (CheckpointError, find_checkpoint, has_checkpoints, load_checkpoint, remove_partial,
                         save_checkpoint)
from .config import TrainConfig, alpha_ref_of, read_prompts, reward_scale_of, to_dict, validate, validate_training
from .export import export_lora, run_metadata
from .families import ChainPolicy, load_policy
from .objective import advantages, measure_reward_scale, returns_to_go
from ..rewards import differentiable_score, get_reward
from .sampler import (Trajectory, gaussian_log_prob, kl_same_std, sample_trajectory, score_output_scale,
                      score_shift_mean, step_stats)

__all__ = ["TrainResult", "run_training", "evaluate_policy", "step_seed", "CLIP_WARNING"]

RewardFns = dict[str, Callable[..., torch.Tensor]]
#: clip_fraction above which the run warns: the ratio clip then blocks most of the gradient
CLIP_WARNING = 0.5


def step_seed(seed: int, step: int, round_: int, process: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + round_ * 101 + process) % (2**63)


@dataclass
class TrainResult:
    lora_path: Path
    policy: ChainPolicy
    history: list[dict] = field(default_factory=list)
    reward_scale: float = 1.0


@dataclass
class Round:
    """One sampling round: ``B`` chains with their rewards and (after advantages) their returns."""

    prompts: list[str]
    cond: Any
    traj: Trajectory
    reward: torch.Tensor  # (B,) weighted sum of the rewards
    each: dict[str, torch.Tensor]
    steps: list[int]  # the chain steps this round trains on
    images: torch.Tensor | None
    reward_seconds: float = 0.0  # decoding + scoring
    returns: torch.Tensor | None = None  # (B, N), raw reward units
    adv: torch.Tensor | None = None  # (B, N), reward-scale units (batch / per_prompt baselines)
    reward_grad: torch.Tensor | None = None  # adjoint matching: d(weighted reward)/d(final latents)
    target_shifts: dict[int, torch.Tensor] | None = None  # adjoint matching: step i -> the score's mean shift
    base_means: dict[int, torch.Tensor] | None = None  # adjoint matching: step i -> the base's mean at x_i


def _rewards(reward_fns: RewardFns, weights: dict[str, float], images, prompts) -> tuple[torch.Tensor, dict]:
    each = {name: fn(images, prompts).float().cpu() for name, fn in reward_fns.items()}
    total = sum(weights[n] * r for n, r in each.items())
    return total, each


def _rewards_and_gradient(policy: ChainPolicy, reward_fns: RewardFns, weights: dict[str, float], final: torch.Tensor,
                          prompts) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """``(images, weighted reward, each reward, gradient of the weighted reward w.r.t. the final
    latents)``: one decode and one scoring with their graph, one backward through both."""
    x = final.detach().requires_grad_(True)
    with torch.enable_grad():
        images = policy.decode(x)
        each = {name: differentiable_score(fn, images, prompts).float() for name, fn in reward_fns.items()}
        total = sum(weights[n] * r for n, r in each.items())
        (grad,) = torch.autograd.grad(total.sum(), x)
    return (images.detach(), total.detach().cpu(), {n: r.detach().cpu() for n, r in each.items()}, grad.detach())


def _registry_rewards(cfg: TrainConfig) -> RewardFns:
    return {n: get_reward(n, **cfg.reward_options.get(n, {})) for n in cfg.rewards}


def _reference_eps(policy: ChainPolicy, cond):
    def eps(x, t):
        with policy.reference():
            return policy.eps(x, t, cond)

    return eps


@torch.no_grad()
def evaluate_policy(policy: ChainPolicy, cfg: TrainConfig, seeds: list[int], prompts: list[str],
                    reward_fns: RewardFns | None = None) -> dict:
    """One chain per seed with the current adapter: reward per sample and the path KL to the base,
    ``sum_i KL(p_theta(.|x_i) || p_base(.|x_i))`` (exact per step)."""
    reward_fns = reward_fns or _registry_rewards(cfg)
    rewards, kls = [], []
    for seed, prompt in zip(seeds, prompts):
        gen = torch.Generator().manual_seed(seed)
        cond = policy.encode([prompt])
        x_T = policy.initial_noise(1, gen)
        traj = sample_trajectory(lambda x, t: policy.eps(x, t, cond), policy.schedule, x_T, gen,
                                 reference_eps_fn=_reference_eps(policy, cond))
        total, _ = _rewards(reward_fns, cfg.rewards, policy.decode(traj.final), [prompt])
        rewards.append(total)
        kls.append(traj.kl.sum(1).cpu())
    r, k = torch.cat(rewards), torch.cat(kls)
    return {"rewards": r, "kl": k, "reward_mean": float(r.mean()), "reward_se": float(r.std() / math.sqrt(len(r))),
            "kl_mean": float(k.mean())}


def _sample_round(policy: ChainPolicy, cfg: TrainConfig, prompts: list[str], reward_fns: RewardFns,
                  gen: torch.Generator, accelerator, keep_images: bool) -> Round:
    B, schedule = cfg.batch_size, policy.schedule
    batch_prompts = [prompts[i] for i in torch.randint(len(prompts), (B,), generator=gen).tolist()]
    cond = policy.encode(batch_prompts)
    x_T = policy.initial_noise(B, gen)
    reference = _reference_eps(policy, cond) if cfg.algorithm.name == "dpok" else None
    with accelerator.autocast():
        traj = sample_trajectory(lambda x, t: policy.eps(x, t, cond), schedule, x_T, gen, reference_eps_fn=reference)
    t0 = time.perf_counter()
    reward_grad = None
    if cfg.algorithm.name == "adjoint_matching":
        with accelerator.autocast():
            images, total, each, reward_grad = _rewards_and_gradient(policy, reward_fns, cfg.rewards, traj.final,
                                                                     batch_prompts)
    else:
        with torch.no_grad():
            images = policy.decode(traj.final)
        total, each = _rewards(reward_fns, cfg.rewards, images, batch_prompts)
    reward_seconds = time.perf_counter() - t0
    n_train = max(1, round(cfg.algorithm.timestep_fraction * schedule.num_steps))
    steps = torch.randperm(schedule.num_steps, generator=gen)[:n_train].tolist()
    return Round(batch_prompts, cond, traj, total, each, steps, images if keep_images else None, reward_seconds,
                 reward_grad=reward_grad)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.lr_schedule == "cosine":
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(cfg.steps, 1))))
    return cfg.lr


def _resume_point(out: Path, resume: bool | str, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, or None to start fresh; refuses to mix runs or lose work.

    ``resume``: False (a fresh run: refused where checkpoints exist, unless ``overwrite``), True or
    ``"strict"`` (a usable checkpoint must exist), ``"auto"`` (resume if there is one)."""
    if resume not in (False, True, "strict", "auto"):
        raise ValueError(f"resume = {resume!r}: expected False, True/'strict' or 'auto'")
    if not resume:
        if has_checkpoints(out):
            if not overwrite:
                raise CheckpointError(f"output_dir {out} holds checkpoints of another run: resume it (--resume), "
                                      "or start over (--overwrite deletes them), or choose another output_dir")
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return None
    ckpt = find_checkpoint(out, report=lambda msg: print(msg, file=sys.stderr, flush=True))
    if ckpt is None and resume != "auto":
        raise CheckpointError(f"--resume: no usable checkpoint in {out / 'checkpoints'} (use --resume=auto to start "
                              "fresh when there is none)")
    return ckpt


def run_training(cfg: TrainConfig, resume: bool | str = False, progress: bool = True, policy: ChainPolicy | None = None,
                 reward_fns: RewardFns | None = None, overwrite: bool = False) -> TrainResult:
    """Train one LoRA; returns the exported file, the policy (with its adapter) and the log.

    ``policy``/``reward_fns`` default to the family read from ``cfg.base.path`` and the reward
    registry (the CLI); validation passes the toy family and its rewards through the same loop.
    ``resume``/``overwrite``: see :func:`_resume_point` (checked before any model is loaded)."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    validate(cfg) if policy is None else validate_training(cfg)
    alpha_ref, reward_scale = alpha_ref_of(cfg.algorithm), reward_scale_of(cfg.algorithm)
    ckpt = _resume_point(Path(cfg.output_dir), resume, overwrite)
    adjoint = cfg.algorithm.name == "adjoint_matching"
    kind = None if adjoint else cfg.algorithm.advantage  # adjoint matching forms no advantages
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    device, main = accelerator.device, accelerator.is_main_process
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = policy or load_policy(cfg, device)
    if adjoint:
        check_memoryless(policy.schedule)
    reward_fns = reward_fns or _registry_rewards(cfg)
    prompts = read_prompts(cfg) or [""]
    if cfg.offload_text_encoders and hasattr(policy, "offload_text_encoders"):
        policy.offload_text_encoders(prompts)  # every prompt encoded once; the encoders leave the accelerator
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.adam_weight_decay)
    value_net = value_opt = None
    if kind == "value":
        torch.manual_seed(cfg.seed + 1)
        probe = policy.initial_noise(1, torch.Generator().manual_seed(0))
        text = policy.text_features(policy.encode(prompts[:1]))
        value_net = ValueNet(tuple(probe.shape[1:]), 0 if text is None else text.shape[-1]).to(device)
        value_opt = torch.optim.AdamW(value_net.parameters(), lr=cfg.algorithm.value_lr)
    ddp_net, optimizer = accelerator.prepare(policy.network, optimizer)
    state_modules: dict = {"lora": params}  # what a checkpoint holds (the wrapped optimizer's state)
    state_optimizers: dict = {"optimizer": getattr(optimizer, "optimizer", optimizer)}
    if value_net is not None:
        value_net, value_opt = accelerator.prepare(value_net, value_opt)
        state_modules["value"] = accelerator.unwrap_model(value_net)
        state_optimizers["value_optimizer"] = getattr(value_opt, "optimizer", value_opt)

    start = 0
    if main:
        remove_partial(out)
    if ckpt is not None:
        meta = load_checkpoint(ckpt, state_modules, state_optimizers)
        start = int(meta["step"])
        reward_scale = meta["extra"].get("reward_scale", reward_scale)
        if main:
            print(f"[train] resumed from {ckpt} at step {start}", flush=True)

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    history: list[dict] = []
    warned_clip = False
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (main and progress),
               desc=cfg.algorithm.name)
    for step in bar:
        t_start = time.perf_counter()
        policy.network.eval()
        rounds = [_sample_round(policy, cfg, prompts, reward_fns,
                                torch.Generator().manual_seed(step_seed(cfg.seed, step, r, accelerator.process_index)),
                                accelerator, keep_images=r == 0) for r in range(cfg.grad_accum)]
        t_sampled = time.perf_counter()

        # rewards -> returns (KL still to come) -> baselines, over every sample of every process
        all_rewards = accelerator.gather(torch.cat([rd.reward for rd in rounds]).to(device)).cpu()
        if reward_scale is None:  # the first batch comes from the base (the adapter starts at zero)
            reward_scale = measure_reward_scale(all_rewards)
        for rd in rounds:
            rd.returns = returns_to_go(rd.reward, rd.traj.kl.cpu().double(), alpha_ref)
            if adjoint:
                with accelerator.autocast():
                    _solve_adjoint(policy, rd, alpha_ref)
        if kind in ("batch", "per_prompt"):
            all_returns = accelerator.gather(torch.cat([rd.returns for rd in rounds]).to(device)).cpu()
            all_prompts = gather_object([p for rd in rounds for p in rd.prompts])
            all_adv = advantages(all_returns, kind, all_prompts, reward_scale)
            n_local = sum(len(rd.prompts) for rd in rounds)
            local_adv = all_adv[accelerator.process_index * n_local:(accelerator.process_index + 1) * n_local]
            for k, rd in enumerate(rounds):
                rd.adv = local_adv[k * cfg.batch_size:(k + 1) * cfg.batch_size]

        for g in optimizer.param_groups:
            g["lr"] = _lr_at(cfg, step)
        policy.network.train()
        stats_acc: dict[str, float] = {}
        for _epoch in range(cfg.algorithm.inner_epochs):  # PPO: one optimizer step per pass over the samples
            update = (_adjoint_update(policy, ddp_net, rounds, accelerator) if adjoint else
                      _update(policy, ddp_net, rounds, cfg, accelerator, alpha_ref / reward_scale, reward_scale, value_net))
            for key, v in update.items():
                stats_acc[key] = stats_acc.get(key, 0.0) + v / cfg.algorithm.inner_epochs
            grad_norm = accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if value_net is not None:
            stats_acc["value_loss"] = _fit_value(value_net, value_opt, policy, rounds, reward_scale, accelerator)
        t_end = time.perf_counter()

        entry = {
            "step": step + 1,
            "reward_mean": float(all_rewards.mean()),
            "reward_std": float(all_rewards.std(unbiased=False)),
            "reward_scale": reward_scale,
            # adjoint matching samples no reference: the path KL from the update's per-step KLs
            "kl_path": (stats_acc.get("kl", 0.0) * policy.schedule.num_steps if adjoint else
                        float(torch.cat([rd.traj.kl.sum(1).cpu() for rd in rounds]).mean())),
            "grad_norm": float(grad_norm),
            "lr": _lr_at(cfg, step),
            "samples_per_s": all_rewards.numel() / (t_end - t_start),
            "time_sampling": t_sampled - t_start - sum(rd.reward_seconds for rd in rounds),
            "time_reward": sum(rd.reward_seconds for rd in rounds),
            "time_update": t_end - t_sampled,
            **stats_acc,
        }
        for name in cfg.rewards:
            vals = accelerator.gather(torch.cat([rd.each[name] for rd in rounds]).to(device)).cpu()
            entry[f"reward/{name}_mean"] = float(vals.mean())
            entry[f"reward/{name}_std"] = float(vals.std(unbiased=False))
        history.append(entry)
        if main:
            if entry.get("clip_fraction", 0.0) > CLIP_WARNING and not warned_clip:
                warned_clip = True
                tqdm.write(f"[train] warning: clip_fraction = {entry['clip_fraction']:.2f} at step {step + 1}: the ratio "
                           f"clip (algorithm.clip_range = {cfg.algorithm.clip_range:g} per dimension) blocks most of "
                           "the gradient; raise it or use fewer inner_epochs", file=sys.stderr)
            bar.set_postfix(reward=f"{entry['reward_mean']:.4g}", kl=f"{entry['kl_path']:.3g}")
            _log(entry, cfg, out, writer, step, rounds[0].images)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(out, step + 1, state_modules, state_optimizers,
                                extra={"config": to_dict(cfg), "base_fingerprint": policy.fingerprint,
                                       "reward_scale": reward_scale, "chain": _chain(policy, cfg)})
            accelerator.wait_for_everyone()

    lora_path = out / cfg.export_name
    if main:
        modules = policy.export_modules()
        export_lora(modules, lora_path, run_metadata(cfg, steps=cfg.steps, base_fingerprint=policy.fingerprint,
                                                     reward_scale=reward_scale, chain=_chain(policy, cfg),
                                                     modules=modules))
        if writer is not None:
            writer.close()
        if progress:
            print(f"[train] wrote {lora_path}", flush=True)
    accelerator.wait_for_everyone()
    return TrainResult(lora_path, policy, history, reward_scale)


def _update(policy: ChainPolicy, ddp_net, rounds: list[Round], cfg: TrainConfig, accelerator, kl_weight: float,
            reward_scale: float, value_net) -> dict[str, float]:
    """Accumulate the gradient of one optimizer step: one pass over every trained transition."""
    schedule, device, B = policy.schedule, accelerator.device, cfg.batch_size
    stats_acc: dict[str, float] = {}
    n_terms = sum(len(rd.steps) for rd in rounds)
    done = 0
    for rd in rounds:
        traj = rd.traj
        for i in rd.steps:
            done += 1
            x_i, x_next = traj.latents[:, i], traj.latents[:, i + 1]
            t = schedule.timesteps[i].expand(B).to(device)
            if value_net is None:
                adv = rd.adv[:, i]
            else:
                with torch.no_grad():
                    adv = rd.returns[:, i] / reward_scale - value_net(x_i, t, policy.text_features(rd.cond)).double().cpu()
            adv = adv.float().to(device)
            sync = contextlib.nullcontext() if done == n_terms else accelerator.no_sync(ddp_net)
            with sync, accelerator.autocast():
                stats = step_stats(schedule, i, x_i, policy.eps(x_i, t, rd.cond, network=ddp_net))
                log_prob = gaussian_log_prob(x_next, stats.mean, stats.std)
                old = traj.log_probs[:, i].to(device)
                d = x_i[0].numel()
                if cfg.algorithm.name == "dpok":
                    kl = kl_same_std(stats.mean, traj.ref_means[:, i], stats.std)
                    loss, st = dpok_loss(log_prob, old, adv, kl, kl_weight=kl_weight,
                                         clip_range=cfg.algorithm.clip_range, num_dims=d)
                else:
                    loss, st = ddpo_loss(log_prob, old, adv, clip_range=cfg.algorithm.clip_range, num_dims=d)
                accelerator.backward(loss / n_terms)
            for key, v in st.items():
                stats_acc[key] = stats_acc.get(key, 0.0) + float(v) / n_terms
    return stats_acc


def _chain(policy: ChainPolicy, cfg: TrainConfig) -> dict[str, Any]:
    """``db.chain``: the family's chain for DPOK/DDPO (the LoRA's promise holds for it); for Adjoint
    Matching ``sampler: any`` (the tilted score at every noise level), with the memoryless chain it
    was fine-tuned on kept under ``memoryless_chain``."""
    chain = policy.chain()
    if cfg.algorithm.name == "adjoint_matching":
        chain = {**chain, "sampler": "any", "memoryless_chain": chain.get("sampler")}
    return chain


def _solve_adjoint(policy: ChainPolicy, rd: Round, alpha_ref: float) -> None:
    """The lean adjoint of one round's chains, backward from ``a_N = -grad r / alpha_ref`` through the
    frozen base's step means down to the earliest trained step; stores, for every trained step ``i``,
    the score shift it asks for (``score_shift_mean(a_i)``) and the base's mean at ``x_i``."""
    schedule, traj, B = policy.schedule, rd.traj, rd.reward.shape[0]
    device = traj.latents.device

    def base_mean(j):
        t = schedule.timesteps[j].expand(B).to(device)

        def mean(x):
            return step_stats(schedule, j, x, policy.eps(x, t, rd.cond)).mean

        return mean

    trained = set(rd.steps)
    a = terminal_adjoint(rd.reward_grad, alpha_ref)
    rd.target_shifts, rd.base_means = {}, {}
    for j in range(schedule.num_steps - 1, min(trained) - 1, -1):
        a_next = a
        with policy.reference():  # the forward *and* the backward: gradient checkpointing recomputes in it
            a, mean_j = lean_adjoint_step(base_mean(j), traj.latents[:, j], a_next)
        if j in trained:
            if math.isfinite(score_output_scale(schedule, j)):
                rd.target_shifts[j] = score_shift_mean(schedule, j, a)
            else:  # a flow's first step from sigma = 1: its optimal discrete control, -std^2 E[a_{j+1} | x_j]
                std = step_stats(schedule, j, torch.zeros_like(a_next), torch.zeros_like(a_next)).std
                rd.target_shifts[j] = -std**2 * a_next
            rd.base_means[j] = mean_j


def check_memoryless(schedule) -> None:
    """Adjoint Matching's optimum is the tilt of the data distribution only on a memoryless chain:
    every step at eta = 1 (the DDPM posterior / the flow's ancestral step), from pure noise."""
    if float(schedule.eta) != 1.0:
        raise ValueError(f"sampling.eta = {schedule.eta}: adjoint_matching fine-tunes on the memoryless chain "
                         "(eta = 1); with less noise the start and the end of the chain stay correlated and the "
                         "optimum is not p_base exp(r / alpha_ref)")


def _adjoint_update(policy: ChainPolicy, ddp_net, rounds: list[Round], accelerator) -> dict[str, float]:
    """Accumulate the gradient of one optimizer step of Adjoint Matching over every trained step."""
    schedule, device = policy.schedule, accelerator.device
    stats_acc: dict[str, float] = {}
    n_terms = sum(len(rd.steps) for rd in rounds)
    done = 0
    for rd in rounds:
        B = rd.reward.shape[0]
        for i in rd.steps:
            done += 1
            x_i = rd.traj.latents[:, i]
            t = schedule.timesteps[i].expand(B).to(device)
            sync = contextlib.nullcontext() if done == n_terms else accelerator.no_sync(ddp_net)
            with sync, accelerator.autocast():
                stats = step_stats(schedule, i, x_i, policy.eps(x_i, t, rd.cond, network=ddp_net))
                loss, st = adjoint_matching_loss(stats.mean, rd.base_means[i], rd.target_shifts[i], stats.std)
                accelerator.backward(loss / n_terms)
            st["am_loss"] = loss.detach()
            for key, v in st.items():
                stats_acc[key] = stats_acc.get(key, 0.0) + float(v) / n_terms
    return stats_acc


def _fit_value(value_net, value_opt, policy: ChainPolicy, rounds: list[Round], reward_scale: float, accelerator) -> float:
    """Regress ``V(x_i, t_i, c)`` onto ``G_i / reward_scale`` at every visited state."""
    schedule, device = policy.schedule, accelerator.device
    value_opt.zero_grad(set_to_none=True)
    total = 0.0
    for rd in rounds:
        B, N = rd.returns.shape
        xs = rd.traj.latents[:, :-1].flatten(0, 1).to(device)
        ts = schedule.timesteps.repeat(B).to(device)
        text = policy.text_features(rd.cond)
        text = None if text is None else text.repeat_interleave(N, 0)
        target = (rd.returns / reward_scale).flatten().float().to(device)
        loss = torch.nn.functional.mse_loss(value_net(xs, ts, text), target)
        accelerator.backward(loss / len(rounds))
        total += float(loss.detach()) / len(rounds)
    value_opt.step()
    return total


def _log(entry: dict, cfg: TrainConfig, out: Path, writer, step: int, images) -> None:
    if (step + 1) % cfg.log_every == 0:
        for key, v in entry.items():
            if key != "step":
                writer.add_scalar(key if "/" in key else f"train/{key}", v, step + 1)
        with open(out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\n")
    if (step + 1) % cfg.image_every == 0 and images is not None and images.dim() == 4:
        _write_grid(images, out / "samples" / f"step-{step + 1:06d}.png", writer, step + 1)


def _write_grid(images: torch.Tensor, path: Path, writer, step: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    x = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    grid = torch.cat(list(x), dim=2)  # side by side
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    if writer is not None:
        writer.add_image("samples", grid, step)
