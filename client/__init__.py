"""A small client for ComfyUI's HTTP API (stdlib only)."""

from .api import ComfyClient, ComfyError

__all__ = ["ComfyClient", "ComfyError"]
