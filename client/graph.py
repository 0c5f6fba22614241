"""Build API-format ComfyUI prompts in Python: ``g.add("KSampler", model=ckpt[0], ...)``."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["Graph", "Ref"]


class Ref:
    """A node of a :class:`Graph`; ``ref[i]`` is its i-th output."""

    def __init__(self, node_id: str):
        self.id = node_id

    def __getitem__(self, index: int) -> list:
        return [self.id, index]


class Graph:
    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}

    def add(self, class_type: str, node_id: str | None = None, _title: str | None = None, **inputs: Any) -> Ref:
        """Add a node; ``_title`` becomes its ``_meta.title`` (what the UI shows, and a name for
        ``diffusion-blend run --set TITLE.input=value``)."""
        node_id = node_id or str(len(self.nodes) + 1)
        while node_id in self.nodes:
            node_id = str(int(node_id) + 1) if node_id.isdigit() else node_id + "_"
        self.nodes[node_id] = {"class_type": class_type, "inputs": dict(inputs)}
        if _title:
            self.nodes[node_id]["_meta"] = {"title": _title}
        return Ref(node_id)

    def set(self, node_id: str, name: str, value: Any) -> None:
        self.nodes[node_id]["inputs"][name] = value

    def prompt(self) -> dict:
        return copy.deepcopy(self.nodes)


def txt2img(
    ckpt_name: str,
    *,
    seed: int = 0,
    steps: int = 4,
    cfg: float = 7.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    width: int = 64,
    height: int = 64,
    batch_size: int = 1,
    positive: str = "a photo of a cat",
    negative: str = "",
    denoise: float = 1.0,
    model_chain=None,
    save_latent: bool = False,
    prefix: str = "db",
) -> Graph:
    """Checkpoint -> (model_chain) -> KSampler -> VAEDecode -> SaveImage.

    ``model_chain(graph, model_ref) -> model_ref`` inserts nodes between the checkpoint and the sampler.
    """
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    model = ckpt[0]
    if model_chain is not None:
        model = model_chain(g, model)
    pos = g.add("CLIPTextEncode", text=positive, clip=ckpt[1])
    neg = g.add("CLIPTextEncode", text=negative, clip=ckpt[1])
    latent = g.add("EmptyLatentImage", width=width, height=height, batch_size=batch_size)
    sampler = g.add("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                    scheduler=scheduler, positive=pos[0], negative=neg[0], latent_image=latent[0], denoise=denoise)
    decoded = g.add("VAEDecode", samples=sampler[0], vae=ckpt[2])
    g.add("SaveImage", node_id="save", images=decoded[0], filename_prefix=prefix)
    if save_latent:
        g.add("SaveLatent", node_id="save_latent", samples=sampler[0], filename_prefix=prefix + "_latent")
    return g
