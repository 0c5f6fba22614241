"""The weight-function contract under ComfyUI's dynamic VRAM, on the CPU and on any host.

Since v0.16, NVIDIA GPUs run ComfyUI in "dynamic VRAM" mode: ``comfy/ops.py`` may hand a layer's
weight functions its *cached device copy* of the weight itself, with no per-call copy, and keeps
using that cache while it is resident.  ComfyUI's contract for a weight function is "return the
weight to use": the blend's functions must never write the tensor they are handed, and merged
copies swapped into ``module.weight`` are ignored while the cache is resident, so none are made.

No GPU here: the host's own ``comfy.ops`` layers run with ``comfy.model_management.cast_to`` told
never to copy, so their weight functions receive the stored parameter -- the resident-cache case.
"""

from __future__ import annotations

from unittest import mock

import torch

from diffusion_blend.blend.runtime import LayerDelta, LowRankBank, evaluate_plan, make_plan
from diffusion_blend.blend.lora_file import LoraModule


def _ops_net(seed: int):
    """A small net of the host's ``comfy.ops`` layers (a 3x3 conv, a linear), random weights."""
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    net = torch.nn.Sequential(ops.Conv2d(3, 6, 3, padding=1), torch.nn.Flatten(), ops.Linear(6 * 4 * 4, 5))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def _deltas(net, seed: int) -> list[dict[str, LayerDelta]]:
    """Two bases: basis 1 dense dW + bias on both layers (a LoHa/LoKr/diff after decoding), basis 2
    a low-rank term on the linear layer and a dense one on the conv."""
    g = torch.Generator().manual_seed(seed)
    conv, linear = net[0], net[2]

    def rand(shape, scale=0.1):
        return torch.randn(shape, generator=g) * scale

    first = {"0": LayerDelta(weight=rand(conv.weight.shape), bias=rand(conv.bias.shape)),
             "2": LayerDelta(weight=rand(linear.weight.shape), bias=rand(linear.bias.shape))}
    second = {"0": LayerDelta(weight=rand(conv.weight.shape)),
              "2": LayerDelta(low_rank=LoraModule(down=rand((2, linear.weight.shape[1])),
                                                  up=rand((linear.weight.shape[0], 2)), alpha=None))}
    return [first, second]


def _no_copy_cast_to(real):
    """``cast_to`` as dynamic VRAM's resident path behaves: the weight itself, never a copy."""

    def cast_to(weight, *args, **kwargs):
        kwargs["copy"] = False
        return real(weight, *args, **kwargs)

    return cast_to


def test_weight_functions_never_write_the_weight_they_are_handed(comfy_inprocess):
    """Sequential mode (one model per forward), deltas on the weight side: with the host handing its
    weight functions the stored weights, every parameter stays bit-identical, 20 repeated calls give
    the same output, and that output is the one made from per-call copies (the host's usual path).
    Fails when the delta is added in place again (the weights drift by dW on every call)."""
    import comfy.model_management

    net = _ops_net(0)
    bank = LowRankBank.from_deltas(_deltas(net, 1), net)
    bank.low_rank_side = "weight"
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    plan = make_plan("sequential", [0.7, -0.4])
    before = {name: p.detach().clone() for name, p in net.named_parameters()}

    def blend():
        with torch.no_grad():
            return evaluate_plan(plan, bank, net, lambda k: net(x.repeat(k, 1, 1, 1)), x.shape[0], 1)

    with_copies = blend()
    handed = []
    real = comfy.model_management.cast_to
    with mock.patch.object(comfy.model_management, "cast_to", side_effect=_no_copy_cast_to(real)) as spy:
        outputs = []
        for _ in range(20):
            outputs.append(blend())
            handed.extend(spy.call_args_list)
            spy.reset_mock()
    # the stored tensors themselves went to the weight functions (the case under test was exercised)
    stored = {p.data_ptr() for p in net.parameters()}
    assert any(call.args[0].data_ptr() in stored for call in handed)
    for name, p in net.named_parameters():
        assert torch.equal(p, before[name]), f"{name} was written by a weight function"
    for out in outputs:
        assert torch.equal(out, outputs[0])
    torch.testing.assert_close(outputs[0], with_copies, rtol=0, atol=1e-6)
    # and it is the blend: base + sum_i c_i (eps_i - base) from independently merged copies
    with torch.no_grad():
        eps_base = net(x)
        want = eps_base.clone()
        for c, per_path in zip((0.7, -0.4), _deltas(net, 1)):
            merged = _ops_net(0)
            for path, delta in per_path.items():
                layer = merged.get_submodule(path)
                dw = delta.weight if delta.weight is not None else delta.low_rank.up @ delta.low_rank.down
                layer.weight += dw
                if delta.bias is not None:
                    layer.bias += delta.bias
            want += c * (merged(x) - eps_base)
    torch.testing.assert_close(outputs[0], want, rtol=1e-5, atol=1e-5)


def test_no_merged_copies_for_layers_dynamic_vram_streams(comfy_inprocess):
    """A layer ComfyUI's dynamic VRAM streams (it carries ``_v``) reads its cached copy, not
    ``module.weight``: with a swap budget the blend makes no merged copy of it and puts the delta
    in the weight functions instead, and the result is still the blend."""
    import comfy.model_management

    net = _ops_net(3)
    bank = LowRankBank.from_deltas(_deltas(net, 4), net)
    bank.low_rank_side = "weight"
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    plan = make_plan("sequential", [0.5, 0.5])

    def blend():
        with torch.no_grad():
            return evaluate_plan(plan, bank, net, lambda k: net(x.repeat(k, 1, 1, 1)), x.shape[0], 1)

    want = blend()  # no budget: the weight functions
    bank.swap_budget_bytes = 2**30
    swapped = blend()
    assert bank.swapped_bytes > 0  # a plain layer is swapped (the policy this test narrows)
    torch.testing.assert_close(swapped, want, rtol=0, atol=1e-6)
    bank.clear_swapped()
    for layer in (net[0], net[2]):
        layer._v = object()  # what ModelPatcherDynamic attaches to the layers it streams
    real = comfy.model_management.cast_to
    with mock.patch.object(comfy.model_management, "cast_to", side_effect=_no_copy_cast_to(real)):
        streamed = blend()
    assert bank.swapped_bytes == 0
    torch.testing.assert_close(streamed, want, rtol=0, atol=1e-6)


def test_free_memory_is_the_patchers_where_the_host_offers_it(comfy_inprocess):
    """How many models stack in one forward is sized by the loaded patcher's ``get_free_memory``
    (v0.16+: it counts what dynamic VRAM can reclaim), else by ComfyUI's global figure."""
    import types

    import comfy.model_management

    from diffusion_blend.nodes.comfy_wrapper import free_memory

    base_model = object()
    device = torch.device("cpu")
    with_own = types.SimpleNamespace(model=base_model, get_free_memory=lambda d: 123 * 2**20)
    loaded = types.SimpleNamespace(model=with_own)
    other = types.SimpleNamespace(model=types.SimpleNamespace(model=object(), get_free_memory=lambda d: 7))
    with mock.patch.object(comfy.model_management, "current_loaded_models", [other, loaded]):
        assert free_memory(base_model, device) == 123 * 2**20
    with mock.patch.object(comfy.model_management, "current_loaded_models", [other]), \
            mock.patch.object(comfy.model_management, "get_free_memory", return_value=456):
        assert free_memory(base_model, device) == 456
