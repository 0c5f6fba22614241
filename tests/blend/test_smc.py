"""The SMC core against brute force: a discrete chain whose paths can be enumerated, and a linear
Gaussian chain whose tilted marginal is known in closed form."""

import itertools
import math

import pytest
import torch

from diffusion_blend.blend.smc import (SMCState, effective_sample_size, gaussian_transition_log_ratio,
                                       log_weight_increment, systematic_resample)

ALPHA = 0.7


def _discrete_problem(seed=0, states=3, steps=3):
    g = torch.Generator().manual_seed(seed)
    init = torch.softmax(torch.randn(states, generator=g, dtype=torch.float64), 0)
    base = [torch.softmax(torch.randn(states, states, generator=g, dtype=torch.float64), 1) for _ in range(steps)]
    prop = [torch.softmax(torch.randn(states, states, generator=g, dtype=torch.float64), 1) for _ in range(steps)]
    reward = torch.randn(states, generator=g, dtype=torch.float64)
    # potentials for the states before the last (any positive function); the last is the reward
    pots = [torch.randn(states, generator=g, dtype=torch.float64) for _ in range(steps)] + [reward / ALPHA]
    return init, base, prop, reward, pots


def test_increments_telescope_to_the_target_importance_weight():
    """For every path: start potential + sum of increments = log dP_base/dQ(path) + R(x_0)/alpha,
    whatever the intermediate potentials."""
    init, base, prop, reward, pots = _discrete_problem()
    steps = len(base)
    for path in itertools.product(range(3), repeat=steps + 1):
        log_w = pots[0][path[0]]
        log_pq = 0.0
        for t in range(steps):
            a, b = path[t], path[t + 1]
            ratio = torch.log(base[t][a, b]) - torch.log(prop[t][a, b])
            log_pq += float(ratio)
            log_w = log_w + log_weight_increment(ratio, pots[t + 1][b], pots[t][a])
        assert float(log_w) == pytest.approx(log_pq + float(reward[path[-1]]) / ALPHA, abs=1e-12)


def _run_discrete(init, base, prop, pots, n, g, resample_below=0.5):
    x = torch.multinomial(init, n, replacement=True, generator=g)
    state = SMCState.start(pots[0][x], resample_below)
    for t in range(len(base)):
        x_next = torch.multinomial(prop[t][x], 1, generator=g).squeeze(1)
        ratio = torch.log(base[t][x, x_next]) - torch.log(prop[t][x, x_next])
        state.update(ratio, pots[t + 1][x_next])
        x = x_next
        if t < len(base) - 1:
            idx = state.maybe_resample(t, g)
            if idx is not None:
                x = x[idx]
    return x, state


def _exact_discrete(init, base, reward):
    """Z = E_base[exp(R/alpha)] (relative to the proposal's start, which is shared) and the target's
    final-state distribution, by enumerating every path."""
    final = torch.zeros(3, dtype=torch.float64)
    for path in itertools.product(range(3), repeat=len(base) + 1):
        p = init[path[0]]
        for t in range(len(base)):
            p = p * base[t][path[t], path[t + 1]]
        final[path[-1]] += p * torch.exp(reward[path[-1]] / ALPHA)
    z = float(final.sum())
    return z, final / z


def test_the_normaliser_estimate_is_unbiased_with_resampling():
    """E[Z_hat] = Z exactly (SMC's normaliser estimate is unbiased), here with N = 8 particles and
    adaptive resampling; checked over 3000 independent runs to 4 standard errors."""
    init, base, prop, reward, pots = _discrete_problem(seed=1)
    z, _ = _exact_discrete(init, base, reward)
    g = torch.Generator().manual_seed(0)
    z_hats = torch.tensor([math.exp(_run_discrete(init, base, prop, pots, 8, g, 0.9)[1].log_z()) for _ in range(3000)])
    se = float(z_hats.std() / math.sqrt(len(z_hats)))
    assert abs(float(z_hats.mean()) - z) < 4 * se, (float(z_hats.mean()), z, se)
    assert se < 0.05 * z  # the check has power


def test_weighted_particles_reach_the_enumerated_target():
    init, base, prop, reward, pots = _discrete_problem(seed=2)
    _, target = _exact_discrete(init, base, reward)
    g = torch.Generator().manual_seed(1)
    x, state = _run_discrete(init, base, prop, pots, 40000, g)
    w = state.weights()
    got = torch.stack([w[x == s].sum() for s in range(3)])
    assert torch.allclose(got, target, atol=0.01), (got, target)
    proposal_only = torch.bincount(x, minlength=3).double() / len(x)
    assert (proposal_only - target).abs().max() > 0.05  # the correction did something


def _gaussian_chain():
    """x_T ~ N(0, 1); base x' = a x + b + s e, proposal x' = a' x + b' + s e (same s)."""
    return [(0.9, 0.1, 0.4), (0.8, -0.2, 0.3), (1.1, 0.3, 0.2)], [(0.7, 0.5, 0.4), (0.9, 0.2, 0.3), (1.0, 0.6, 0.2)]


def _gaussian_smc(base, prop, r, n, g):
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)
    state = SMCState.start(r * x[:, 0] / ALPHA)
    for t, ((a, b, s), (a2, b2, _)) in enumerate(zip(base, prop)):
        mean_q = a2 * x + b2
        x_next = mean_q + s * torch.randn(x.shape, generator=g, dtype=torch.float64)
        state.update(gaussian_transition_log_ratio(x_next, a * x + b, mean_q, s), r * x_next[:, 0] / ALPHA)
        x = x_next
        idx = state.maybe_resample(t, g) if t < len(base) - 1 else None
        if idx is not None:
            x = x[idx]
    return x[:, 0], state


def test_gaussian_chain_reaches_the_closed_form_tilt():
    """Linear Gaussian chain, linear reward r x: the target's x_0 is the base marginal N(m, v) shifted
    by v r / alpha.  20 independent runs of N = 5000 particles, potentials exp(r x_t / alpha),
    adaptive resampling; the runs' spread gives the standard error (after resampling the ESS
    overstates the precision: the particles share ancestors)."""
    base, prop = _gaussian_chain()
    r = 1.3
    m, v = 0.0, 1.0
    for a, b, s in base:
        m, v = a * m + b, a * a * v + s * s
    want_mean = m + v * r / ALPHA
    g = torch.Generator().manual_seed(3)
    means, variances, resampled = [], [], []
    for _ in range(20):
        x, state = _gaussian_smc(base, prop, r, 5000, g)
        w = state.weights()
        mean = float((w * x).sum())
        means.append(mean)
        variances.append(float((w * (x - mean) ** 2).sum()))
        resampled.append(bool(state.resampled_at))
    means = torch.tensor(means)
    se = float(means.std() / math.sqrt(len(means)))
    assert abs(float(means.mean()) - want_mean) < 4 * se and se < 0.03, (float(means.mean()), want_mean, se)
    assert sum(variances) / len(variances) == pytest.approx(v, rel=0.1)
    assert all(resampled)  # the adaptive trigger fired on this problem
    m_q = 0.0
    for a, b, _ in prop:
        m_q = a * m_q + b
    assert abs(m_q - want_mean) > 0.5  # the proposal alone is elsewhere


def test_gaussian_log_ratio_is_the_difference_of_normal_log_densities():
    g = torch.Generator().manual_seed(4)
    x, mp, mq = (torch.randn(5, 2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    std = 0.37
    normal = lambda mean: torch.distributions.Normal(mean, std).log_prob(x).sum(dim=(1, 2))  # noqa: E731
    assert torch.allclose(gaussian_transition_log_ratio(x, mp, mq, std), normal(mp) - normal(mq), atol=1e-10)
    with pytest.raises(ValueError, match="std"):
        gaussian_transition_log_ratio(x, mp, mq, 0.0)


def test_ess_and_systematic_resampling():
    n = 10
    assert effective_sample_size(torch.zeros(n)) == pytest.approx(n)
    one_hot = torch.full((n,), -1e9)
    one_hot[3] = 0.0
    assert effective_sample_size(one_hot) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(5)
    log_w = torch.randn(n, generator=g, dtype=torch.float64) * 2
    w = torch.softmax(log_w, 0)
    for _ in range(50):
        counts = torch.bincount(systematic_resample(log_w, g), minlength=n).double()
        assert counts.sum() == n
        assert bool(((counts >= torch.floor(n * w) - 1e-9) & (counts <= torch.ceil(n * w) + 1e-9)).all())


def test_adaptive_trigger_and_the_normaliser_across_a_resampling():
    state = SMCState.start(torch.zeros(4), resample_below=0.5)
    state.update(torch.tensor([0.0, 0.1, -0.1, 0.05]), torch.zeros(4))
    assert state.maybe_resample(0) is None  # ESS ~ 4 > 2
    state.update(torch.tensor([0.0, -8.0, -8.0, -8.0]), torch.zeros(4))
    before = state.log_z()
    idx = state.maybe_resample(1, torch.Generator().manual_seed(0))
    assert idx is not None and state.resampled_at == [1] and bool((state.log_weights == 0).all())
    assert state.log_z() == pytest.approx(before, abs=1e-12)
    assert len(state.ess_history) == 2
    with pytest.raises(ValueError, match="resample_below"):
        SMCState.start(torch.zeros(2), resample_below=1.5)


# --- the ancestral step and the SMC chain driver ------------------------------------------------

from diffusion_blend.blend.coefficients import blend_coefficients, tilt_reward_weights  # noqa: E402
from diffusion_blend.blend.smc import ancestral_step, smc_ancestral_chain  # noqa: E402


@pytest.mark.parametrize("sigma,sigma_next", [(14.6, 9.0), (3.0, 2.9), (0.5, 0.03)])
def test_vp_ancestral_step_at_eta_1_is_the_ddpm_posterior(sigma, sigma_next):
    """Independent computation in the variance-preserving variables: abar = 1 / (1 + sigma²),
    x_vp = sqrt(abar) x, and q(x_prev | x_t, x0) of DDPM (Ho et al. eq. 7)."""
    abar_t, abar_p = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    alpha_t = abar_t / abar_p
    x, x0 = torch.tensor([1.7, -0.4], dtype=torch.float64), torch.tensor([0.3, 0.8], dtype=torch.float64)
    x_vp = abar_t**0.5 * x
    mean_vp = (abar_p**0.5 * (1 - alpha_t) * x0 + alpha_t**0.5 * (1 - abar_p) * x_vp) / (1 - abar_t)
    var_vp = (1 - abar_p) * (1 - alpha_t) / (1 - abar_t)
    step = ancestral_step(sigma, sigma_next, eta=1.0)
    torch.testing.assert_close(step.mean(x, x0), mean_vp / abar_p**0.5, rtol=1e-12, atol=1e-12)
    assert step.noise_std == pytest.approx((var_vp / abar_p) ** 0.5, rel=1e-12)


def test_ancestral_step_at_eta_0_is_the_deterministic_euler_step_for_both_parameterisations():
    x, x0 = torch.tensor([1.2]), torch.tensor([0.1])
    vp, flow = ancestral_step(2.0, 1.0, eta=0.0), ancestral_step(0.8, 0.6, eta=0.0, flow=True)
    assert vp.noise_std == 0.0 and flow.noise_std == 0.0
    eps = (x - x0) / 2.0  # VP: x = x0 + sigma eps
    torch.testing.assert_close(vp.mean(x, x0), x0 + 1.0 * eps)
    eps = (x - (1 - 0.8) * x0) / 0.8  # flow: x = (1 - sigma) x0 + sigma eps
    torch.testing.assert_close(flow.mean(x, x0), (1 - 0.6) * x0 + 0.6 * eps)
    last = ancestral_step(0.3, 0.0, flow=True)
    assert (last.x_coef, last.denoised_coef, last.noise_std) == (0.0, 1.0, 0.0)


def test_flow_ancestral_step_keeps_the_marginal_of_a_point_mass():
    """For x_0 fixed, x_t = (1 - s) x_0 + s z; one step with the true x̂_0 = x_0 must land on the
    marginal at sigma_next: mean (1 - s') x_0, variance s'²."""
    x0, s, s_next = 0.7, 0.8, 0.5
    step = ancestral_step(s, s_next, eta=1.0, flow=True)
    # x_next = a ((1-s) x0 + s z) + b x0 + std z'
    mean = step.x_coef * (1 - s) * x0 + step.denoised_coef * x0
    var = (step.x_coef * s) ** 2 + step.noise_std**2
    assert mean == pytest.approx((1 - s_next) * x0, rel=1e-12)
    assert var == pytest.approx(s_next**2, rel=1e-12)


@pytest.mark.parametrize("bad", [dict(sigma=1.0, sigma_next=2.0), dict(sigma=0.0, sigma_next=0.0),
                                 dict(sigma=1.0, sigma_next=0.5, eta=1.5)])
def test_ancestral_step_rejects_bad_inputs(bad):
    with pytest.raises(ValueError, match="sigma|eta"):
        ancestral_step(**bad)


def test_tilt_reward_weights_are_the_normalised_weights_over_alpha():
    w, alpha_refs, lam = [2.0, 1.0, 1.0], [0.1, 0.3, 0.2], 1.7
    c = blend_coefficients(w, alpha_refs, lam)
    w_tilde = [x / sum(w) for x in w]
    alpha = sum(a * b for a, b in zip(w_tilde, alpha_refs)) / lam
    assert tilt_reward_weights(c, alpha_refs) == pytest.approx([x / alpha for x in w_tilde], rel=1e-12)


def _denoiser_chain(beta: float, shift: float):
    """Base x_0 ~ N(0, 1) with its exact denoiser E[x_0 | x] = x / (1 + sigma²); the tilt is
    exp(beta x_0), whose exact denoiser is the base's plus beta sigma² / (1 + sigma²).  The proposal
    adds ``shift`` times that (1: the exact tilt; else a blend that under- or overshoots)."""

    def denoise(x, sigma):
        base = x / (1 + sigma**2)
        return base + shift * beta * sigma**2 / (1 + sigma**2), base

    sigmas = torch.cat([torch.logspace(1, -1.5, 24), torch.zeros(1)])
    return denoise, sigmas, (lambda clean: beta * clean[:, 0])


def _base_chain(denoise, sigmas, n, g):
    x = torch.randn(n, 1, generator=g, dtype=torch.float64) * float(sigmas[0])
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        step = ancestral_step(float(s), float(s_next))
        x = step.mean(x, denoise(x, float(s))[1]) + step.noise_std * torch.randn(x.shape, generator=g, dtype=x.dtype)
    return x[:, 0]


def test_smc_chain_corrects_a_wrong_proposal_to_the_tilted_base_chain():
    beta, shift = 1.0, 0.4  # a proposal that goes less than half the way
    denoise, sigmas, log_potential = _denoiser_chain(beta, shift)
    g = torch.Generator().manual_seed(0)
    # the truth, independently: the base chain's own samples, importance-weighted by exp(beta x_0)
    ref = _base_chain(denoise, sigmas, 400_000, g)
    w = torch.softmax(beta * ref, 0)
    ref_mean, ref_var = float((w * ref).sum()), float((w * (ref - (w * ref).sum()) ** 2).sum())
    x = torch.randn(4000, 1, generator=g) * float(sigmas[0])
    out = smc_ancestral_chain(denoise, x, sigmas, log_potential, generator=g)
    smc = out.samples[:, 0].double()
    proposal_only = smc_ancestral_chain(lambda x, s: (denoise(x, s)[0],) * 2, x, sigmas,
                                        lambda clean: torch.zeros(clean.shape[0]), generator=g).samples[:, 0]
    assert abs(float(smc.mean()) - ref_mean) < 0.08, (float(smc.mean()), ref_mean)
    assert abs(float(smc.var()) - ref_var) < 0.1, (float(smc.var()), ref_var)
    assert abs(float(proposal_only.mean()) - ref_mean) > 0.25  # the correction is what closes the gap
    assert out.log[-1].resampled and len(out.log) == len(sigmas)
    assert all(1.0 <= e.ess <= 4000 + 1e-6 for e in out.log)
    torch.testing.assert_close(out.final_log_potential.float(), beta * out.samples[:, 0].double().float())


def test_smc_chain_holds_the_potential_between_scoring_steps_and_calls_denoise_once_per_step():
    denoise, sigmas, log_potential = _denoiser_chain(0.5, 0.0)
    calls, scored = [], []

    def counting_denoise(x, s):
        calls.append(s)
        return denoise(x, s)

    def counting_potential(clean):
        scored.append(clean.shape[0])
        return log_potential(clean)

    g = torch.Generator().manual_seed(1)
    out = smc_ancestral_chain(counting_denoise, torch.randn(64, 1, generator=g) * 10, sigmas, counting_potential,
                              score_every=5, generator=g)
    steps = len(sigmas) - 1
    assert len(calls) == steps
    assert len(scored) == len(range(0, steps, 5)) + 1  # every 5th step and the final sample
    assert [e.scored for e in out.log[:-1]] == [i % 5 == 0 for i in range(steps)]


def test_smc_chain_rejects_bad_inputs():
    denoise, sigmas, log_potential = _denoiser_chain(0.5, 0.0)
    with pytest.raises(ValueError, match="score_every"):
        smc_ancestral_chain(denoise, torch.zeros(4, 1), sigmas, log_potential, score_every=0)
    with pytest.raises(ValueError, match="resample_below"):
        smc_ancestral_chain(denoise, torch.zeros(4, 1), sigmas, log_potential, resample_below=2.0)


def test_signal_fraction_runs_from_noise_to_signal():
    from diffusion_blend.blend.smc import signal_fraction

    assert signal_fraction(0.0) == 1.0 and signal_fraction(1e4) < 1e-7
    assert signal_fraction(1.0) == 0.5 and signal_fraction(0.5, flow=True) == 0.5
    assert signal_fraction(1.0, flow=True) == 0.0 and signal_fraction(0.0, flow=True) == 1.0


@pytest.mark.parametrize("potential_on,temper", [("base", False), ("base", True), ("proposal", False)])
def test_every_potential_choice_reaches_the_same_target(potential_on, temper):
    """The potentials telescope: on the base's or the proposal's x̂_0, tempered or not, the chain
    targets the tilted base chain (the default, tempered on the proposal, is pinned above)."""
    beta = 1.0
    denoise, sigmas, log_potential = _denoiser_chain(beta, 0.4)
    g = torch.Generator().manual_seed(4)
    ref = _base_chain(denoise, sigmas, 400_000, g)
    w = torch.softmax(beta * ref, 0)
    ref_mean = float((w * ref).sum())
    x = torch.randn(4000, 1, generator=g) * float(sigmas[0])
    out = smc_ancestral_chain(denoise, x, sigmas, log_potential, generator=g, potential_on=potential_on,
                              temper=temper)
    assert abs(float(out.samples.double().mean()) - ref_mean) < 0.08
    with pytest.raises(ValueError, match="potential_on"):
        smc_ancestral_chain(denoise, x, sigmas, log_potential, potential_on="blend")
