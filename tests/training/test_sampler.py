"""The stochastic sampler against independent computations."""

import math

import pytest

import torch

from diffusion_blend.training.sampler import (DDIMSchedule, ddim_step_stats, gaussian_log_prob, kl_same_std,
                                              sample_trajectory)


def test_log_prob_of_own_sample_is_the_gaussian_density():
    schedule = DDIMSchedule.stable_diffusion(10, eta=1.0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 32), torch.nn.Unflatten(1, (2, 4, 4)))
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(3, 2, 4, 4, generator=g)
    with torch.no_grad():
        traj = sample_trajectory(lambda x, t: net(x), schedule, x_T, torch.Generator().manual_seed(1))
        for i in range(schedule.num_steps):
            x = traj.latents[:, i]
            stats = ddim_step_stats(schedule, i, x, net(x))  # the sampler's own mean
            stats.mean = stats.mean.double()
            independent = torch.distributions.Normal(stats.mean, stats.std).log_prob(traj.latents[:, i + 1].double())
            assert torch.allclose(traj.log_probs[:, i].double(), independent.flatten(1).sum(1), atol=1e-5, rtol=0)


def test_step_matches_diffusers_ddim_with_eta_one():
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(20)
    ours = DDIMSchedule.stable_diffusion(20, eta=1.0)
    assert torch.equal(ref.timesteps, ours.timesteps)
    g = torch.Generator().manual_seed(3)
    for i in (0, 7, 19):
        x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
        eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
        z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
        want = ref.step(eps, ours.timesteps[i], x, eta=1.0, variance_noise=z).prev_sample
        stats = ddim_step_stats(ours, i, x, eps)
        assert torch.allclose(stats.mean + stats.std * z, want, atol=1e-5)  # diffusers keeps alphas in float32


def test_kl_between_transitions_is_the_gaussian_kl():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    std = 0.3
    want = torch.distributions.kl_divergence(torch.distributions.Normal(a, std), torch.distributions.Normal(b, std))
    assert torch.allclose(kl_same_std(a, b, std), want.flatten(1).sum(1), atol=1e-5)
    assert torch.allclose(gaussian_log_prob(a, a, std), torch.full((2,), -15 * (math.log(std) + 0.5 * math.log(2 * math.pi))))


def test_flow_chain_steps_are_comfys_ancestral_flow_step_with_gaussian_log_probs():
    """The flow chain (SD3/Flux): shifted noise levels from 1 to the smallest trained one, every step
    ComfyUI's ancestral flow step (a Gaussian: exact log-probs, same-std KL), reading x_0 from the velocity."""
    from diffusion_blend.blend.smc import ancestral_step
    from diffusion_blend.training.sampler import FlowSchedule, ScheduleError, step_stats

    s = FlowSchedule.from_scheduler_config({"shift": 3.0, "num_train_timesteps": 1000}, 8)
    assert s.num_steps == 8 and float(s.sigmas[0]) == 1.0
    assert math.isclose(float(s.sigmas[-1]), 3e-3 / (1 + 2e-3)) and (s.sigmas[1:] < s.sigmas[:-1]).all()
    assert torch.allclose(s.timesteps, (s.sigmas[:-1] * 1000).float())
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    for i in (0, 3, 7):
        stats = step_stats(s, i, x, v)
        step = ancestral_step(float(s.sigmas[i]), float(s.sigmas[i + 1]), 1.0, flow=True)
        assert stats.std == step.noise_std > 0
        assert torch.allclose(stats.mean, step.x_coef * x + step.denoised_coef * (x - float(s.sigmas[i]) * v))
    traj = sample_trajectory(lambda x_t, t: torch.zeros_like(x_t), s, torch.randn(2, 3, generator=g), g,
                             reference_eps_fn=lambda x_t, t: 0.1 * torch.ones_like(x_t))
    assert traj.log_probs.shape == (2, 8) and torch.isfinite(traj.log_probs).all() and (traj.kl > 0).all()
    with pytest.raises(ScheduleError, match="use_dynamic_shifting"):
        FlowSchedule.from_scheduler_config({"use_dynamic_shifting": True}, 8)
    # Flux: the shift from the image's token count, as diffusers' calculate_shift + exponential time shift
    flux = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
            "base_shift": 0.5, "max_shift": 1.15}
    dyn = FlowSchedule.from_scheduler_config(flux, 8, image_seq_len=1024)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)
    t = torch.linspace(1.0, 1e-3, 9, dtype=torch.float64)
    assert torch.allclose(dyn.sigmas, math.exp(mu) / (math.exp(mu) + (1 / t - 1)))
