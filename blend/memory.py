"""Memory budgets of the hosts: caches bounded by RAM, and the merged weight copies a blend may hold.

One place for both hosts (the ComfyUI nodes and the diffusers adapter): ``DIFFUSION_BLEND_SWAP_MB``
means the same in each, and every blend on a device kind shares one :class:`.runtime.SwapPool`.
"""

from __future__ import annotations

import os

import torch

from .runtime import SwapPool

__all__ = ["SWAP_ENV", "memory_budget", "swap_budget", "swap_pool"]

#: ``DIFFUSION_BLEND_SWAP_MB``: memory for merged weights swapped in (``LowRankBank.swap_budget_bytes``).
SWAP_ENV = "DIFFUSION_BLEND_SWAP_MB"


def memory_budget(env: str, fraction: float, cap_bytes: int) -> int:
    """Bytes for a cache: ``$env`` (in MB) if set, else ``fraction`` of physical RAM, at most ``cap_bytes``."""
    if os.environ.get(env):
        try:
            return max(0, int(float(os.environ[env]) * 2**20))
        except ValueError:
            raise ValueError(f"{env}={os.environ[env]!r}: expected a number of megabytes") from None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 * 2**30
    return min(int(ram * fraction), cap_bytes)


def swap_budget(device: torch.device) -> int:
    """Bytes of merged weights a blend may hold to run one model per forward at the plain model's
    cost: ``$DIFFUSION_BLEND_SWAP_MB`` if set (0: never), else on the CPU a quarter of RAM, at most
    2 GiB, and none on accelerators.  On the CPU the models of an exact blend run one per forward
    (stacking them costs more there), and the hooks' fixed work per adapted layer costs 4-13 % on
    small models (bench/families_speed.py), whose copies are small; on large models the hooks cost
    little and their copies would not fit.  Accelerators stack the models of an exact blend
    instead, and a host's memory manager does not count copies made outside it."""
    if device.type != "cpu" and not os.environ.get(SWAP_ENV):
        return 0
    return memory_budget(SWAP_ENV, 0.25, 2 * 2**30)


_SWAP_POOLS: dict[str, SwapPool] = {}


def swap_pool(device: torch.device) -> SwapPool | None:
    """The one pool of merged copies every blend on ``device``'s kind shares (None: no budget), so
    that several blends in a process hold at most one budget."""
    budget = swap_budget(device)
    if budget == 0:
        return None
    pool = _SWAP_POOLS.get(device.type)
    if pool is None or pool.budget_bytes != budget:
        pool = _SWAP_POOLS[device.type] = SwapPool(budget)
    return pool
