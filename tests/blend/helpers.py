"""A toy network with the layer kinds the blend hooks (Linear, 1x1 and 3x3 Conv2d)."""

import copy

import torch
from torch import nn

from diffusion_blend.blend.lora_file import LoraModule


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Module()
        self.block.proj = nn.Conv2d(8, 8, 1)
        self.block.to_q = nn.Linear(8, 8)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1, stride=1)

    def forward(self, x):
        h = torch.relu(self.conv_in(x))
        h = self.block.proj(h)
        b, c, hh, ww = h.shape
        t = self.block.to_q(h.flatten(2).transpose(1, 2))
        h = t.transpose(1, 2).reshape(b, c, hh, ww)
        return self.conv_out(torch.tanh(h))


def toy_net(seed=0):
    torch.manual_seed(seed)
    return ToyNet().eval()


def random_lora(net, seed, rank=2, alpha=1.0, paths=("conv_in", "block.proj", "block.to_q", "conv_out")):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for p in paths:
        w = net.get_submodule(p).weight
        down = torch.randn((rank, *w.shape[1:]), generator=g) * 0.3
        up_shape = (w.shape[0], rank) + ((1, 1) if w.ndim == 4 else ())
        up = torch.randn(up_shape, generator=g) * 0.3
        modules[p] = LoraModule(down=down, up=up, alpha=alpha)
    return modules


def merged_copy(net, loras_and_gains):
    """An independent reference: a deep copy of ``net`` with ``W + sum g * scale * up @ down``."""
    net = copy.deepcopy(net)
    with torch.no_grad():
        for modules, gain in loras_and_gains:
            for p, m in modules.items():
                net.get_submodule(p).weight += gain * m.delta_weight()
    return net
