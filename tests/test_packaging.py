"""The package as a user installs it: a fresh copy of the repository built into a wheel and installed
non-editable (``pip install .`` does the same), then used from outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: what the plugin and the CLIs read at run time, beside the code
RUNTIME_FILES = [
    "web/js/diffusion_blend.js",  # WEB_DIRECTORY
    "workflows/api/blend_txt2img.json",
    "workflows/ui/blend_txt2img.json",
    "example_workflows/blend_txt2img.json",  # ComfyUI's template browser reads this folder
    "configs/sd15_aesthetic_am.yaml",
    "configs/prompts/animals.txt",
    "icon.png",
]


def _tracked_copy(dest: Path) -> Path:
    """The files a fresh clone has (tracked, plus new files git does not ignore), copied to ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """``(wheel, target)``: the wheel built from a fresh copy, and a folder it is installed into."""
    work = tmp_path_factory.mktemp("packaging")
    src = _tracked_copy(work / "src")
    dist = work / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, capture_output=True)
    (wheel,) = dist.glob("*.whl")
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    return wheel, target


def test_the_wheel_ships_what_the_plugin_and_clis_read_at_run_time(installed):
    wheel, target = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in RUNTIME_FILES:
        assert f"diffusion_blend/{rel}" in names, f"{rel} is missing from the wheel"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "LICENSE is not in the wheel's metadata"
    assert not any(n.startswith(("diffusion_blend/tests/", "diffusion_blend/bench/", "diffusion_blend/.cache/"))
                   for n in names)
    # every workflow and config of the repository, not only the ones named above
    for folder, pattern in (("workflows", "*/*.json"), ("example_workflows", "*.json"), ("configs", "*.yaml")):
        for path in (ROOT / folder).glob(pattern):
            assert f"diffusion_blend/{path.relative_to(ROOT)}" in names, f"{path.relative_to(ROOT)} is not shipped"


def test_the_installed_package_finds_its_files_outside_the_repository(installed, tmp_path):
    """Imported from the install (not the repository): the web folder the plugin declares exists,
    the training CLI loads a shipped config by name with its prompt file, the workflows are there."""
    _, target = installed
    probe = r"""
import json, sys
from pathlib import Path
import diffusion_blend
from diffusion_blend.training.config import load_config, read_prompts
pkg = Path(diffusion_blend.__file__).parent
cfg = load_config("sd15_aesthetic_am")
print(json.dumps({"package": str(pkg), "web": (pkg / "web" / "js").is_dir(),
                  "algorithm": cfg.algorithm.name, "prompts": len(read_prompts(cfg)),
                  "workflows": len(list((pkg / "workflows" / "api").glob("*.json")))}))
"""
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert Path(got["package"]).is_relative_to(target), got  # the install, not the editable repository
    assert got["web"] and got["algorithm"] == "adjoint_matching" and got["prompts"] > 0 and got["workflows"] > 0, got
    init = (ROOT / "__init__.py").read_text()
    assert 'WEB_DIRECTORY = "./web/js"' in init  # the folder checked above is the one the plugin declares


def test_registry_metadata_names_no_placeholder_and_the_oldest_proven_host():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    urls = meta["project"].get("urls", {})
    assert not any("diffusion-blend/comfyui-diffusion-blend" in u for u in urls.values()), urls
    assert meta["project"]["license"] == "Apache-2.0" and (ROOT / "LICENSE").read_text().count("Apache License") >= 1
    assert meta["tool"]["comfy"]["requires-comfyui"] == ">=0.3.75"  # the default host, the oldest the tests run
    ignored = (ROOT / ".comfyignore").read_text().split()
    assert {"tests/", "bench/", ".cache/"} <= set(ignored)


def _shipped_python_files() -> list[Path]:
    """The Python files the registry's archive holds: tracked files not matched by ``.comfyignore``."""
    ignored = [line.strip() for line in (ROOT / ".comfyignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split()
    return [ROOT / n for n in listed if not any(n.startswith(p.rstrip("/") + "/") or n == p for p in ignored)]


def test_the_registry_security_rules_hold_on_the_shipped_code():
    """What ``comfy node validate`` runs (ruff S102 ``exec``, S307 ``eval``, E702 statements joined by
    ``;``) and the registry's scan (no pip from a subprocess), on every shipped Python file."""
    import ast
    import io
    import tokenize

    files = _shipped_python_files()
    assert any(f.name == "comfy_wrapper.py" for f in files) and not any("tests" in f.parts for f in files)
    problems = []
    for path in files:
        text = path.read_text()
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.OP and tok.string == ";":
                problems.append(f"{path.relative_to(ROOT)}:{tok.start[0]}: ';' joins statements (E702)")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name in ("eval", "exec") and isinstance(node.func, ast.Name):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}() (S102/S307)")
            if name in ("Popen", "run", "call", "check_call", "check_output", "system"):
                if any(isinstance(c, ast.Constant) and isinstance(c.value, str) and "pip" in c.value.split()
                       for c in ast.walk(node)):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: pip from a subprocess")
    assert not problems, "\n".join(problems)
