"""Delivery by swapped copies (blend/swap.py): merged copies equal the weight side bit for bit, are put
back, follow the layers' weights, stay within a shared budget, and leave layers they cannot serve to
the hooks."""

import pytest
import torch

from diffusion_blend.blend.coefficients import blend_coefficients
from diffusion_blend.blend.lora_file import LoraFile
from diffusion_blend.blend.runtime import (LowRankBank, evaluate_plan, make_plan)

from helpers import merged_copy, random_lora, toy_net
from runtimekit import (_WeightFunctions, _layer_bytes, _with_weight_functions,
                        run_fn, setup)


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

    caplog.set_level(logging.INFO, logger="diffusion_blend.blend.swap")
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
