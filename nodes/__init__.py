"""Thin ComfyUI adapters: parse node inputs, call ``blend/``, return.

The nodes use ComfyUI's V3 schema (``comfy_api``): the host asks the package's
``comfy_entrypoint`` for a :class:`DiffusionBlendExtension` and reads its node list."""

from . import blend_nodes, smc_nodes, tool_nodes
from .schema import ComfyExtension, io

NODES: list[type[io.ComfyNode]] = [*blend_nodes.NODES, *tool_nodes.NODES, *smc_nodes.NODES]


class DiffusionBlendExtension(ComfyExtension):
    """The six Diffusion Blend nodes."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> DiffusionBlendExtension:
    return DiffusionBlendExtension()


__all__ = ["NODES", "DiffusionBlendExtension", "comfy_entrypoint"]
