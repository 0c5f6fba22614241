"""Shared fixtures: the tiny base, basis LoRAs, the real ComfyUI host (server and in-process).

Nothing is skipped: when the host or the fixtures are missing the fixtures fail with the command
that provisions them (``scripts/bootstrap``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import tiny_fixtures  # noqa: E402  (scripts/tiny_fixtures.py)

COMFY_DIR = Path(os.environ.get("COMFYUI_DIR") or ROOT / ".cache" / "comfyui")
FIXTURES_DIR = Path(os.environ.get("DB_FIXTURES_DIR") or ROOT / ".cache" / "fixtures")


def _require_comfy() -> Path:
    if not (COMFY_DIR / "main.py").exists():
        pytest.fail(f"no ComfyUI at {COMFY_DIR}: run scripts/bootstrap (or set COMFYUI_DIR)", pytrace=False)
    return COMFY_DIR


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    return _require_comfy()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Where the built test models are cached (``DB_FIXTURES_DIR`` or ``.cache/fixtures``)."""
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def tiny_base(comfy_dir) -> dict[str, Path]:
    """``{"checkpoint": tiny-sd15.safetensors, "diffusers": tiny-sd15-diffusers/}`` (cached)."""
    return tiny_fixtures.build_tiny_base(comfy_dir, FIXTURES_DIR)


@pytest.fixture(scope="session")
def tiny_sdxl(comfy_dir) -> Path:
    """A tiny SDXL diffusers pipeline folder (cached; ``tiny_fixtures.build_tiny_sdxl``)."""
    return tiny_fixtures.build_tiny_sdxl(comfy_dir, FIXTURES_DIR)


@pytest.fixture(scope="session")
def tiny_sd3(comfy_dir) -> Path:
    """A tiny SD3 diffusers pipeline folder (cached; ``tiny_fixtures.build_tiny_sd3``)."""
    return tiny_fixtures.build_tiny_sd3(comfy_dir, FIXTURES_DIR)


@pytest.fixture(scope="session")
def tiny_sd35(comfy_dir) -> Path:
    """A tiny SD3.5 diffusers pipeline folder (RMS q/k norms, a dual-attention block; cached)."""
    return tiny_fixtures.build_tiny_sd3(comfy_dir, FIXTURES_DIR, sd35=True)


@pytest.fixture(scope="session")
def tiny_flux(comfy_dir) -> Path:
    """A tiny Flux-dev diffusers pipeline folder (cached; ``tiny_fixtures.build_tiny_flux``)."""
    return tiny_fixtures.build_tiny_flux(comfy_dir, FIXTURES_DIR)


@pytest.fixture(scope="session")
def reward_replicas(comfy_dir, tmp_path_factory) -> dict[str, dict]:
    """Random-weight replicas of the five learned rewards' official files (``scripts/reward_replicas.py``):
    ``{reward: get_reward options}``; 32 px models, CLIP tokenizer from ComfyUI."""
    import reward_replicas as replicas

    return replicas.build_replicas(tmp_path_factory.mktemp("rewards"), comfy_dir / "comfy" / "sd1_tokenizer", 32)


@pytest.fixture(scope="session")
def diffusers_unet(tiny_base):
    return tiny_fixtures.load_diffusers_unet(tiny_base["diffusers"])


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_base) -> Path:
    """A ComfyUI model folder: ``checkpoints/tiny-sd15.safetensors`` and an empty ``loras/``."""
    d = tmp_path_factory.mktemp("models")
    (d / "checkpoints").mkdir()
    (d / "loras").mkdir()
    (d / "checkpoints" / tiny_fixtures.CKPT_NAME).symlink_to(tiny_base["checkpoint"])
    return d


@pytest.fixture(scope="session")
def tiny_controlnet(comfy_dir, models_dir) -> str:
    """A tiny ControlNet for the tiny base in the server's ``controlnet/`` folder; returns its name."""
    path = tiny_fixtures.build_tiny_controlnet(comfy_dir, FIXTURES_DIR)
    link = models_dir / "controlnet" / path.name
    link.parent.mkdir(exist_ok=True)
    if not link.exists():
        link.symlink_to(path)
    return path.name


@pytest.fixture(scope="session")
def make_lora(models_dir, diffusers_unet):
    """``make_lora(name, seed=..., **kw)`` writes a basis LoRA into the server's loras folder."""

    def make(name: str, seed: int, **kwargs) -> Path:
        path = models_dir / "loras" / name
        if not path.exists():
            tiny_fixtures.make_basis_lora(diffusers_unet, path, seed=seed, **kwargs)
        return path

    return make


@pytest.fixture(scope="session")
def comfy_server(comfy_dir, models_dir, tmp_path_factory):
    from diffusion_blend.client.host import ComfyServer

    server = ComfyServer(comfy_dir, models_dir, work_dir=tmp_path_factory.mktemp("comfy"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def comfy_inprocess(comfy_dir):
    """ComfyUI's modules imported into this process (CPU mode)."""
    tiny_fixtures.comfy_on_path(comfy_dir)
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401

    return comfy_dir


@pytest.fixture(scope="session")
def comfy_checkpoint(comfy_inprocess, tiny_base):
    """``(model_patcher, clip, vae)`` of the tiny checkpoint, loaded by ComfyUI in-process."""
    import comfy.sd

    out = comfy.sd.load_checkpoint_guess_config(str(tiny_base["checkpoint"]), output_vae=True, output_clip=True)
    return out[0], out[1], out[2]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "comfy_server" in getattr(item, "fixturenames", ()):
        server = item.funcargs.get("comfy_server")
        if server is not None:
            report.sections.append(("ComfyUI server log (last 8000 chars)", server.log()[-8000:]))
