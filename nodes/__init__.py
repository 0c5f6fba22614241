"""Thin ComfyUI adapters: parse node inputs, call ``blend/``, return."""

from . import blend_nodes, smc_nodes, tool_nodes

_MODULES = (blend_nodes, tool_nodes, smc_nodes)
NODE_CLASS_MAPPINGS = {k: v for m in _MODULES for k, v in m.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: v for m in _MODULES for k, v in m.NODE_DISPLAY_NAME_MAPPINGS.items()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
