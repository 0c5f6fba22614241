"""Delivery on the output (blend/output_hooks.py): low-rank, dense and bias deltas added to the layers'
output rows equal merged copies of the net; shapes checked, gradients flow, float16 stays finite."""

import pytest
import torch

from diffusion_blend.blend.lora_file import LoraFile, LoraFormatError, LoraModule
from diffusion_blend.blend.runtime import (LowRankBank, evaluate_plan, make_plan)

from helpers import merged_copy, random_lora, toy_net
from runtimekit import (run_fn, setup)


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
