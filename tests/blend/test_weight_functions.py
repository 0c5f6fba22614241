"""Delivery on the weight (blend/weight_functions.py): deltas added to the per-call weight through
ComfyUI's weight-function protocol in miniature equal merged copies; the cheaper side per layer.
The contract on the host's own layers (never writing the weight handed in):
tests/nodes/test_dynamic_vram.py."""

import pytest
import torch

from diffusion_blend.blend.coefficients import blend_coefficients
from diffusion_blend.blend.runtime import (LowRankBank, evaluate_plan, make_plan)

from helpers import merged_copy
from runtimekit import (_WeightFunctions, _WFConv2d, _WFLinear, _with_weight_functions,
                        run_fn, setup)


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
