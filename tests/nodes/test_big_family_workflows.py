"""The SDXL and Flux-dev workflows, end to end on the real server, as shipped (stock loaders, the
files under the names the workflows use) on tiny models.

ComfyUI recognises SDXL and Flux by full-size shapes, so this server also loads the test plugin
``tests/host_plugins/db_tiny_families``, which registers the tiny models' shapes and changes nothing
else (see its docstring); the files are built by ``scripts/tiny_comfy_files.py``.  The SD3.5 workflow
is checked against the server's node schemas only (``test_workflows.py``): ComfyUI's SD3 text-encoder
loader tells CLIP-G from CLIP-L by its 31st layer, which a tiny CLIP-G does not have.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lora_formats
import tiny_comfy_files
import tiny_families
import tiny_fixtures

from diffusion_blend.client.cli import apply_sets
from diffusion_blend.client.workflows import Models, build

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SMALL = {"blend_txt2img_sdxl": ["EmptyLatentImage.width=64", "EmptyLatentImage.height=64", "KSampler.steps=3"],
         "blend_txt2img_flux": ["EmptySD3LatentImage.width=64", "EmptySD3LatentImage.height=64", "KSampler.steps=3"]}


def _write_loras(models_dir: Path, comfy_dir: Path, fixtures_dir: Path, m: Models) -> None:
    """Two basis LoRAs per family in the formats people download: kohya keys for SDXL, diffusers
    ``transformer.*`` keys (q/k/v/proj_mlp slices of fused weights) for Flux."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_fixtures.build_tiny_sdxl(comfy_dir, fixtures_dir) / "unet")
    sdxl = tiny_families.sdxl_from_diffusers(unet).model
    transformer = FluxTransformer2DModel.from_pretrained(tiny_fixtures.build_tiny_flux(comfy_dir, fixtures_dir) / "transformer")
    flux = tiny_families.flux_from_diffusers(transformer).model
    for name, model, fmt, seed, reward in [
        (m.sdxl_lora_a, sdxl, "kohya", 71, "saturation"), (m.sdxl_lora_b, sdxl, "kohya", 72, "jpeg_compressibility"),
        (m.flux_lora_a, flux, "diffusers transformer.*", 73, "saturation"),
        (m.flux_lora_b, flux, "diffusers transformer.*", 74, "jpeg_compressibility"),
    ]:
        lora_formats.write_file(models_dir / "loras" / name, model, fmt, "lora", seed=seed, metadata={"db.reward": reward})


@pytest.fixture(scope="module")
def big_server(comfy_inprocess, fixtures_dir, tmp_path_factory):
    from diffusion_blend.client.host import ComfyServer

    comfy_dir = Path(comfy_inprocess)
    sdxl = tiny_comfy_files.build_sdxl_checkpoint(comfy_dir, fixtures_dir)
    flux = tiny_comfy_files.build_flux_files(comfy_dir, fixtures_dir)
    m = Models()
    models = tmp_path_factory.mktemp("big-family-models")
    for sub in ComfyServer.MODEL_FOLDERS:
        (models / sub).mkdir()
    links = {("checkpoints", m.sdxl_ckpt): sdxl["checkpoint"], ("diffusion_models", m.flux_unet): flux["diffusion_model"],
             ("text_encoders", m.flux_clip_l): flux["clip_l"], ("text_encoders", m.flux_t5): flux["t5"],
             ("vae", m.flux_vae): flux["vae"]}
    for (folder, name), target in links.items():
        (models / folder / name).symlink_to(target)
    _write_loras(models, comfy_dir, fixtures_dir, m)
    server = ComfyServer(comfy_dir, models, work_dir=tmp_path_factory.mktemp("big-family-comfy"),
                         extra_custom_nodes=[ROOT / "tests" / "host_plugins"])
    server.start()
    yield server
    server.stop()


def _cli(*args, timeout=600):
    return subprocess.run([str(VENV_BIN / "diffusion-blend"), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name,fmt", [("blend_txt2img_sdxl", "api"), ("blend_txt2img_flux", "api"),
                                      ("blend_txt2img_flux", "ui")])
def test_big_family_workflow_runs_through_the_cli(big_server, tmp_path, name, fmt):
    """The committed workflow file, unchanged but for size and steps, runs through ``diffusion-blend
    run``: the stock loaders detect the tiny models, the blend samples, both rewards are scored."""
    small = SMALL[name] + (["KSampler.seed=7"] if fmt == "ui" else [])
    res = _cli("run", str(ROOT / "workflows" / fmt / f"{name}.json"), "--server", f"http://127.0.0.1:{big_server.port}",
               "--out", str(tmp_path / "out"), *sum((["--set", s] for s in small), []))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + big_server.log()[-3000:]
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert saved and "3/3" in res.stdout
    img = np.asarray(Image.open(saved[0]).convert("RGB"))
    assert img.shape[:2] == (64, 64) and img.std() > 0
    assert "saturation: mean" in res.stdout and "jpeg_compressibility: mean" in res.stdout
    log = big_server.log()
    assert {"blend_txt2img_sdxl": "model_type EPS", "blend_txt2img_flux": "model_type FLUX"}[name] in log


@pytest.mark.parametrize("name", list(SMALL))
def test_big_family_blend_at_lambda_zero_is_the_base(big_server, name):
    """Through the same workflow, kl_scale 0 gives the image of the base model without the blend
    node (the DiffusionBlend node bypassed), pixel for pixel; kl_scale 1 changes it."""
    client = big_server.client
    prompt = apply_sets(build(name), SMALL[name] + ["DiffusionBlend.kl_scale=0"])
    blend_id = next(i for i, n in prompt.items() if n["class_type"] == "DiffusionBlend")
    bypassed = {i: n for i, n in apply_sets(build(name), SMALL[name]).items()}
    for node in bypassed.values():  # the sampler takes the loader's model directly
        for key, value in node["inputs"].items():
            if value == [blend_id, 0]:
                node["inputs"][key] = prompt[blend_id]["inputs"]["model"]
    lam0 = client.view(client.run(prompt).images[0])
    base = client.view(client.run(bypassed).images[0])
    blended = client.view(client.run(apply_sets(build(name), SMALL[name])).images[0])
    decode = lambda png: np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)  # noqa: E731
    assert np.array_equal(decode(lam0), decode(base))
    assert np.abs(decode(blended) - decode(base)).max() > 0
