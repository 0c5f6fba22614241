"""workflows/: generated from one definition, UI and API formats agree, every file runs on the real
server through the ``diffusion-blend run`` CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_blend.client.cli import apply_sets, UsageError
from diffusion_blend.client.workflows import BIG_FAMILY_WORKFLOWS, WORKFLOWS, api_from_ui, build, to_ui

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SMALL = ["EmptyLatentImage.width=64", "EmptyLatentImage.height=64", "KSampler.steps=3"]
#: the same for the SamplerCustom graphs (smc_blend); only applied to workflows that have these nodes
CUSTOM_SMALL = ["BasicScheduler.steps=3", "DiffusionBlendSMCSampler.score_every=2"]


@pytest.fixture(scope="module")
def server(comfy_server, make_lora):
    make_lora("db_saturation.safetensors", seed=61, reward="saturation")
    make_lora("db_jpeg_compressibility.safetensors", seed=62, reward="jpeg_compressibility")
    return comfy_server


@pytest.fixture(scope="module")
def info(server):
    return server.client.object_info()


#: the committed UI files are generated on the default host; another host (COMFYUI_DIR) may declare
#: more outputs on stock nodes (v0.33.0: SaveImage passes its IMAGE on), which the front end adds on load
ON_DEFAULT_HOST = not os.environ.get("COMFYUI_DIR")


def _linked_outputs_only(ui: dict) -> dict:
    """``ui`` without the output slots nothing links to (what differs between hosts' node schemas)."""
    out = json.loads(json.dumps(ui))
    for node in out["nodes"]:
        node["outputs"] = [o for o in node.get("outputs", []) if o.get("links")]
    return out


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_committed_files_are_the_generated_ones(name, info):
    api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    ui = json.loads((ROOT / "workflows" / "ui" / f"{name}.json").read_text())
    example = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
    hint = "regenerate with: diffusion-blend workflows --server URL"
    assert api == build(name), hint
    generated = to_ui(build(name), info, name=name, description=(WORKFLOWS[name].__doc__ or "").strip())
    if ON_DEFAULT_HOST:
        assert ui == generated, hint
    else:
        assert _linked_outputs_only(ui) == _linked_outputs_only(generated), hint
    assert example == ui
    # and the UI file, read back the way ComfyUI's front end serializes it, is the API file
    assert api_from_ui(ui, info) == api


def test_no_stray_workflow_files():
    names = {p.stem for p in (ROOT / "workflows" / "api").glob("*.json")}
    assert names == set(WORKFLOWS) == {p.stem for p in (ROOT / "workflows" / "ui").glob("*.json")}
    assert {p.stem for p in (ROOT / "example_workflows").glob("*.json")} == set(WORKFLOWS)


def _cli(*args, timeout=600):
    return subprocess.run([str(VENV_BIN / "diffusion-blend"), *args], capture_output=True, text=True, timeout=timeout)


#: the SDXL and Flux workflows run end to end on tiny models in test_big_family_workflows.py (a server
#: with the tiny-shapes plugin); every big-family graph, SD3.5's included, is checked against the
#: server's node schemas below, and the blend on those families in tests/nodes/test_families.py
RUNNABLE = [n for n in WORKFLOWS if n not in BIG_FAMILY_WORKFLOWS]
FILE_LISTS = {"ckpt_name", "unet_name", "clip_name1", "clip_name2", "clip_name3", "vae_name", "lora_name", "image"}


@pytest.mark.parametrize("name", BIG_FAMILY_WORKFLOWS)
def test_big_family_workflows_fit_the_servers_node_schemas(name, info):
    """Every node exists on the real server, every required input is given, no input is unknown,
    links point at outputs of the right type, and every choice outside the model-file lists is one
    the server offers (sampler, scheduler, CLIP type, weight dtype, ...)."""
    prompt = build(name)
    for node_id, node in prompt.items():
        schema = info[node["class_type"]]["input"]
        declared = {**schema.get("required", {}), **schema.get("optional", {})}
        assert set(schema.get("required", {})) <= set(node["inputs"]), (node["class_type"], node_id)
        for key, value in node["inputs"].items():
            assert key in declared, (node["class_type"], key)
            spec = declared[key][0]
            if isinstance(value, list):  # a link [node id, output index]
                source = info[prompt[value[0]]["class_type"]]["output"][value[1]]
                assert source == spec, (node["class_type"], key, source, spec)
            elif isinstance(spec, list) and key not in FILE_LISTS:
                assert value in spec, (node["class_type"], key, value)
            elif spec == "COMBO" and key not in FILE_LISTS:
                assert value in declared[key][1]["options"], (node["class_type"], key, value)
    types = {n["class_type"] for n in prompt.values()}
    want = {"blend_txt2img_sdxl": {"CheckpointLoaderSimple", "CLIPTextEncodeSDXL"},
            "blend_txt2img_flux": {"UNETLoader", "DualCLIPLoader", "FluxGuidance", "EmptySD3LatentImage"},
            "blend_txt2img_sd35": {"CheckpointLoaderSimple", "TripleCLIPLoader", "ModelSamplingSD3",
                                   "EmptySD3LatentImage"}}[name]
    assert want <= types and {"DiffusionBlend", "DiffusionBlendBasis"} <= types


@pytest.mark.parametrize("name,fmt", [(n, "api") for n in RUNNABLE] + [("blend_txt2img", "ui")])
def test_every_workflow_runs_through_the_cli(name, fmt, server, tmp_path):
    upload = tmp_path / "db_example.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(upload)
    small = [s for s in SMALL + CUSTOM_SMALL if any(n["class_type"] == s.split(".")[0] for n in build(name).values())]
    if fmt == "ui":
        small.append("KSampler.seed=7")  # not the API run's prompt, which the server would answer from its cache
    res = _cli("run", str(ROOT / "workflows" / fmt / f"{name}.json"), "--server", f"http://127.0.0.1:{server.port}",
               "--upload", str(upload), "--out", str(tmp_path / "out"), *sum((["--set", s] for s in small), []))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert saved, res.stdout
    assert "3/3" in res.stdout  # sampler progress came over the websocket
    img = np.asarray(Image.open(saved[0]).convert("RGB"))
    cells = {"kl_sweep": 5, "weight_sweep": 5, "lora_stack_vs_blend": 2, "smc_blend": 4}.get(name, 1)
    assert img.shape[1] >= 64 * cells and img.std() > 0
    if name in ("blend_txt2img", "weight_sweep", "smc_blend"):
        assert "saturation: mean" in res.stdout and "jpeg_compressibility: mean" in res.stdout
    if name == "smc_blend":  # the report: 8 particles, 3 steps + the final reweighting, ESS per step
        assert "8 particles" in res.stdout and res.stdout.count("ESS/N") == 1, res.stdout[-3000:]
        assert "target p_base exp(" in res.stdout and "saturation" in res.stdout


def test_score_node_matches_the_registry_on_the_saved_image(server, tmp_path):
    from diffusion_blend.rewards import get_reward

    prompt = apply_sets(build("blend_txt2img"), SMALL)
    result = server.client.run(prompt)
    png = server.client.view(result.images[0])
    img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0)
    outputs = result.history["outputs"]
    for reward in ("saturation", "jpeg_compressibility"):
        node = next(i for i, n in prompt.items() if n["class_type"] == "DiffusionBlendScore"
                    and n["inputs"]["reward"] == reward)
        score = outputs[node]["scores"][0]
        want = float(get_reward(reward)(img.permute(2, 0, 1)[None])[0])
        # the node scores the float image; SaveImage truncates to 8 bits (the registry rounds), so a pixel
        # may differ by one level: 2/255 for a pixel mean, 1 % of the file size for JPEG (a few bytes)
        tolerance = 2 / 255 if reward == "saturation" else 0.01 * abs(want)
        assert abs(score - want) < tolerance, (reward, score, want)


def test_cli_reports_bad_input_clearly(server, tmp_path):
    url = f"http://127.0.0.1:{server.port}"
    wf = str(ROOT / "workflows" / "api" / "blend_txt2img.json")
    res = _cli("run", wf, "--server", url, "--set", "Nope.weight=1")
    assert res.returncode == 2 and "no node with id, title or type 'Nope'" in res.stderr
    res = _cli("run", wf, "--server", url, "--set", "DiffusionBlend.kl_scale=-1", *sum((["--set", s] for s in SMALL), []))
    assert res.returncode == 1 and "kl_scale" in res.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = _cli("run", str(bad), "--server", url)
    assert res.returncode == 2 and "bad.json" in res.stderr
    assert server.client.system_stats()  # still serving


def test_apply_sets_by_id_title_and_type():
    prompt = build("kl_sweep")
    apply_sets(prompt, ["KSampler.steps=2", "Diffusion Blend λ=0.5.mode=sequential", "1.ckpt_name=x.safetensors"])
    assert all(n["inputs"]["steps"] == 2 for n in prompt.values() if n["class_type"] == "KSampler")
    modes = {n["_meta"]["title"]: n["inputs"]["mode"] for n in prompt.values() if n["class_type"] == "DiffusionBlend"}
    assert modes.pop("Diffusion Blend λ=0.5") == "sequential" and set(modes.values()) == {"exact"}
    assert prompt["1"]["inputs"]["ckpt_name"] == "x.safetensors"
    with pytest.raises(UsageError, match="has no input 'stepz'"):
        apply_sets(prompt, ["KSampler.stepz=2"])
    with pytest.raises(UsageError, match="is a link"):
        apply_sets(prompt, ["KSampler.model=3"])


def test_sweep_cli_writes_grid_tradeoff_and_json(server, tmp_path):
    out = tmp_path / "sweep"
    res = _cli("sweep", "--server", f"http://127.0.0.1:{server.port}", "--ckpt", "tiny-sd15.safetensors",
               "--lora", "db_saturation.safetensors", "--lora", "db_jpeg_compressibility.safetensors",
               "--weights", "0,0.5,1", "--kl-scales", "0.5,1", "--images", "2", "--steps", "2", "--size", "64",
               "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["spec"]["rewards"] == ["saturation", "jpeg_compressibility"]  # read from the LoRA names
    assert [(c["kl_scale"], c["weights"][0]) for c in summary["cells"]] == [
        (lam, w) for lam in (0.5, 1.0) for w in (0.0, 0.5, 1.0)]
    assert len(list((out / "images").glob("*.png"))) == 12
    grid = Image.open(out / "grid.png")
    assert grid.width > 3 * 64 and grid.height > 2 * 64
    assert "Spearman" in res.stdout


def test_sweep_cli_with_smc_writes_the_same_outputs_with_particles_and_ess(server, tmp_path):
    out = tmp_path / "sweep_smc"
    res = _cli("sweep", "--server", f"http://127.0.0.1:{server.port}", "--ckpt", "tiny-sd15.safetensors",
               "--lora", "db_saturation.safetensors", "--lora", "db_jpeg_compressibility.safetensors",
               "--weights", "0.25,0.75", "--kl-scales", "1", "--smc", "4", "--smc-score-every", "1", "--steps", "3",
               "--size", "64", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["spec"]["smc_particles"] == 4
    for cell in summary["cells"]:
        assert len(cell["rewards"]["saturation"]) == 4  # every particle is an image of the cell
        assert cell["smc"]["particles"] == 4 and len(cell["smc"]["ess_fraction"]) == 3 + 1
        assert all(0.25 - 1e-9 <= e <= 1 + 1e-9 for e in cell["smc"]["ess_fraction"])
        assert cell["smc"]["resampled_at"][-1] == 3
    assert len(list((out / "images").glob("*.png"))) == 8
    assert (out / "grid.png").exists() and (out / "tradeoff.png").exists()
    bad = _cli("sweep", "--server", f"http://127.0.0.1:{server.port}", "--ckpt", "tiny-sd15.safetensors",
               "--lora", "db_saturation.safetensors", "--lora", "db_jpeg_compressibility.safetensors", "--smc", "1",
               "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--smc 1: expected a number of particles" in bad.stdout + bad.stderr, bad.stderr


def test_sweep_cli_scores_with_the_official_reward_files(server, tmp_path, reward_replicas):
    """``--reward-path`` takes the official file (or model folder); ``--reward-option`` the companions."""
    from diffusion_blend.rewards import get_reward

    aesthetic = Path(reward_replicas["aesthetic"]["path"])
    out = tmp_path / "sweep_official"
    res = _cli("sweep", "--server", f"http://127.0.0.1:{server.port}", "--ckpt", "tiny-sd15.safetensors",
               "--lora", "db_saturation.safetensors", "--lora", "db_jpeg_compressibility.safetensors",
               "--reward", "aesthetic", "--reward", "imagereward",
               "--reward-path", f"aesthetic={aesthetic}",
               "--reward-option", f"aesthetic.clip={aesthetic.parent / 'clip-vit-large-patch14'}",
               "--reward-path", f"imagereward={Path(reward_replicas['imagereward']['path']).parent}",
               "--weights", "0,1", "--kl-scales", "1", "--images", "1", "--steps", "2", "--size", "64",
               "--prompt", "a photo of a cat", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "sweep.json").read_text())
    rewards = {r: get_reward(r, **reward_replicas[r]) for r in ("aesthetic", "imagereward")}
    for cell in summary["cells"]:
        png = out / "images" / f"kl1_w{cell['weights'][0]:g}_0.png"
        img = torch.from_numpy(np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255.0)
        for r, fn in rewards.items():
            assert cell["rewards"][r][0] == pytest.approx(float(fn(img.permute(2, 0, 1)[None], ["a photo of a cat"])[0]),
                                                          rel=1e-5, abs=1e-6)
    bad = _cli("sweep", "--server", f"http://127.0.0.1:{server.port}", "--ckpt", "tiny-sd15.safetensors",
               "--lora", "db_saturation.safetensors", "--lora", "db_jpeg_compressibility.safetensors",
               "--reward", "aesthetic", "--reward", "imagereward", "--reward-option", "aesthetic.clipp=x",
               "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "aesthetic has no option 'clipp'; its options: clip, dtype" in bad.stderr, bad.stderr
    bad = _cli("sweep", "--server", f"http://127.0.0.1:{server.port}", "--ckpt", "tiny-sd15.safetensors",
               "--lora", "db_saturation.safetensors", "--lora", "db_jpeg_compressibility.safetensors",
               "--reward", "aesthetic", "--reward", "imagereward", "--reward-path", f"aesthetic={tmp_path}",
               "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "none of sac+logos+ava1-l14-linearMSE.pth" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad" / "sweep.json").exists()


def test_two_servers_share_a_sweep_and_runs_and_one_killed_midway_changes_nothing(server, comfy_dir, models_dir,
                                                                                 tmp_path):
    """``--server`` twice: ``run`` spreads its workflows over both servers; a sweep's cells are spread
    too, and when the second server is killed while it renders a cell (after finishing one), that cell
    is rendered again by the first: sweep.json, grid.png and every image equal a one-server sweep's."""
    import threading
    import time

    from diffusion_blend.client.host import ComfyServer

    second = ComfyServer(comfy_dir, models_dir, work_dir=tmp_path / "second").start()
    urls = [f"http://127.0.0.1:{server.port}", f"http://127.0.0.1:{second.port}"]
    try:
        small = sum((["--set", s] for s in SMALL + ["KSampler.seed=11"]), [])
        flows = [str(ROOT / "workflows" / "api" / f"{n}.json") for n in ("blend_txt2img", "lora_stack_vs_blend")]
        res = _cli("run", *flows, "--server", urls[0], "--server", urls[1], "--out", str(tmp_path / "runs"), *small)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert {f"done on {u}" in res.stdout for u in urls} == {True}  # each server took one
        for n in ("blend_txt2img", "lora_stack_vs_blend"):
            assert list((tmp_path / "runs" / n).glob("*.png")), n

        sweep = ["--ckpt", "tiny-sd15.safetensors", "--lora", "db_saturation.safetensors",
                 "--lora", "db_jpeg_compressibility.safetensors", "--weights", "0,0.5,1",
                 "--kl-scales", "0.5,1", "--images", "2", "--steps", "3", "--size", "64"]
        killed = threading.Event()

        def kill_when_busy():  # the second server dies while rendering a cell, having finished one
            while not killed.is_set() and second.proc.poll() is None:
                try:
                    done = len(second.client.get("/history"))
                    running = second.client.queue()["queue_running"]
                except OSError:
                    return
                if done >= 1 and running:
                    second.proc.kill()
                    killed.set()
                    return
                time.sleep(0.005)

        done_before = len(second.client.get("/history"))
        assert done_before == 1  # the run above
        second.client._request("/history", {"clear": True}, raw=True)
        killer = threading.Thread(target=kill_when_busy, daemon=True)
        killer.start()
        two = _cli("sweep", "--server", urls[0], "--server", urls[1], *sweep, "--out", str(tmp_path / "two"))
        killer.join(timeout=5)
        assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
        assert killed.is_set() and f"{urls[1]} is down" in two.stdout, two.stdout[-3000:]
        one = _cli("sweep", "--server", urls[0], *sweep, "--out", str(tmp_path / "one"))
        assert one.returncode == 0, one.stderr[-3000:]
    finally:
        second.stop()
    a, b = tmp_path / "one", tmp_path / "two"
    assert json.loads((a / "sweep.json").read_text()) == json.loads((b / "sweep.json").read_text())
    assert (a / "grid.png").read_bytes() == (b / "grid.png").read_bytes()
    images = sorted(p.name for p in (a / "images").glob("*.png"))
    assert len(images) == 12 and images == sorted(p.name for p in (b / "images").glob("*.png"))
    assert all((a / "images" / n).read_bytes() == (b / "images" / n).read_bytes() for n in images)
