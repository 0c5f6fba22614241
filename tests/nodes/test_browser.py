"""A real browser (Debian's Chromium, driven by Playwright) on the real server's page: every UI
workflow loads from its file with no missing node, the front end turns it into exactly the API file,
and one is queued from the UI until its output image shows on the Save node.  Screenshots go to
``out/test-artifacts/``."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from diffusion_blend.client.workflows import WORKFLOWS

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("DB_ARTIFACTS") or ROOT / "out" / "test-artifacts")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
APP = "(window.comfyAPI?.app?.app ?? window.app)"


@pytest.fixture(scope="module")
def page(comfy_server, make_lora, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Chromium is missing: scripts/bootstrap installs Debian's chromium"
    make_lora("db_saturation.safetensors", seed=61, reward="saturation")
    make_lora("db_jpeg_compressibility.safetensors", seed=62, reward="jpeg_compressibility")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # a returning user: the first-visit template browser stays closed
    req = urllib.request.Request(f"http://127.0.0.1:{comfy_server.port}/settings/Comfy.TutorialCompleted",
                                 data=b"true", method="POST")
    urllib.request.urlopen(req, timeout=30).read()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                    env={**os.environ, "HOME": str(tmp_path_factory.mktemp("chromium-home"))})
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        requested: list[str] = []
        pg.on("request", lambda r: requested.append(r.url))
        pg.goto(f"http://127.0.0.1:{comfy_server.port}/", wait_until="domcontentloaded")
        pg.wait_for_function(f"{APP} && {APP}.graph && {APP}.graph.nodes !== undefined", timeout=120_000)
        pg.wait_for_function("!!(window.LiteGraph && LiteGraph.registered_node_types['DiffusionBlend'])", timeout=60_000)
        pg.wait_for_timeout(1000)
        assert not _visible_dialogs(pg), _visible_dialogs(pg)
        pg.errors = errors
        pg.requested = requested
        yield pg
        browser.close()


def test_the_extension_registers_through_the_frontends_current_api(page):
    """The web extension is loaded and registered, through ``window.comfyAPI``: it never asks for the
    legacy module shims (``/scripts/app.js``, ``/scripts/widgets.js``) that newer frontends warn
    about, on a frontend that offers the global (both hosts' do); no page error on the way."""
    names = page.evaluate(f"{APP}.extensions.map(e => e.name)")
    assert "diffusion_blend.score_display" in names
    assert page.evaluate("!!(window.comfyAPI?.app?.app && window.comfyAPI?.widgets?.ComfyWidgets)")
    legacy = [u for u in page.requested if u.endswith(("/scripts/app.js", "/scripts/widgets.js"))]
    assert legacy == [], legacy
    assert not page.errors, page.errors


def _load_from_file(page, path: Path) -> None:
    """What drag and drop / Open does: hand the file to the front end's file input."""
    page.evaluate(f"{APP}.graph.clear()")
    page.set_input_files("#comfy-file-input", str(path))
    n = len(json.loads(path.read_text())["nodes"])
    page.wait_for_function(f"{APP}.graph.nodes.length === {n}", timeout=30_000)


def _visible_dialogs(page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('.p-dialog, [role=dialog]')]
        .filter(d => d.offsetParent !== null || d.getClientRects().length > 0).map(d => d.innerText)""")


def _missing_dialog(page) -> str | None:
    for t in _visible_dialogs(page):
        if "missing" in t.lower() or "not found" in t.lower():
            return t
    return None


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_ui_workflow_loads_with_no_missing_node_and_serializes_to_the_api_file(page, name):
    path = ROOT / "example_workflows" / f"{name}.json"
    _load_from_file(page, path)
    unknown = page.evaluate(f"{APP}.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type)")
    assert unknown == []
    page.wait_for_timeout(300)  # a missing-node dialog opens right after loading
    assert _missing_dialog(page) is None
    assert not _visible_dialogs(page), _visible_dialogs(page)
    prompt = page.evaluate(f"async () => (await {APP}.graphToPrompt()).output")
    api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    assert prompt == api
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"))


def test_queue_from_the_ui_shows_the_output_image(page, comfy_server):
    path = ROOT / "example_workflows" / "blend_txt2img.json"
    _load_from_file(page, path)
    # a user's edits: small image, few steps (CPU)
    page.evaluate(f"""() => {{
        for (const n of {APP}.graph.nodes) for (const w of n.widgets ?? []) {{
            if (n.type === 'EmptyLatentImage' && (w.name === 'width' || w.name === 'height')) w.value = 64;
            if (n.type === 'KSampler' && w.name === 'steps') w.value = 3;
        }}
    }}""")
    save_id = page.evaluate(f"{APP}.graph.nodes.find(n => n.type === 'SaveImage').id")
    # queue it as a user does: the Run button (newer frontends also label the queue-mode menu "Run")
    run = page.get_by_test_id("queue-button").or_(page.get_by_role("button", name="Run", exact=True))
    run.first.click()
    page.wait_for_function(
        f"""() => {{ const n = {APP}.graph.getNodeById({save_id});
                     return n && n.imgs && n.imgs.length > 0 && n.imgs[0].complete && n.imgs[0].naturalWidth > 0; }}""",
        timeout=300_000)
    width = page.evaluate(f"{APP}.graph.getNodeById({save_id}).imgs[0].naturalWidth")
    assert width == 64
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "browser-queued-blend_txt2img.png"))
    scores = page.evaluate(f"""{APP}.graph.nodes.filter(n => n.type === 'DiffusionBlendScore')
        .map(n => (n.widgets ?? []).find(w => w.name === 'scores_display')?.value ?? '')""")
    assert len(scores) == 2 and all("mean" in s for s in scores), scores
    assert not [e for e in page.errors if "diffusion_blend" in e.lower()], page.errors
