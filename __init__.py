"""Diffusion Blend: inference-time multi-preference alignment for diffusion models.

ComfyUI loads this folder by path (``custom_nodes/<folder>/__init__.py``) and calls
``comfy_entrypoint`` (V3 nodes, ``comfy_api``).  Installed with pip, the same folder is the package
``diffusion_blend``; there ``blend`` and ``training`` are usable without ComfyUI, so the
ComfyUI adapters are only imported when a ComfyUI host has already imported ``comfy``.
"""

import sys

__version__ = "0.1.0"

if "comfy" in sys.modules:  # inside a ComfyUI host (server or in-process tests)
    from .nodes import comfy_entrypoint

    #: the front-end extension that shows a Score node's result on the node
    WEB_DIRECTORY = "./web/js"
    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
