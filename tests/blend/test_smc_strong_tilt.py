"""DB-SMC's tools for strong tilts (blend/smc.py): resampling schemes, adaptive tempering, and
resample-move with pCN Metropolis-Hastings steps, each against closed forms or the brute-force
tilted base chain of a 1-D Gaussian problem."""

import math

import pytest
import torch

from diffusion_blend.blend.smc import (RESAMPLING_SCHEMES, SMCState, conditional_ess_fraction, next_temperature,
                                       resample, smc_ancestral_chain)

from test_smc import _base_chain, _denoiser_chain


@pytest.mark.parametrize("scheme", RESAMPLING_SCHEMES)
def test_every_resampling_scheme_is_unbiased_and_stays_in_its_group(scheme):
    g = torch.Generator().manual_seed(0)
    groups, n = 3, 6
    log_w = torch.randn(groups, n, generator=g, dtype=torch.float64) * 1.5
    expected = n * torch.softmax(log_w, -1)
    counts = torch.zeros(groups, n, dtype=torch.float64)
    draws = 2000
    for _ in range(draws):
        idx = resample(log_w, scheme, g)
        c = torch.zeros(groups, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(groups, n, dtype=torch.float64))
        assert bool((c.sum(-1) == n).all())
        if scheme == "systematic":
            assert bool(((c >= torch.floor(expected) - 1e-9) & (c <= torch.ceil(expected) + 1e-9)).all())
        if scheme == "residual":
            assert bool((c >= torch.floor(expected) - 1e-9).all())
        counts += c
    multinomial_se = (expected * (1 - expected / n) / draws) ** 0.5  # the widest scheme's standard error
    assert bool(((counts / draws - expected).abs() <= 4 * multinomial_se + 1e-3).all()), (counts / draws, expected)
    state = SMCState.start(log_w, resample_below=1.0, resampling=scheme)
    flat = state.maybe_resample(0, g, force=True)
    assert bool((flat // n == torch.arange(groups).repeat_interleave(n)).all())  # ancestors stay in their group
    with pytest.raises(ValueError, match="resampling"):
        resample(log_w, "stratified-ish", g)


def test_only_the_groups_below_the_threshold_are_resampled():
    log_w = torch.zeros(2, 4, dtype=torch.float64)
    log_w[1] = torch.tensor([0.0, -9.0, -9.0, -9.0])
    state = SMCState.start(log_w, resample_below=0.5)
    idx = state.maybe_resample(3, torch.Generator().manual_seed(0))
    assert idx[:4].tolist() == [0, 1, 2, 3] and idx[4:].tolist() == [4, 4, 4, 4]
    assert state.log_weights[0].tolist() == [0.0] * 4 and state.log_weights[1].tolist() == [0.0] * 4
    assert state.lineages() == pytest.approx((4 + 1) / 2)
    want = torch.logsumexp(log_w[1], 0) - math.log(4)  # the resampled group's mean weight went into its normaliser
    assert float(state.log_z_per_group()[1]) == pytest.approx(float(want), abs=1e-12)


def test_the_adaptive_exponent_meets_its_conditional_ess_target():
    g = torch.Generator().manual_seed(1)
    log_w = torch.randn(4, 50, generator=g, dtype=torch.float64) * 0.3
    raw = torch.randn(4, 50, generator=g, dtype=torch.float64) * torch.tensor([0.01, 1.0, 5.0, 50.0])[:, None]
    fixed, old = torch.zeros_like(raw), torch.zeros_like(raw)
    assert torch.allclose(conditional_ess_fraction(log_w, torch.full_like(raw, 3.0)), torch.ones(4, dtype=torch.float64))
    kappa_prev = torch.tensor([0.0, 0.0, 0.1, 0.0], dtype=torch.float64)
    kappa = next_temperature(log_w, fixed, raw, old, kappa_prev, 0.6)
    assert kappa[0] == 1.0  # a flat potential: straight to the target
    cess = conditional_ess_fraction(log_w, kappa[:, None] * raw)
    assert bool((kappa >= kappa_prev).all()) and bool((kappa[1:] < 1).all())
    torch.testing.assert_close(cess[1:], torch.full((3,), 0.6, dtype=torch.float64), atol=1e-6, rtol=0)
    stuck = next_temperature(log_w, torch.randn(4, 50, generator=g, dtype=torch.float64) * 30, raw, old, kappa_prev, 0.6)
    assert torch.equal(stuck, kappa_prev)  # the transition alone is below the target: the exponent waits


BETA = 2.0


def _reference_mean(denoise, sigmas):
    """The tilted base chain's mean of x_0, by importance-weighting 400k of the base chain's own samples."""
    ref = _base_chain(denoise, sigmas, 400_000, torch.Generator().manual_seed(0))
    w = torch.softmax(BETA * ref, 0)
    return float((w * ref).sum())


def _smc_mean(shift, seeds=(10, 11), groups=8, particles=512, **options):
    denoise, sigmas, log_potential = _denoiser_chain(BETA, shift)
    means, results = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(groups * particles, 1, generator=g) * float(sigmas[0])
        out = smc_ancestral_chain(denoise, x, sigmas, log_potential, generator=g, groups=groups, **options)
        means.append(float(out.samples.double().mean()))
        results.append(out)
    return sum(means) / len(means), results, _reference_mean(denoise, sigmas)


@pytest.mark.parametrize("shift", [0.0, 0.4])
def test_moves_leave_the_tilted_target_invariant(shift):
    """pCN moves after every resampling (resample_below = 1: every step) on the base as the proposal
    (shift 0) and on a blend that goes less than half the way: the tilted base chain's mean.  Without
    the Metropolis-Hastings correction the moves redraw x_t from the proposal's own transition and
    the mean falls back toward the base (-1.3 here)."""
    got, results, want = _smc_mean(shift, temper="adaptive", moves=4, move_step=0.8, resample_below=1.0)
    assert abs(got - want) < 0.06, (got, want)
    out = results[0]
    accepted = [e.acceptance for e in out.log if e.acceptance is not None]
    assert len(accepted) >= 20 and 0.3 < sum(accepted) / len(accepted) < 1.0
    assert out.move_calls == 4 * len(accepted)


def test_adaptive_tempering_ends_at_exponent_one():
    """A demanding target (CESS >= 0.99 per step) keeps the exponent below 1 until the final sample,
    which is weighted at exponent 1: the returned potentials are the reward itself and the mean is
    the tilt's."""
    got, results, want = _smc_mean(0.0, temper="adaptive", ess_target=0.99, moves=1)
    out = results[0]
    kappas = [e.kappa for e in out.log]
    assert all(b >= a for a, b in zip(kappas, kappas[1:])) and kappas[-1] == 1.0 and kappas[-2] < 0.9
    torch.testing.assert_close(out.final_log_potential, BETA * out.samples[:, 0].double())
    assert abs(got - want) < 0.08, (got, want)
