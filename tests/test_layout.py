"""House rules: blend/, training/ and the diffusers host never import ComfyUI; blend/ never imports diffusers;
one registration mechanism."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server",
                 "execution", "node_helpers", "latent_preview"}


def _imports(package: str) -> list[tuple[Path, int, str]]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(path, node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((path, node.lineno, node.module))
    return found


def test_blend_imports_no_diffusers():
    """The core is pure torch: the diffusers host adapts to it, never the other way round."""
    offenders = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p, line, name in _imports("blend")
                 if name.split(".")[0] in ("diffusers", "peft", "transformers")]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("package", ["blend", "training", "diffusers_host", "rewards"])
def test_pure_packages_import_no_comfyui(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level >= 2:
                names = [f"..{node.module}"]  # reaching out of the package (e.g. into nodes/)
            for n in names:
                if n.split(".")[0] in COMFY_MODULES or n.startswith("..nodes"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {n}")
    assert not offenders, "\n".join(offenders)


def _relative_imports(package: str) -> list[tuple[Path, int, str]]:
    """``(file, line, target)`` for every relative import in ``package``, the target as a path of the
    repository (``rewards.learned``, ``training.sampler``)."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        here = path.relative_to(ROOT).with_suffix("").parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = here[: len(here) - node.level + 1]
                found.append((path, node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
    return found


@pytest.mark.parametrize("package", ["nodes", "rewards", "blend"])
def test_the_nodes_and_the_reward_registry_import_nothing_of_the_training_package(package):
    """The Score and SMC nodes, the client and the validation use the reward registry (``rewards/``);
    it, the core and the nodes stand without the training package."""
    offenders = [f"{p.relative_to(ROOT)}:{line} imports {target}" for p, line, target in _relative_imports(package)
                 if target.split(".")[0] == "training"]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycle_inside_the_reward_registry():
    """No module of ``rewards/`` imports, even inside a function, one that imports it back."""
    edges: dict[str, set[str]] = {}
    for path, _, target in _relative_imports("rewards"):
        edges.setdefault(".".join(path.relative_to(ROOT).with_suffix("").parts), set()).add(target)
    cycles = [(a, b) for a, targets in edges.items() for b in targets if a in edges.get(b, set()) and a != b]
    assert not cycles, cycles


def test_importing_the_package_outside_comfyui_loads_no_comfyui():
    code = ("import sys, diffusion_blend, diffusion_blend.blend, diffusion_blend.training, diffusion_blend.diffusers_host;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'nodes')];"
            "print(bad); assert not bad; assert not hasattr(diffusion_blend, 'comfy_entrypoint')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_registration_uses_one_mechanism():
    src = (ROOT / "__init__.py").read_text()
    assert "comfy_entrypoint" in src and "NODE_CLASS_MAPPINGS" not in src
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "[tool.comfy]" in pyproject and "requires-comfyui" in pyproject


def test_the_readme_is_short_and_its_links_resolve():
    """README: at most 150 lines, the two commands on its first screen, every local link and picture
    present (the rest of the documentation lives in docs/, each page linked from the README)."""
    import re

    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines"
    first_screen = "\n".join(lines[:40])
    assert "make demo" in first_screen and "make test" in first_screen
    targets = re.findall(r"\]\(([^)#\s]+)", text)
    missing = [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()]
    assert not missing, missing
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert pages <= set(targets), f"docs pages the README does not link: {sorted(pages - set(targets))}"
