"""The plugin on the real ComfyUI host: it imports, registers, and the tiny base renders."""

import io

import numpy as np
from PIL import Image

from diffusion_blend.client.graph import Graph, txt2img

NODES = ("DiffusionBlendBasis", "DiffusionBlend", "DiffusionBlendScore", "DiffusionBlendImageGrid",
         "DiffusionBlendSMCSampler", "DiffusionBlendSMCReport")


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0


def test_plugin_imported_and_registered(comfy_server):
    log = comfy_server.log()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and "diffusion-blend" in line]
    assert not failed, failed
    assert "comfyui-diffusion-blend" in log  # listed among the loaded custom nodes
    info = comfy_server.client.object_info()
    for name in NODES:
        assert name in info, f"{name} missing from /object_info"
        assert info[name]["category"] == "diffusion_blend"
    # V3 schema (comfy_entrypoint): a dropdown is ("COMBO", {"options": [...]}), output nodes get hidden inputs
    assert info["DiffusionBlend"]["input"]["required"]["mode"] == ["COMBO", {
        "default": "exact", "multiselect": False, "options": ["exact", "sequential", "merged", "stochastic"],
        "tooltip": info["DiffusionBlend"]["input"]["required"]["mode"][1]["tooltip"]}]
    assert info["DiffusionBlendBasis"]["output"] == ["DB_BASIS"] and info["DiffusionBlendBasis"]["output_name"] == ["basis"]
    assert info["DiffusionBlendScore"]["output_node"] and "prompt" in info["DiffusionBlendScore"]["input"]["hidden"]


def test_tiny_checkpoint_renders_a_finite_nonconstant_image(comfy_server):
    result = comfy_server.client.run(txt2img("tiny-sd15.safetensors", seed=1).prompt())
    img = decode_png(comfy_server.client.view(result.images[0]))
    assert img.shape == (64, 64, 3)
    assert np.isfinite(img).all() and img.std() > 1e-3


def test_stock_lora_loader_loads_every_key_of_our_kohya_files(comfy_server, make_lora):
    make_lora("stock_check.safetensors", seed=5)
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors")
    lora = g.add("LoraLoaderModelOnly", model=ckpt[0], lora_name="stock_check.safetensors", strength_model=1.0)
    pos = g.add("CLIPTextEncode", text="x", clip=ckpt[1])
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    s = g.add("KSampler", model=lora[0], seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal",
              positive=pos[0], negative=pos[0], latent_image=lat[0], denoise=1.0)
    g.add("SaveLatent", samples=s[0], filename_prefix="stock_check")
    before = len(comfy_server.log())
    comfy_server.client.run(g.prompt())
    new_log = comfy_server.log()[before:]
    assert "lora key not loaded" not in new_log, new_log


def test_comfyui_and_diffusers_predict_the_same(comfy_checkpoint, diffusers_unet):
    """One base model for both halves: ComfyUI's UNet == diffusers' UNet for the same inputs."""
    import comfy.model_management
    import torch

    comfy.model_management.load_models_gpu([comfy_checkpoint[0]])  # off with what a clone merged into the shared weights
    model = comfy_checkpoint[0].model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 250.0])
    context = torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        ours = model.diffusion_model(x, t, context=context).float()
        theirs = diffusers_unet(x, t, encoder_hidden_states=context).sample
    assert (ours - theirs).abs().max().item() <= 1e-4
