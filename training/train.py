"""The training loop: sample -> reward -> update -> log -> checkpoint (accelerate).

All randomness of a step derives from ``(seed, step, round, process)``, so a resumed run draws
exactly the samples the uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..blend.fingerprint import weights_fingerprint
from .algorithms import ddpo_loss, dpok_loss, normalize_per_prompt
from .algorithms.value import ValueNet
from .checkpoint import latest_checkpoint, load_checkpoint, remove_partial, save_checkpoint
from .config import TrainConfig, read_prompts, to_dict, validate
from .export import export_lora, lora_metadata, lora_modules_from_unet
from .pipeline import (DiffusionModel, add_lora, decode_latents, encode_prompts, guided_eps_fn, load_base,
                       lora_parameters, reference_mode)
from .rewards import get_reward
from .sampler import DDIMSchedule, ddim_step_stats, gaussian_log_prob, kl_same_std, sample_trajectory

__all__ = ["TrainResult", "run_training", "build_policy", "evaluate_policy", "step_seed"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def step_seed(seed: int, step: int, round_: int, process: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + round_ * 101 + process) % (2**63)


@dataclass
class TrainResult:
    lora_path: Path
    model: DiffusionModel
    history: list[dict] = field(default_factory=list)


def build_policy(cfg: TrainConfig, device: torch.device | str = "cpu") -> tuple[DiffusionModel, str]:
    """Base model with a fresh LoRA adapter, and the fingerprint of its base UNet weights."""
    model = load_base(cfg.base.path, cfg.base.single_file_config, DTYPES[cfg.base.dtype])
    fingerprint = weights_fingerprint(model.unet.state_dict().values())
    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    add_lora(model.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.rslora)
    for p in lora_parameters(model.unet):
        p.data = p.data.float()
    for m in [model.unet, model.vae, *model.text_encoders]:
        m.to(device)
    return model, fingerprint


def _rewards(reward_fns: dict, weights: dict[str, float], images, prompts) -> tuple[torch.Tensor, dict]:
    each = {name: fn(images, prompts).float().cpu() for name, fn in reward_fns.items()}
    total = sum(weights[n] * r for n, r in each.items())
    return total, each


@torch.no_grad()
def evaluate_policy(model: DiffusionModel, cfg: TrainConfig, seeds: list[int], prompts: list[str],
                    reward_fns: dict | None = None) -> dict:
    """Sample one image per seed with the current adapter; reward per sample and the trajectory's
    KL to the base, ``sum_t KL(p_theta(.|x_t) || p_ref(.|x_t))`` (computed exactly per step)."""
    reward_fns = reward_fns or {n: get_reward(n, **cfg.reward_options.get(n, {})) for n in cfg.rewards}
    schedule = DDIMSchedule.stable_diffusion(cfg.sampling.steps, cfg.sampling.eta)
    device = next(model.unet.parameters()).device
    res = cfg.sampling.resolution
    size = res // model.vae_scale
    rewards, kls = [], []
    for seed, prompt in zip(seeds, prompts):
        gen = torch.Generator().manual_seed(seed)
        cond = encode_prompts(model, [prompt], res, res)
        uncond = encode_prompts(model, [""], res, res)
        policy = guided_eps_fn(model.unet, cond, uncond, cfg.sampling.guidance)
        x = torch.randn(1, model.latent_channels, size, size, generator=gen).to(device)
        kl = torch.zeros(1)
        for i in range(schedule.num_steps):
            t = schedule.timesteps[i].expand(1).to(device)
            stats = ddim_step_stats(schedule, i, x, policy(x, t))
            with reference_mode(model.unet):
                ref = ddim_step_stats(schedule, i, x, policy(x, t))
            kl += kl_same_std(stats.mean, ref.mean, stats.std).cpu()
            x = stats.mean + stats.std * torch.randn(x.shape, generator=gen).to(device)
        total, _ = _rewards(reward_fns, cfg.rewards, decode_latents(model, x), [prompt])
        rewards.append(total)
        kls.append(kl)
    r, k = torch.cat(rewards), torch.cat(kls)
    return {"rewards": r, "kl": k, "reward_mean": float(r.mean()), "reward_se": float(r.std() / math.sqrt(len(r))),
            "kl_mean": float(k.mean())}


def _advantages(cfg, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    if cfg.algorithm.advantage == "per_prompt":
        return normalize_per_prompt(rewards, prompts)
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)


def run_training(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train one LoRA; returns the exported file, the model (with its adapter) and the log."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    validate(cfg)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    main = accelerator.is_main_process
    model, fingerprint = build_policy(cfg, accelerator.device)
    unet = model.unet
    schedule = DDIMSchedule.stable_diffusion(cfg.sampling.steps, cfg.sampling.eta)
    reward_fns = {n: get_reward(n, **cfg.reward_options.get(n, {})) for n in cfg.rewards}
    prompts = read_prompts(cfg)
    res = cfg.sampling.resolution
    size = res // model.vae_scale
    lora_params = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    optimizer = torch.optim.AdamW(lora_params.values(), lr=cfg.lr, weight_decay=cfg.adam_weight_decay)
    value_net = value_opt = None
    if cfg.algorithm.advantage == "value":
        text_dim = model.text_encoders[0].config.hidden_size * len(model.text_encoders)
        torch.manual_seed(cfg.seed + 1)
        value_net = ValueNet(model.latent_channels, text_dim).to(accelerator.device)
        value_opt = torch.optim.AdamW(value_net.parameters(), lr=cfg.algorithm.value_lr)
    ddp_unet, optimizer = accelerator.prepare(unet, optimizer)
    # what a checkpoint holds (accelerate wraps optimizers; the state is the wrapped one's)
    state_modules: dict = {"lora": lora_params}
    state_optimizers: dict = {"optimizer": getattr(optimizer, "optimizer", optimizer)}
    if value_net is not None:
        value_net, value_opt = accelerator.prepare(value_net, value_opt)
        state_modules["value"] = accelerator.unwrap_model(value_net)
        state_optimizers["value_optimizer"] = getattr(value_opt, "optimizer", value_opt)

    start = 0
    if main:
        remove_partial(out)
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            meta = load_checkpoint(ckpt, state_modules, state_optimizers)
            start = int(meta["step"])
            if main:
                print(f"[train] resumed from {ckpt} at step {start}", flush=True)

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    uncond_one = encode_prompts(model, [""], res, res)
    history: list[dict] = []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (main and progress),
               desc="dpok" if cfg.algorithm.name == "dpok" else "ddpo")
    B = cfg.batch_size
    for step in bar:
        t_start = time.perf_counter()
        t_reward = 0.0
        rounds = []
        unet.eval()
        for r in range(cfg.grad_accum):
            gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, r, accelerator.process_index))
            batch_prompts = [prompts[i] for i in torch.randint(len(prompts), (B,), generator=gen).tolist()]
            cond = encode_prompts(model, batch_prompts, res, res)
            uncond = {k: (v.expand(B, *v.shape[1:]) if torch.is_tensor(v) else v) for k, v in uncond_one.items()}
            x_T = torch.randn(B, model.latent_channels, size, size, generator=gen).to(accelerator.device)
            with accelerator.autocast():
                traj = sample_trajectory(guided_eps_fn(unet, cond, uncond, cfg.sampling.guidance), schedule, x_T, gen)
            t0 = time.perf_counter()
            images = decode_latents(model, traj.final)
            total, each = _rewards(reward_fns, cfg.rewards, images, batch_prompts)
            t_reward += time.perf_counter() - t0
            perm = torch.randperm(schedule.num_steps, generator=gen)[: max(1, round(cfg.algorithm.timestep_fraction * schedule.num_steps))]
            rounds.append(dict(prompts=batch_prompts, cond=cond, uncond=uncond, traj=traj, reward=total, each=each,
                               steps=perm.tolist(), images=images if r == 0 else None))
        t_sampled = time.perf_counter()

        # advantages over every sample of every process
        local_rewards = torch.cat([rd["reward"] for rd in rounds])
        all_rewards = accelerator.gather(local_rewards.to(accelerator.device)).cpu()
        all_prompts = gather_object([p for rd in rounds for p in rd["prompts"]])
        all_adv = _advantages(cfg, all_rewards, all_prompts)
        n_local = len(local_rewards)
        local_adv = all_adv[accelerator.process_index * n_local:(accelerator.process_index + 1) * n_local]
        reward_scale = float(all_rewards.std(unbiased=False)) + 1e-6

        unet.train()
        stats_acc: dict[str, float] = {}
        n_terms = sum(len(rd["steps"]) for rd in rounds) * cfg.algorithm.inner_epochs
        done = 0
        for _epoch in range(cfg.algorithm.inner_epochs):
            for k, rd in enumerate(rounds):
                traj = rd["traj"]
                adv = local_adv[k * B:(k + 1) * B].to(accelerator.device)
                for i in rd["steps"]:
                    done += 1
                    x_i, x_next = traj.latents[:, i], traj.latents[:, i + 1]
                    t = schedule.timesteps[i].expand(B).to(accelerator.device)
                    sync = contextlib.nullcontext() if done == n_terms else accelerator.no_sync(ddp_unet)
                    with sync, accelerator.autocast():
                        eps = guided_eps_fn(ddp_unet, rd["cond"], rd["uncond"], cfg.sampling.guidance)(x_i, t)
                        stats = ddim_step_stats(schedule, i, x_i, eps)
                        log_prob = gaussian_log_prob(x_next, stats.mean, stats.std)
                        if value_net is not None:
                            with torch.no_grad():
                                baseline = value_net(x_i, t, rd["cond"]["encoder_hidden_states"])
                            adv_i = (rd["reward"].to(accelerator.device) - baseline) / reward_scale
                        else:
                            adv_i = adv
                        if cfg.algorithm.name == "dpok":
                            with torch.no_grad(), reference_mode(unet):
                                eps_ref = guided_eps_fn(unet, rd["cond"], rd["uncond"], cfg.sampling.guidance)(x_i, t)
                            kl = kl_same_std(stats.mean, ddim_step_stats(schedule, i, x_i, eps_ref).mean, stats.std)
                            loss, st = dpok_loss(log_prob, traj.log_probs[:, i].to(accelerator.device), adv_i, kl,
                                                 reward_weight=cfg.algorithm.reward_weight,
                                                 kl_weight=cfg.algorithm.kl_weight, clip_range=cfg.algorithm.clip_range)
                        else:
                            loss, st = ddpo_loss(log_prob, traj.log_probs[:, i].to(accelerator.device), adv_i,
                                                 clip_range=cfg.algorithm.clip_range)
                        accelerator.backward(loss / n_terms)
                    for key, v in st.items():
                        stats_acc[key] = stats_acc.get(key, 0.0) + float(v) / n_terms
        grad_norm = accelerator.clip_grad_norm_(list(lora_params.values()), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if value_net is not None:  # regress V(x_t, t, c) onto the observed rewards
            value_opt.zero_grad(set_to_none=True)
            v_loss = 0.0
            for rd in rounds:
                xs = rd["traj"].latents[:, :-1].flatten(0, 1).to(accelerator.device)
                ts = schedule.timesteps.repeat(B).to(accelerator.device)
                ctx = rd["cond"]["encoder_hidden_states"].repeat_interleave(schedule.num_steps, 0)
                target = rd["reward"].repeat_interleave(schedule.num_steps).to(accelerator.device) / reward_scale
                loss_v = torch.nn.functional.mse_loss(value_net(xs, ts, ctx), target)
                accelerator.backward(loss_v / len(rounds))
                v_loss += float(loss_v) / len(rounds)
            value_opt.step()
            stats_acc["value_loss"] = v_loss
        t_end = time.perf_counter()

        n_samples = all_rewards.numel()
        entry = {
            "step": step + 1,
            "reward_mean": float(all_rewards.mean()),
            "reward_std": float(all_rewards.std(unbiased=False)),
            "grad_norm": float(grad_norm),
            "samples_per_s": n_samples / (t_end - t_start),
            "time_sampling": t_sampled - t_start - t_reward,
            "time_reward": t_reward,
            "time_update": t_end - t_sampled,
            **stats_acc,
        }
        for name in cfg.rewards:
            vals = accelerator.gather(torch.cat([rd["each"][name] for rd in rounds]).to(accelerator.device)).cpu()
            entry[f"reward/{name}_mean"] = float(vals.mean())
            entry[f"reward/{name}_std"] = float(vals.std(unbiased=False))
        history.append(entry)
        if main:
            bar.set_postfix(reward=f"{entry['reward_mean']:.4g}", kl=f"{entry.get('kl', 0.0):.3g}")
            if (step + 1) % cfg.log_every == 0:
                for key, v in entry.items():
                    if key != "step":
                        writer.add_scalar(key if "/" in key else f"train/{key}", v, step + 1)
                with open(out / "log.jsonl", "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
            if (step + 1) % cfg.image_every == 0 and rounds[0]["images"] is not None:
                _write_grid(rounds[0]["images"], out / "samples" / f"step-{step + 1:06d}.png", writer, step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(out, step + 1, state_modules, state_optimizers,
                                extra={"config": to_dict(cfg), "base_fingerprint": fingerprint})
            accelerator.wait_for_everyone()

    lora_path = out / cfg.export_name
    if main:
        modules_out = lora_modules_from_unet(unet)
        export_lora(modules_out, lora_path, lora_metadata(
            rewards=cfg.rewards, algorithm=cfg.algorithm.name, kl_weight=cfg.algorithm.kl_weight,
            reward_weight=cfg.algorithm.reward_weight, steps=cfg.steps, base_fingerprint=fingerprint,
            rank=cfg.lora.rank, alpha=next(iter(modules_out.values())).alpha))
        if writer is not None:
            writer.close()
        print(f"[train] wrote {lora_path}", flush=True)
    accelerator.wait_for_everyone()
    return TrainResult(lora_path, model, history)


def _write_grid(images: torch.Tensor, path: Path, writer, step: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    x = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    grid = torch.cat(list(x), dim=2)  # side by side
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    if writer is not None:
        writer.add_image("samples", grid, step)
