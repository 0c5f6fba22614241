"""Adjoint Matching's pieces against independent computations, on the toy family (CPU, seconds).

The end-to-end proof (the trained LoRA is the tilt at its stated alpha for every sampler) is in
``tests/validation/test_fidelity.py``; here: the terminal adjoint's sign and scale, the lean adjoint
through the frozen base (never the fine-tuned network), the base's mean from the base, the regression
target, the file it writes and the configs it refuses."""

import copy
import json
import math
import re

import pytest
import torch

from diffusion_blend.blend.basis import chain_mismatch, make_basis
from diffusion_blend.blend.lora_file import read_lora
from diffusion_blend.training.algorithms import adjoint_matching_loss, terminal_adjoint
from diffusion_blend.training.families.toy import EpsMLP, ToyPolicy
from diffusion_blend.training.sampler import DDIMSchedule, FlowSchedule, ddim_step_stats, sample_trajectory
from diffusion_blend.training.train import Round, _solve_adjoint
from diffusion_blend.validation.toy import toy_config, train_toy


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return EpsMLP(2, hidden=32, depth=2).eval()


def test_terminal_adjoint_is_minus_the_reward_gradient_over_alpha():
    grad = torch.tensor([[2.0, -4.0]])
    assert torch.equal(terminal_adjoint(grad, 0.5), torch.tensor([[-4.0, 8.0]]))
    with pytest.raises(ValueError, match="alpha_ref = 0.0: expected > 0"):
        terminal_adjoint(grad, 0.0)


def test_loss_vanishes_exactly_at_the_target_shift_and_reports_the_kl():
    base_mean = torch.randn(3, 2)
    target = torch.randn(3, 2)
    loss, stats = adjoint_matching_loss(base_mean + target, base_mean, target, std=0.3)
    assert loss.item() < 1e-12  # (a + b) - a in float32
    assert stats["kl"].item() == pytest.approx(float((target**2).sum(1).mean() / (2 * 0.09)), rel=1e-6)
    loss, _ = adjoint_matching_loss(base_mean, base_mean, target, std=0.3)  # no shift: the target's size
    assert loss.item() == pytest.approx(float(((target / 0.3) ** 2).sum(1).mean() / 2), rel=1e-6)


def _policy_with_a_trained_adapter(base, schedule):
    policy = ToyPolicy(base, schedule, rank=4)
    g = torch.Generator().manual_seed(1)
    for name, p in policy.network.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make the fine-tuned network differ from the base
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return policy


def test_lean_adjoint_runs_through_the_frozen_base_and_targets_the_tilted_score(base):
    """``a_j = J_j^T ... J_{N-1}^T a_N`` with every Jacobian the *base* chain's at the sampled states
    (full Jacobians, sample by sample), the target shift ``c_j sqrt(1 - abar_j) a_j`` with ``c_j`` the
    DDIM mean's coefficient of the noise prediction, and the base's own mean at ``x_j``."""
    schedule = DDIMSchedule.stable_diffusion(4, 1.0)
    policy = _policy_with_a_trained_adapter(base, schedule)
    frozen = copy.deepcopy(base)  # an independent copy of the base: no adapter, no reference()
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(3, 2, generator=g)
    with torch.no_grad():
        traj = sample_trajectory(lambda x, t: policy.eps(x, t), schedule, x_T, g)
    reward_grad = torch.randn(3, 2, generator=g)
    alpha = 0.25
    rd = Round([""] * 3, None, traj, torch.zeros(3), {}, [0, 2], None, reward_grad=reward_grad)
    _solve_adjoint(policy, rd, alpha)

    def base_mean(j, net):
        return lambda x: ddim_step_stats(schedule, j, x, net(x[None], schedule.timesteps[j].expand(1))[0]).mean

    a = -reward_grad / alpha
    for j in range(schedule.num_steps - 1, -1, -1):
        a = torch.stack([torch.autograd.functional.jacobian(base_mean(j, frozen), traj.latents[b, j]).T @ a[b]
                         for b in range(3)])
        if j in rd.steps:
            abar, abar_prev = schedule.abar(j)
            c = -math.sqrt(abar_prev) * math.sqrt(1 - abar) / math.sqrt(abar) + math.sqrt(
                max(1 - abar_prev - schedule.sigma(j) ** 2, 0.0))
            torch.testing.assert_close(rd.target_shifts[j], c * math.sqrt(1 - abar) * a, rtol=1e-5, atol=1e-7)
            with torch.no_grad():
                mean = torch.stack([base_mean(j, frozen)(x) for x in traj.latents[:, j]])
                tuned = torch.stack([base_mean(j, policy.network)(x) for x in traj.latents[:, j]])
            torch.testing.assert_close(rd.base_means[j], mean, rtol=1e-6, atol=1e-7)
            assert (tuned - mean).abs().max() > 1e-3  # the fine-tuned chain differs: the test can tell them apart


def test_a_flows_first_step_from_pure_noise_regresses_onto_its_optimal_control(base):
    """At sigma = 1 the score does not determine the velocity: the first step's target is the chain's
    own optimal shift ``-std_0^2 a_1``, finite (no division by 1 - sigma)."""
    schedule = FlowSchedule.from_scheduler_config({"shift": 1.0}, 3)
    policy = ToyPolicy(base, schedule)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        traj = sample_trajectory(lambda x, t: policy.eps(x, t), schedule, torch.randn(2, 2, generator=g), g)
    rd = Round([""] * 2, None, traj, torch.zeros(2), {}, [0, 1], None, reward_grad=torch.ones(2, 2))
    _solve_adjoint(policy, rd, 1.0)
    assert all(torch.isfinite(rd.target_shifts[j]).all() for j in (0, 1))
    assert rd.target_shifts[0].abs().max() > 0


def test_the_file_states_alpha_ref_and_a_sampler_independent_chain(base, tmp_path):
    am = read_lora(train_toy(base, lambda x: x[:, 0], toy_config(0.5, tmp_path / "am", iterations=2, batch=16, steps=4, **{
        "algorithm.name": "adjoint_matching"})).lora_path)
    assert am.alpha_ref == 0.5 and am.metadata["db.algorithm"] == "adjoint_matching"
    assert am.metadata["db.advantage"] == "none"  # no advantages, no value net
    assert am.chain == {"sampler": "any", "eta": 1.0, "steps": 4, "spacing": "leading", "prediction": "epsilon",
                        "memoryless_chain": "ddim"}
    dpok = [read_lora(train_toy(base, lambda x: x[:, 0], toy_config(0.5, tmp_path / f"dpok{n}", iterations=1, batch=16,
                                                                   steps=n)).lora_path) for n in (4, 6)]
    # the AM LoRA blends with a DPOK LoRA of any chain; two DPOK LoRAs of different chains still clash
    assert chain_mismatch([make_basis(am, 1.0), make_basis(dpok[1], 1.0)]) is None
    message = chain_mismatch([make_basis(am, 1.0), make_basis(dpok[0], 1.0), make_basis(dpok[1], 1.0)])
    assert message and "steps differ" in message
    am.metadata["db.chain"] = json.dumps({**am.chain, "prediction": "v_prediction"})  # what it was tilted under
    assert "prediction differ" in chain_mismatch([make_basis(am, 1.0), make_basis(dpok[1], 1.0)])


@pytest.mark.parametrize("overrides, message", [
    ({"rewards": {"jpeg_compressibility": 1.0}},
     "rewards.jpeg_compressibility: not differentiable, and algorithm.name = adjoint_matching regresses onto the "
     "reward's gradient; train it with algorithm.name = dpok"),
    ({"sampling.eta": 0.5}, "sampling.eta = 0.5: expected 1 with algorithm.name = adjoint_matching"),
], ids=["JPEG", "eta 0.5"])
def test_refused_before_any_compute(tiny_base, tmp_path, overrides, message):
    """``validate`` (what the CLI and ``run_training`` run before loading anything) names the key and
    the algorithm that takes a non-differentiable reward."""
    from trainkit import tiny_config

    from diffusion_blend.training.config import ConfigError, validate

    cfg = tiny_config(tiny_base["diffusers"], tmp_path / "out", **{"algorithm.name": "adjoint_matching", **overrides})
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)
    assert not (tmp_path / "out").exists()
