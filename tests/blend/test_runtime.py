"""The runtime against independent references built by merging weights into copies of the net."""

import pytest
import torch

from diffusion_blend.blend.coefficients import BlendInputError, affine_coefficients, blend_coefficients
from diffusion_blend.blend.lora_file import LoraFile, LoraFormatError, LoraModule
from diffusion_blend.blend.runtime import (LowRankBank, evaluate_plan, make_plan, relative_plan, segment_minus,
                                           static_segment)

from helpers import merged_copy, random_lora, toy_net


def setup(m=3, seed=0):
    net = toy_net(seed)
    mods = [random_lora(net, seed=10 + i) for i in range(m)]
    files = [LoraFile(path=f"l{i}.safetensors", modules=mods[i]) for i in range(m)]
    index = {p: p for p in mods[0]}
    bank = LowRankBank(files, index, net)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    return net, mods, bank, x


def run_fn(net, x):
    return lambda k: net(torch.cat([x] * k))


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


def test_merged_is_one_low_rank_product_per_layer_with_a_bounded_cache():
    """The merged term at each layer is one concatenated (sum r_i)-rank product equal to
    sum_i c_i * lowrank_i, and only the last few coefficient sets stay cached."""
    net, mods, bank, _ = setup()
    g = torch.Generator().manual_seed(5)
    c = [0.4, 0.7, -0.2]
    segment = tuple((i, c[i]) for i in range(3))
    with torch.no_grad():
        for path in mods[0]:
            module = net.get_submodule(path)
            shape = (2, module.weight.shape[1], 5, 5) if module.weight.ndim == 4 else (2, 7, module.weight.shape[1])
            x = torch.randn(shape, generator=g)
            single = bank._factors(path, module, x.device, x.dtype)
            want = sum(c[i] * single[i].apply(x, module) for i in range(3))
            merged = bank._merged_factors(segment, path, module, x.device, x.dtype)
            assert merged.down.shape[0] == sum(single[i].down.shape[0] for i in range(3))
            torch.testing.assert_close(merged.apply(x, module), want, atol=1e-5, rtol=1e-5)
        for k in range(10):
            bank._merged_factors(((0, 0.1 * k), (1, 1.0)), "conv_out", net.conv_out, torch.device("cpu"), torch.float32)
    assert len({key[0] for key in bank._merged}) <= 4


def test_a_bare_matrix_down_factor_on_a_3x3_conv_is_refused():
    net = toy_net(1)
    mods = random_lora(net, seed=3)
    mods["conv_in"] = LoraModule(down=torch.randn(2, 3), up=torch.randn(8, 2), alpha=2.0)
    with pytest.raises(LoraFormatError, match="conv_in"):
        LowRankBank([LoraFile(path="x.safetensors", modules=mods)], {p: p for p in mods}, net)


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


def test_shape_mismatch_names_file_and_key():
    net = toy_net()
    bad = LoraFile(path="other_arch.safetensors", modules={"block.to_q": LoraModule(torch.ones(2, 16), torch.ones(8, 2), None)})
    with pytest.raises(LoraFormatError, match=r"other_arch.safetensors: key 'block.to_q'.*\(8, 8\)"):
        LowRankBank([bad], {"block.to_q": "block.to_q"}, net)
    unknown = LoraFile(path="u.safetensors", modules={"lora_unet_nowhere": LoraModule(torch.ones(2, 8), torch.ones(8, 2), None)})
    with pytest.raises(LoraFormatError, match="u.safetensors: module 'lora_unet_nowhere' matches no layer"):
        LowRankBank([unknown], {}, net)


def test_gradients_flow_through_hooks():
    """The hooks are plain autograd ops: the gradient of the blend equals the gradient of the same
    formula on a merged-weight copy (the LoRA term included, not only the base's)."""
    net, mods, bank, x = setup(m=1)
    x_hook = x.clone().requires_grad_()
    out = evaluate_plan(make_plan("exact", [0.5]), bank, net, run_fn(net, x_hook), x.shape[0])
    (out**2).sum().backward()
    x_ref = x.clone().requires_grad_()
    merged = merged_copy(net, [(mods[0], 1.0)])
    ref = net(x_ref) + 0.5 * (merged(x_ref) - net(x_ref))
    (ref**2).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hook.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    base_only = x.clone().requires_grad_()
    (net(base_only) ** 2).sum().backward()
    assert (x_ref.grad - base_only.grad).abs().max() > 1e-3  # the LoRA term's gradient matters


def test_dense_and_bias_deltas_equal_merged_weights():
    """``LowRankBank.from_deltas``: low-rank, dense dW and bias deltas (alone and together on one
    layer, Linear and 3x3 Conv2d with its padding) equal a copy of the net with the weights and
    biases changed, in exact, sequential and merged modes."""
    import copy

    from diffusion_blend.blend.runtime import LayerDelta

    net = toy_net(3)
    g = torch.Generator().manual_seed(4)
    low = random_lora(net, seed=21, paths=("block.to_q",))
    deltas, refs = [], []
    for i in range(2):
        per = {}
        ref = copy.deepcopy(net)
        for path in ("conv_in", "block.to_q", "conv_out"):
            layer = net.get_submodule(path)
            dw = torch.randn(layer.weight.shape, generator=g) * 0.05
            db = torch.randn(layer.bias.shape, generator=g) * 0.05
            lr = low["block.to_q"] if (path == "block.to_q" and i == 0) else None
            per[path] = LayerDelta(low_rank=lr, weight=dw, bias=db if path != "conv_out" else None)
            with torch.no_grad():
                target = ref.get_submodule(path)
                target.weight += dw + (lr.delta_weight() if lr is not None else 0)
                if path != "conv_out":
                    target.bias += db
        deltas.append(per)
        refs.append(ref)
    bank = LowRankBank.from_deltas(deltas, net)
    x = torch.randn(2, 3, 5, 5, generator=g)
    c = [0.6, 0.7]
    with torch.no_grad():
        eps_base = net(x)
        eps_i = [r(x) for r in refs]
        want = eps_base + sum(ci * (e - eps_base) for ci, e in zip(c, eps_i))
        exact = evaluate_plan(make_plan("exact", c), bank, net, run_fn(net, x), x.shape[0])
        seq = evaluate_plan(make_plan("sequential", c), bank, net, run_fn(net, x), x.shape[0], 1)
        merged = evaluate_plan(make_plan("merged", c), bank, net, run_fn(net, x), x.shape[0])
        soup = copy.deepcopy(net)
        for ref, ci in zip(refs, c):
            for p_soup, p_ref, p_net in zip(soup.parameters(), ref.parameters(), net.parameters()):
                p_soup += ci * (p_ref - p_net)
        want_merged = soup(x)
    torch.testing.assert_close(exact, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seq, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, want_merged, atol=1e-5, rtol=1e-5)
    assert bank.dense_bytes() == sum(d.weight.numel() * 4 + (d.bias.numel() * 4 if d.bias is not None else 0)
                                     for per in deltas for d in per.values())
    with pytest.raises(LoraFormatError, match="bias"):
        LowRankBank.from_deltas([{"conv_out": LayerDelta(bias=torch.zeros(7))}], net)


class _WeightFunctions:
    """ComfyUI's ``comfy.ops`` protocol in miniature: class-wide empty ``weight_function`` /
    ``bias_function`` lists; when a layer has any, its forward runs them on per-call copies."""

    weight_function: list = []
    bias_function: list = []
    honour = True  # False: a layer that lists weight functions but ignores them
    calls = 0

    def forward(self, x):
        if self.honour and (self.weight_function or self.bias_function):
            weight = self.weight.clone()
            bias = None if self.bias is None else self.bias.clone()
            for f in self.weight_function:
                weight = f(weight)
            for f in self.bias_function:
                bias = f(bias)
            _WeightFunctions.calls += 1
            return self._conv_forward(x, weight, bias) if self.weight.ndim == 4 else torch.nn.functional.linear(x, weight, bias)
        return super().forward(x)


class _WFLinear(_WeightFunctions, torch.nn.Linear):
    pass


class _WFConv2d(_WeightFunctions, torch.nn.Conv2d):
    pass


def _with_weight_functions(net, honour=True):
    for module in net.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = _WFLinear
        elif type(module) is torch.nn.Conv2d:
            module.__class__ = _WFConv2d
        if isinstance(module, _WeightFunctions):
            module.honour = honour
    return net


@pytest.mark.parametrize("honour", [True, False])
def test_deltas_on_the_per_call_weight_equal_merged_weights(honour):
    """One model per forward on layers that take weight functions: low-rank deltas added to the
    per-call weight (``low_rank_side="weight"``), dense and bias deltas (always there) equal a
    merged copy; the weight functions are gone afterwards (class-wide lists untouched), and a layer
    that ignores them still gets its delta (on the output)."""
    from diffusion_blend.blend.runtime import LayerDelta

    net, mods, bank, x = setup()
    _with_weight_functions(net, honour)
    c = blend_coefficients([0.2, 0.5, 0.3], [1e-4, 2e-4, 5e-5], 1.7)
    eps_base = net(x)
    want = eps_base + sum(ci * (merged_copy(net, [(m, 1.0)])(x) - eps_base) for ci, m in zip(c, mods))
    for side in ("weight", "output", "auto"):
        bank.low_rank_side = side
        _WeightFunctions.calls = 0
        with torch.no_grad():
            got = evaluate_plan(make_plan("sequential", c), bank, net, run_fn(net, x), x.shape[0], 1)
            merged = evaluate_plan(make_plan("merged", c), bank, net, run_fn(net, x), x.shape[0])
            one_term = evaluate_plan(make_plan("merged", [0.0, 0.6, 0.0]), bank, net, run_fn(net, x), x.shape[0])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged, merged_copy(net, list(zip(mods, c)))(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one_term, merged_copy(net, [(mods[1], 0.6)])(x), atol=1e-5, rtol=1e-5)
        assert _WeightFunctions.calls == (4 * 5 if side == "weight" and honour else 0), side  # 4 layers x 5 models
    assert _WFLinear.weight_function == [] and _WFConv2d.bias_function == []
    assert all("weight_function" not in vars(m) and not m._forward_hooks and not m._forward_pre_hooks
               for m in net.modules())

    layer = net.get_submodule("block.to_q")
    dense = LayerDelta(weight=torch.randn(layer.weight.shape) * 0.1, bias=torch.randn(layer.bias.shape) * 0.1)
    bank = LowRankBank.from_deltas([{"block.to_q": dense}], net)
    ref = merged_copy(net, [])
    with torch.no_grad():
        ref.block.to_q.weight += dense.weight
        ref.block.to_q.bias += dense.bias
        _WeightFunctions.calls = 0
        got = evaluate_plan(make_plan("exact", [1.0]), bank, net, run_fn(net, x), x.shape[0], 1)
    torch.testing.assert_close(got, ref(x), atol=1e-5, rtol=1e-5)
    assert _WeightFunctions.calls == (1 if honour else 0)


def test_the_cheaper_side_follows_tokens_per_weight():
    """The weight side wins where a layer sees many tokens per weight value (a UNet's outer
    levels), the output side where it sees few (timestep embeddings, deep levels)."""
    from diffusion_blend.blend.runtime import low_rank_on_weight

    assert low_rank_on_weight((320, 320), torch.empty(2, 16384, 320))  # SDXL level 0 at 1024 px
    assert not low_rank_on_weight((1280, 1280), torch.empty(2, 1280))  # a timestep embedding
    assert low_rank_on_weight((128, 384, 1, 1), torch.empty(2, 384, 32, 32))  # a skip 1x1 conv
    assert not low_rank_on_weight((256, 256), torch.empty(2, 64, 256))
    # on accelerators the output side, whatever the tokens (measured at full size on an H100)
    assert not low_rank_on_weight((320, 320), torch.empty(2, 16384, 320, device="meta"))


def test_a_large_down_factor_does_not_overflow_float16_on_the_output():
    """fp16: ``down(x)`` of a LoRA whose down factor is large against the layer's weights overflows
    (inf, then NaN downstream) where the merged weight's ``(W + up @ down) x`` is finite -- what the
    full-size SDXL run showed.  The bank rescales the factors by powers of two (no bit of the
    product changes), so the output side equals the merged weight in float32 to fp16 rounding,
    and the factors' product is bit for bit the file's."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with torch.no_grad():
        net[0].weight.normal_(0.0, 0.01)
    down = torch.full((2, 64), 4.0)
    up = torch.full((32, 2), 1e-4)
    lora = LoraFile(path="big-down.safetensors", modules={"0": LoraModule(down=down, up=up, alpha=None)})
    x = torch.full((4, 64), 2000.0) + torch.randn(4, 64)
    half = net.half()
    assert torch.isinf(torch.nn.functional.linear(x.half(), down.half())).any()  # the naive product overflows
    bank = LowRankBank([lora], {"0": "0"}, half)
    out = evaluate_plan(make_plan("exact", [1.0]), bank, half, run_fn(half, x.half()), x.shape[0])
    weight = net[0].weight.float() + up @ down
    ref = torch.nn.functional.linear(x, weight, net[0].bias.float())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=0.05)
    factors = bank._factors("0", half[0], torch.device("cpu"), torch.float16)[0]
    # products of two float16 values are exact in float32: the rescaled factors' product is the file's
    assert torch.equal(factors.up.float() @ factors.down.float(), up.half().float() @ down.half().float())
    assert float(factors.down.float().norm(dim=1).max()) <= float(net[0].weight.detach().float().norm()) / 32**0.5


def _layer_bytes(net, paths=("conv_in", "block.proj", "block.to_q", "conv_out")) -> int:
    return sum(net.get_submodule(p).weight.numel() * net.get_submodule(p).weight.element_size() for p in paths)


def test_swapped_weights_equal_the_weight_side_bit_for_bit_and_are_put_back():
    """With a budget, one model per forward runs on merged copies of the weights swapped in: the
    same bits as the weight side's per-call update (low-rank, merge, dense and bias deltas), no
    weight function called, every layer's own parameter back in place afterwards, the copies held
    within the budget."""
    from diffusion_blend.blend.runtime import LayerDelta

    net, mods, bank, x = setup()
    _with_weight_functions(net)
    own = {name: (p, p.detach().clone()) for name, p in net.named_parameters()}
    c = blend_coefficients([0.2, 0.5, 0.3], [1e-4, 2e-4, 5e-5], 1.7)
    plans = [make_plan("sequential", c), make_plan("merged", c), make_plan("exact", [0.0, 1.0, 0.0])]
    layer = net.get_submodule("block.to_q")
    g = torch.Generator().manual_seed(5)
    dense = LayerDelta(weight=torch.randn(layer.weight.shape, generator=g) * 0.1,
                       bias=torch.randn(layer.bias.shape, generator=g) * 0.1)
    dense_bank = LowRankBank.from_deltas([{"block.to_q": dense}, {"conv_in": LayerDelta(low_rank=mods[0]["conv_in"])}], net)
    cases = [(bank, p) for p in plans] + [(dense_bank, make_plan("sequential", [0.7, 0.4]))]
    for b in (bank, dense_bank):
        b.low_rank_side = "weight"
    with torch.no_grad():
        on_weight = [evaluate_plan(plan, b, net, run_fn(net, x), x.shape[0], 1) for b, plan in cases]
        for b in (bank, dense_bank):
            b.swap_budget_bytes = 2**30
        _WeightFunctions.calls = 0
        swapped = [evaluate_plan(plan, b, net, run_fn(net, x), x.shape[0], 1) for b, plan in cases]
    for got, want in zip(swapped, on_weight):
        assert torch.equal(got, want)
    want = net(x) + sum(ci * (merged_copy(net, [(m, 1.0)])(x) - net(x)) for ci, m in zip(c, mods))
    torch.testing.assert_close(swapped[0], want, atol=1e-5, rtol=1e-5)
    assert _WeightFunctions.calls == 0
    assert all(p is dict(net.named_parameters())[name] and torch.equal(p, before) for name, (p, before) in own.items())
    # sequential: 3 LoRAs; merged: 1 segment; exact at e_2: LoRA 2 (already held) -- all layers each
    assert bank.swapped_bytes == 4 * _layer_bytes(net)
    assert dense_bank.swapped_bytes == (layer.weight.numel() + layer.bias.numel()) * 4 + _layer_bytes(net, ["conv_in"])


def test_the_swap_budget_decides_per_plan_never_by_history(caplog):
    """A plan is swapped in only when all its models' copies fit; else it runs in the hooks, with
    the bits it has when nothing is held (and says so once in the log); copies of other plans make
    room, least recently used first."""
    import logging

    caplog.set_level(logging.INFO, logger="diffusion_blend.blend.runtime")
    net, mods, bank, x = setup()
    one = _layer_bytes(net)
    c = blend_coefficients([0.2, 0.5, 0.3], [1e-4, 2e-4, 5e-5], 1.7)
    three = make_plan("sequential", c)  # the base and 3 LoRAs: 3 copies
    with torch.no_grad():
        hooks = evaluate_plan(three, bank, net, run_fn(net, x), x.shape[0], 1)
        bank.swap_budget_bytes = 2 * one
        assert not bank.swaps(net, three.segments) and not bank.swaps(net, three.segments)
        refusals = [r.getMessage() for r in caplog.records if "over the swap budget" in r.getMessage()]
        assert len(refusals) == 1 and "3 models" in refusals[0], refusals
        for i in range(3):  # one LoRA at a time fits, and evicts the one before
            alone = make_plan("exact", [1.0 if j == i else 0.0 for j in range(3)])
            got = evaluate_plan(alone, bank, net, run_fn(net, x), x.shape[0], 1)
            torch.testing.assert_close(got, merged_copy(net, [(mods[i], 1.0)])(x), atol=1e-5, rtol=1e-5)
            assert bank.swapped_bytes == min(i + 1, 2) * one
        again = evaluate_plan(three, bank, net, run_fn(net, x), x.shape[0], 1)
        assert torch.equal(again, hooks)
        bank.swap_budget_bytes = 3 * one
        assert bank.swapped_bytes == 0  # a new budget starts empty
        fits = evaluate_plan(three, bank, net, run_fn(net, x), x.shape[0], 1)
        assert bank.swapped_bytes == 3 * one
    torch.testing.assert_close(fits, hooks, atol=1e-5, rtol=1e-5)


def test_swapped_copies_follow_the_layers_weights():
    """A copy is remade when its layer's weight was replaced (ComfyUI patching or restoring a
    model) or changed in place, and dropped when the host says the weights changed."""
    net, mods, bank, x = setup(m=1)
    bank.swap_budget_bytes = 2**30
    plan = make_plan("exact", [1.0])
    with torch.no_grad():
        evaluate_plan(plan, bank, net, run_fn(net, x), x.shape[0], 1)
        net.block.to_q.weight = torch.nn.Parameter(net.block.to_q.weight * 1.5)
        net.conv_in.weight.mul_(0.5)
        got = evaluate_plan(plan, bank, net, run_fn(net, x), x.shape[0], 1)
    torch.testing.assert_close(got, merged_copy(net, [(mods[0], 1.0)])(x), atol=1e-5, rtol=1e-5)
    assert bank.swapped_bytes == _layer_bytes(net)
    bank.weights_changed("patched once")
    assert bank.swapped_bytes == 0


def test_swapped_weights_are_put_back_when_the_forward_raises():
    net, mods, bank, x = setup(m=1)
    bank.swap_budget_bytes = 2**30
    own = dict(net.named_parameters())

    def failing(k):
        net(x)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"), torch.no_grad():
        evaluate_plan(make_plan("exact", [1.0]), bank, net, failing, x.shape[0], 1)
    assert all(p is own[name] for name, p in net.named_parameters())


def test_no_swap_while_the_deltas_train():
    """Merged copies are made without gradients: a bank whose factors require grad keeps the
    hooks while autograd records, so the gradient reaches the factors."""
    net = toy_net(0)
    mod = random_lora(net, seed=3)
    for m in mod.values():
        m.down.requires_grad_()
    bank = LowRankBank([LoraFile(path="t.safetensors", modules=mod)], {p: p for p in mod}, net)
    bank.swap_budget_bytes = 2**30
    x = torch.randn(2, 3, 5, 5)
    out = evaluate_plan(make_plan("exact", [1.0]), bank, net, run_fn(net, x), x.shape[0], 1)
    out.square().sum().backward()
    assert mod["conv_in"].down.grad is not None and bank.swapped_bytes == 0
    with torch.no_grad():
        assert bank.swaps(net, make_plan("exact", [1.0]).segments)


def test_banks_sharing_a_pool_hold_one_budget_between_them():
    """Two blends on one network sharing a pool: the later plan drops the earlier blend's copies
    when both do not fit, never holds more than the budget, and the earlier blend remakes its
    copies (same result) when it runs again."""
    from diffusion_blend.blend.runtime import SwapPool

    net, mods, _, x = setup(m=2)
    one = _layer_bytes(net)
    banks = [LowRankBank([LoraFile(path=f"l{i}.safetensors", modules=mods[i])], {p: p for p in mods[i]}, net)
             for i in range(2)]
    pool = SwapPool(int(1.5 * one))
    for bank in banks:
        bank.swap_pool = pool
    plan = make_plan("exact", [1.0])
    with torch.no_grad():
        first = evaluate_plan(plan, banks[0], net, run_fn(net, x), x.shape[0], 1)
        assert banks[0].swapped_bytes == one == pool.held_bytes
        evaluate_plan(plan, banks[1], net, run_fn(net, x), x.shape[0], 1)
        assert (banks[0].swapped_bytes, banks[1].swapped_bytes, pool.held_bytes) == (0, one, one)
        again = evaluate_plan(plan, banks[0], net, run_fn(net, x), x.shape[0], 1)
    assert torch.equal(again, first) and pool.held_bytes == one
    del banks
    import gc

    gc.collect()
    assert pool.held_bytes == 0


class _Quantized(torch.Tensor):
    """Stands for a weight that is not a plain tensor (a quantized or offloaded type)."""


def test_layers_that_cannot_be_swapped_keep_their_hooks():
    """A layer whose weight is not a plain floating-point tensor keeps its delta in the hooks while
    the others are swapped in; the result is the merged model's either way."""
    net, mods, bank, x = setup(m=1)
    with torch.no_grad():
        want = merged_copy(net, [(mods[0], 1.0)])(x)
    net.block.to_q.weight = torch.nn.Parameter(torch.Tensor._make_subclass(_Quantized, net.block.to_q.weight.detach()))
    bank.swap_budget_bytes = 2**30
    with torch.no_grad():
        got = evaluate_plan(make_plan("exact", [1.0]), bank, net, run_fn(net, x), x.shape[0], 1)
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want.as_subclass(torch.Tensor), atol=1e-5, rtol=1e-5)
    assert bank.swapped_bytes == _layer_bytes(net, ["conv_in", "block.proj", "conv_out"])
