"""Thin ComfyUI adapters: parse node inputs, call ``blend/``, return."""

from . import blend_nodes, tool_nodes

NODE_CLASS_MAPPINGS = {**blend_nodes.NODE_CLASS_MAPPINGS, **tool_nodes.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**blend_nodes.NODE_DISPLAY_NAME_MAPPINGS, **tool_nodes.NODE_DISPLAY_NAME_MAPPINGS}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
