"""Standalone training package of Diffusion Blend (never imports ComfyUI)."""
