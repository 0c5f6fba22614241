"""Closed-form checks of the objective and the losses (value and gradient), independent of the loop."""

import math

import pytest
import torch

from diffusion_blend.training.algorithms import clipped_policy_loss, ddpo_loss, dpok_loss
from diffusion_blend.training.algorithms.value import ValueNet
from diffusion_blend.training.objective import (advantages, kl_to_go, leave_one_out_baseline, measure_reward_scale,
                                                returns_to_go)
from diffusion_blend.training.sampler import DDIMSchedule, ScheduleError, ddim_step_stats


def test_kl_to_go_is_the_sum_over_later_steps():
    kl = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, 0.25, 1.0]], dtype=torch.float64)
    assert kl_to_go(kl).tolist() == [[9.0, 7.0, 4.0, 0.0], [1.25, 1.25, 1.0, 0.0]]
    reward = torch.tensor([10.0, -1.0])
    assert returns_to_go(reward, kl, 0.5).tolist() == [[5.5, 6.5, 8.0, 10.0], [-1.625, -1.625, -1.5, -1.0]]


def test_leave_one_out_baseline_excludes_the_row_itself():
    v = torch.tensor([[1.0], [2.0], [6.0], [3.0]], dtype=torch.float64)
    assert leave_one_out_baseline(v)[:, 0].tolist() == [11 / 3, 10 / 3, 2.0, 3.0]
    groups = ["a", "b", "a", "c"]
    # "a": the other "a"; "b" and "c" are alone: the rest of the batch
    assert leave_one_out_baseline(v, groups)[:, 0].tolist() == [6.0, 10 / 3, 1.0, 3.0]


def test_advantages_are_unbiased_and_in_reward_scale_units():
    returns = torch.tensor([[1.0, 2.0], [3.0, 4.0], [8.0, 6.0]], dtype=torch.float64)
    adv = advantages(returns, "batch", ["x"] * 3, reward_scale=2.0)
    expected = (returns - (returns.sum(0) - returns) / 2) / 2.0
    assert torch.equal(adv, expected)
    # the leave-one-out advantage is n/(n-1) times the mean-centred one: no 1 - 1/n shrinkage
    centred = returns - returns.mean(0)
    assert torch.allclose(adv * 2.0, centred * 3 / 2)


def test_reward_scale_is_the_std_and_constant_rewards_give_one():
    r = torch.tensor([1.0, 3.0, 5.0])
    assert measure_reward_scale(r) == pytest.approx(2.0)
    assert measure_reward_scale(torch.full((4,), 7.0)) == 1.0


def _policy_grad(loss_fn, log_prob, *args, **kw):
    lp = log_prob.clone().requires_grad_(True)
    loss, stats = loss_fn(lp, *args, **kw)
    loss.backward()
    return loss, lp.grad, stats


def test_dpok_loss_value_and_gradient_in_closed_form():
    """On policy (ratio 1) the loss is ``-d * mean(A) + kl_weight * mean(KL)``; its gradient wrt the
    summed log-probability is ``-A / B`` (the policy gradient) and wrt KL ``kl_weight / B``."""
    B, d = 4, 1000
    log_prob = torch.tensor([-5.0, -6.0, -7.0, -8.0], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    kl = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64, requires_grad=True)
    lp = log_prob.clone().requires_grad_(True)
    loss, stats = dpok_loss(lp, log_prob, adv, kl, kl_weight=0.25, clip_range=1e-4, num_dims=d)
    loss.backward()
    assert loss.item() == pytest.approx(-d * adv.mean().item() + 0.25 * 0.25)
    assert torch.allclose(lp.grad, -adv / B)
    assert torch.allclose(kl.grad, torch.full((B,), 0.25 / B, dtype=torch.float64))
    assert stats["clip_fraction"].item() == 0.0 and stats["kl"].item() == pytest.approx(0.25)


def test_the_clip_is_per_dimension_and_blocks_only_the_improving_side():
    d, eps = 10_000, 1e-4
    old = torch.zeros(4, dtype=torch.float64)
    # per-dimension log-ratio: 0.5 eps (inside), 2 eps (outside, up), -2 eps (outside, down), 2 eps
    log_prob = torch.tensor([0.5, 2.0, -2.0, 2.0], dtype=torch.float64) * eps * d
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    _, grad, stats = _policy_grad(clipped_policy_loss, log_prob, old, adv, eps, d)
    rbar = torch.exp(log_prob / d)
    # inside: -A rbar / B; clipped where the ratio already moved in the advantage's direction: 0;
    # the last row moved against its (negative) advantage: the unclipped term keeps its gradient
    expected = torch.tensor([-rbar[0] / 4, 0.0, 0.0, rbar[3] / 4], dtype=torch.float64)
    assert torch.allclose(grad, expected)
    assert stats["clip_fraction"].item() == 0.75
    # a clip applied to the summed log-probability would block even the first row (ratio e^0.5)
    assert (torch.exp(log_prob) - 1).abs().min() > 1000 * eps


def test_ddpo_loss_is_dpok_without_kl():
    log_prob = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    a, ga, _ = _policy_grad(ddpo_loss, log_prob, log_prob, adv, clip_range=0.1, num_dims=3)
    b, gb, _ = _policy_grad(dpok_loss, log_prob, log_prob, adv, torch.zeros(2), kl_weight=0.0, clip_range=0.1,
                            num_dims=3)
    assert a.item() == b.item() and torch.equal(ga, gb) and torch.equal(ga, -adv / 2)


def test_value_net_learns_a_state_dependent_return():
    torch.manual_seed(0)
    net = ValueNet((2,), 0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(256, 2)
    t = torch.randint(0, 1000, (256,))
    target = x[:, 0] - 0.5 * x[:, 1]
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(net(x, t), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * target.var().item()
    image_net = ValueNet((4, 8, 8), 16)
    assert image_net(torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]), torch.randn(3, 5, 16)).shape == (3,)


def test_v_prediction_converts_to_the_same_eps():
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
              "num_train_timesteps": 1000, "steps_offset": 1, "prediction_type": "v_prediction"}
    schedule = DDIMSchedule.from_scheduler_config(config, 10)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    t = schedule.timesteps[[0, 4, 9]]
    abar = schedule.alphas_cumprod[t].float()[:, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    assert torch.allclose(schedule.eps_from_output(t, x_t, v), eps, atol=1e-5)
    eps_schedule = DDIMSchedule.from_scheduler_config({**config, "prediction_type": "epsilon"}, 10)
    assert torch.equal(eps_schedule.timesteps, DDIMSchedule.stable_diffusion(10).timesteps)
    assert torch.equal(eps_schedule.eps_from_output(t, x_t, eps), eps)


def test_schedule_matches_diffusers_ddim_for_the_shipped_configs():
    """Leading and trailing spacing, set_alpha_to_one and a linear beta schedule, step for step
    against diffusers' DDIMScheduler (eta = 1)."""
    from diffusers import DDIMScheduler

    for extra in ({"timestep_spacing": "leading", "steps_offset": 1},
                  {"timestep_spacing": "trailing", "set_alpha_to_one": True, "beta_schedule": "linear",
                   "beta_start": 0.0001, "beta_end": 0.02}):
        config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                  "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, **extra}
        ours = DDIMSchedule.from_scheduler_config(config, 20)
        ref = DDIMScheduler(**config)
        ref.set_timesteps(20)
        assert ours.timesteps.tolist() == ref.timesteps.tolist()
        g = torch.Generator().manual_seed(1)
        x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        for i in (0, 7, 19):
            stats = ddim_step_stats(ours, i, x, eps)
            noise = torch.randn(x.shape, generator=g)
            prev = ref.step(eps, ours.timesteps[i], x, eta=1.0, variance_noise=noise).prev_sample
            assert torch.allclose(stats.mean + stats.std * noise, prev, atol=1e-5)


def test_unsupported_prediction_type_names_the_field():
    with pytest.raises(ScheduleError, match="prediction_type = 'sample'"):
        DDIMSchedule.from_scheduler_config({"prediction_type": "sample"}, 10)
    assert math.isfinite(DDIMSchedule.from_scheduler_config({}, 10).sigma(0))
