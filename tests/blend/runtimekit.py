"""Shared pieces of the runtime's tests: a toy net with a bank of LoRAs, and ComfyUI's weight-function
protocol in miniature."""

import torch

from diffusion_blend.blend.lora_file import LoraFile
from diffusion_blend.blend.runtime import LowRankBank

from helpers import random_lora, toy_net


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


def _layer_bytes(net, paths=("conv_in", "block.proj", "block.to_q", "conv_out")) -> int:
    return sum(net.get_submodule(p).weight.numel() * net.get_submodule(p).weight.element_size() for p in paths)
