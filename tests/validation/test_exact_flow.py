"""The blend on flow-matching models (velocity prediction), on problems with exact answers."""

import torch

from diffusion_blend.blend.coefficients import blend_coefficients
from diffusion_blend.validation.flow import exact_velocity, flow_noised, flow_sigmas, sample_flow
from diffusion_blend.validation.gmm import DTYPE, tilt
from diffusion_blend.validation.methods import db_eps, mmd_test

from test_exact_gaussian import ALPHA_REFS, LINEAR, mixture, single_gaussian


def test_exact_velocity_is_the_conditional_expectation():
    """``-(x + s grad log p_s) / (1 - s)`` against ``E[eps - x_0 | x]`` written out for a Gaussian."""
    base = single_gaussian()
    mu, cov = base.means[0], base.covs[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, generator=g, dtype=DTYPE)
    for s in (0.05, 0.3, 0.7, 0.95):
        c = (1 - s) ** 2 * cov + s**2 * torch.eye(2, dtype=DTYPE)
        resid = torch.linalg.solve(c, (x - (1 - s) * mu).T).T  # C^-1 (x - (1 - s) mu)
        e_eps = s * resid
        e_x0 = mu + (1 - s) * resid @ cov.T
        assert torch.allclose(exact_velocity(base)(x, s), e_eps - e_x0, atol=1e-12)


def test_linear_rewards_on_a_gaussian_blend_velocities_exactly():
    """The affine blend of the bases' velocities is the tilted target's velocity, at every noise level."""
    base = single_gaussian()
    bases = [exact_velocity(tilt(base, [r], [1.0], a)) for r, a in zip(LINEAR, ALPHA_REFS)]
    g = torch.Generator().manual_seed(1)
    for w, lam in (([0.3, 0.7], 1.0), ([0.8, 0.2], 2.5), ([0.5, 0.5], 0.25)):
        c = blend_coefficients(w, ALPHA_REFS, lam)
        alpha = sum(wi / sum(w) * a for wi, a in zip(w, ALPHA_REFS)) / lam
        target = exact_velocity(tilt(base, LINEAR, [wi / sum(w) for wi in w], alpha))
        v = db_eps(c, exact_velocity(base), bases)  # the nodes' plan and combine, on velocities
        for s in (0.98, 0.6, 0.2, 0.01):
            x = torch.randn(64, 2, generator=g, dtype=DTYPE) * 2
            assert (v(x, s) - target(x, s)).abs().max().item() <= 1e-9


def test_flow_samples_of_the_blend_are_indistinguishable_from_the_target():
    base = single_gaussian()
    w, lam = [0.4, 0.6], 1.5
    alpha = sum(wi * a for wi, a in zip(w, ALPHA_REFS)) / lam
    target = tilt(base, LINEAR, w, alpha)
    bases = [exact_velocity(tilt(base, [r], [1.0], a)) for r, a in zip(LINEAR, ALPHA_REFS)]
    v = db_eps(blend_coefficients(w, ALPHA_REFS, lam), exact_velocity(base), bases)
    g = torch.Generator().manual_seed(2)
    ours = sample_flow(v, flow_sigmas(200, shift=3.0), 4096, 2, g)
    _, p_value = mmd_test(ours, target.sample(4096, g), permutations=200, generator=g)
    assert p_value > 0.01


def test_the_blend_is_not_the_target_off_the_gaussian_linear_case():
    """On a mixture with a quadratic reward the velocity blend is an approximation (as in VP): the
    exact check above is a real check, not an identity that holds for any problem."""
    from diffusion_blend.validation.gmm import quadratic

    base, reward = mixture(), [quadratic(1.0, [1.0, 1.0]), quadratic(1.0, [-1.0, 0.5])]
    bases = [exact_velocity(tilt(base, [r], [1.0], a)) for r, a in zip(reward, ALPHA_REFS)]
    c = blend_coefficients([0.5, 0.5], ALPHA_REFS, 1.0)
    target = exact_velocity(tilt(base, reward, [0.5, 0.5], sum(0.5 * a for a in ALPHA_REFS)))
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    gap = (db_eps(c, exact_velocity(base), bases)(x, 0.5) - target(x, 0.5)).abs().max().item()
    assert gap > 1e-3
    assert flow_noised(base, 0.0).means.equal(base.means)
