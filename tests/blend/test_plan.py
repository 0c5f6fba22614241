"""What a blend evaluates (blend/plan.py) through the bank: plans, segments, resident segments, the
stochastic draw, against independent references built by merging weights into copies of the net."""

import pytest
import torch

from diffusion_blend.blend.coefficients import BlendInputError, affine_coefficients, blend_coefficients
from diffusion_blend.blend.runtime import (evaluate_plan, make_plan, relative_plan, segment_minus,
                                           static_segment)

from helpers import merged_copy
from runtimekit import (run_fn, setup)


def test_exact_and_sequential_equal_the_formula():
    net, mods, bank, x = setup()
    c = blend_coefficients([0.2, 0.5, 0.3], [1e-4, 2e-4, 5e-5], 1.7)
    eps_base = net(x)
    eps_i = [merged_copy(net, [(m, 1.0)])(x) for m in mods]
    want = eps_base + sum(ci * (e - eps_base) for ci, e in zip(c, eps_i))
    with torch.no_grad():
        exact = evaluate_plan(make_plan("exact", c), bank, net, run_fn(net, x), x.shape[0])
        seq = evaluate_plan(make_plan("sequential", c), bank, net, run_fn(net, x), x.shape[0], 1)
    torch.testing.assert_close(exact, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seq, exact, atol=1e-6, rtol=1e-6)
    assert all(not mod._forward_hooks for mod in net.modules())


def test_exact_runs_one_forward_of_batch_k_times_b():
    net, mods, bank, x = setup()
    calls = []
    c = blend_coefficients([1, 1, 1], [1e-4] * 3, 0.5)

    def run(k):
        calls.append(k)
        return net(torch.cat([x] * k))

    with torch.no_grad():
        evaluate_plan(make_plan("exact", c), bank, net, run, x.shape[0])
    assert calls == [4]


def test_a_stacked_forward_out_of_memory_is_retried_in_halves_with_the_same_result():
    """``torch.OutOfMemoryError`` from a forward of k > 1 stacked models (simulated: ComfyUI's memory
    estimate was too generous): the segments are evaluated again with half as many per forward, down
    to one, and the output is bit-identical to a run that used that count from the start; the host is
    told each new count.  A single model that does not fit raises."""
    net, mods, bank, x = setup()
    c = blend_coefficients([1, 1, 1], [1e-4] * 3, 0.5)  # 4 segments: the base and 3 LoRAs
    plan = make_plan("exact", c)
    calls, told = [], []

    def run(limit):
        def forward(k):
            calls.append(k)
            if k > limit:
                raise torch.OutOfMemoryError("simulated: CUDA out of memory")
            return net(torch.cat([x] * k))
        return forward

    with torch.no_grad():
        got = evaluate_plan(plan, bank, net, run(2), x.shape[0], None, told.append)
        assert calls == [4, 2, 2] and told == [2]
        assert torch.equal(got, evaluate_plan(plan, bank, net, run_fn(net, x), x.shape[0], 2))
        calls.clear()
        got = evaluate_plan(plan, bank, net, run(1), x.shape[0], 4, told.append)
        assert calls == [4, 2, 1, 1, 1, 1] and told == [2, 2, 1]
        assert torch.equal(got, evaluate_plan(plan, bank, net, run_fn(net, x), x.shape[0], 1))
        with pytest.raises(torch.OutOfMemoryError):
            evaluate_plan(plan, bank, net, run(0), x.shape[0], 4)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in net.modules())


def test_zero_coefficients_are_not_evaluated():
    c = blend_coefficients([0.4, 0.6], [1e-4, 1e-4], 1.0)
    plan = make_plan("exact", c)
    assert plan.segments == (((0, 1.0),), ((1, 1.0),))  # no base forward at lambda = 1
    assert make_plan("exact", [0.0, 0.0]).is_plain


def test_lambda_zero_is_bitwise_base_in_every_mode():
    net, mods, bank, x = setup()
    c = blend_coefficients([0.2, 0.5, 0.3], [1e-4] * 3, 0.0)
    with torch.no_grad():
        base = net(x)
        for mode in ("exact", "sequential", "merged", "stochastic"):
            out = evaluate_plan(make_plan(mode, c, sigma=3.0), bank, net, run_fn(net, x), x.shape[0])
            assert torch.equal(out, base), mode


def test_merged_is_the_weight_merge():
    net, mods, bank, x = setup()
    c = blend_coefficients([0.2, -0.5, 1.3], [1e-4, 1e-4, 5e-5], 1.2, normalize=False)
    want = merged_copy(net, list(zip(mods, c)))(x)
    with torch.no_grad():
        got = evaluate_plan(make_plan("merged", c), bank, net, run_fn(net, x), x.shape[0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_static_segment_is_the_plan_without_the_base():
    c = blend_coefficients([0.4, 0.6], [1.0, 2.0], 1.0)
    assert static_segment("exact", c) == ((0, 1.0),) == static_segment("sequential", c)
    assert static_segment("merged", c) == ((0, c[0]), (1, c[1]))
    assert static_segment("exact", blend_coefficients([0.4, 0.6], [1.0, 2.0], 0.5)) is None  # evaluates the base
    assert static_segment("stochastic", c) is None  # a model drawn per step
    # three models at lambda = 1: each of the other two would carry the resident's terms negated
    assert static_segment("exact", blend_coefficients([0.2, 0.3, 0.5], [1.0] * 3, 1.0)) is None
    assert segment_minus(((1, 1.0),), ((0, 1.0),)) == ((0, -1.0), (1, 1.0))
    assert segment_minus(((0, 0.3), (1, 0.7)), ((0, 0.3), (1, 0.7))) == ()


@pytest.mark.parametrize("mode,lam", [("exact", 1.0), ("merged", 0.7), ("exact", 0.5)])
def test_plans_relative_to_a_resident_segment_equal_the_plain_plans(mode, lam):
    """A network whose weights carry a segment (merged in by hand, as a host merges it at load)
    evaluates every plan -- and the base, for SMC -- relative to it: same outputs as the untouched
    network running the plain plan."""
    net, mods, bank, x = setup(m=2)
    c = blend_coefficients([0.3, 0.7], [1.0, 0.5], lam)
    plan = make_plan(mode, c)
    resident = plan.segments[0]  # at lambda = 0.5 the base itself: the relative plans are the plans
    deltas = bank.segment_deltas(resident)  # what merge_resident hands ComfyUI
    assert sorted((i, p, g) for i, p, g, _ in deltas) == sorted((i, p, g) for i, g in resident for p in mods[i])
    loaded = merged_copy(net, [({p: d.low_rank}, g) for _, p, g, d in deltas])
    base_plan = make_plan("exact", [0.0, 0.0])
    with torch.no_grad():
        want = evaluate_plan(plan, bank, net, run_fn(net, x), x.shape[0])
        want_base = net(x)
        for per_call in (None, 1):
            got = evaluate_plan(relative_plan(plan, resident), bank, loaded, run_fn(loaded, x), x.shape[0], per_call)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            base = evaluate_plan(relative_plan(base_plan, resident), bank, loaded, run_fn(loaded, x), x.shape[0],
                                 per_call)
            torch.testing.assert_close(base, want_base, atol=1e-5, rtol=1e-5)
    assert all(not mod._forward_hooks for mod in loaded.modules())


def test_stochastic_draws_with_the_affine_probabilities():
    c = blend_coefficients([0.25, 0.75], [1e-4, 1e-4], 0.6)
    probs = affine_coefficients(c)
    counts = [0, 0, 0]
    n = 6000
    for step in range(n):
        seg = make_plan("stochastic", c, seed=7, sigma=0.001 * step + 0.01).segments[0]
        counts[0 if not seg else seg[0][0] + 1] += 1
    for k, p in zip(counts, probs):
        assert abs(k / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-9
    # the same (seed, sigma) always draws the same model: cond and uncond passes agree
    assert make_plan("stochastic", c, seed=7, sigma=1.5) == make_plan("stochastic", c, seed=7, sigma=1.5)


def test_stochastic_refuses_negative_coefficients():
    c = blend_coefficients([1.0, 1.0], [1e-4, 1e-4], 3.0, normalize=False)
    with pytest.raises(BlendInputError, match="base model"):
        make_plan("stochastic", c)
