"""The blend on a GPU under the host's default flags (dynamic VRAM on NVIDIA from ComfyUI v0.16).

Dynamic VRAM hands a layer's weight functions ComfyUI's cached device copy of the weight itself.
This check loads the tiny SD1.5 checkpoint through ComfyUI's own loader (so the host picks its
default patcher: ``ModelPatcherDynamic`` where dynamic VRAM is on), writes a dense-adapter file
(LoHa; ``--kind``), and compares the blend node in sequential mode at w = e_1, lambda = 1 (the dense
delta on the weight functions, nothing merged at load) with ComfyUI's stock LoRA loader over
``--calls`` calls.  It passes when every call equals the stock loader (relative 1e-3 in the model's
dtype) and all calls are bit-identical; it prints a JSON line and writes it to ``--out``.

    # on the GPU machine, with the newer host (its own venv: scripts/test-host makes it)
    COMFYUI_DIR=.cache/hosts/comfyui-0.33.0 $(scripts/bootstrap --venv | tail -1)/bin/python \\
        bench/host_gpu_check.py --out out/bench/host_gpu_check.json
    # anywhere, as a dry run of the same code: --cpu (no dynamic VRAM there)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import tiny_fixtures  # noqa: E402
from tiny_families import apply  # noqa: E402  (one apply_model call as ComfyUI's sampler makes it)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfy", default=os.environ.get("COMFYUI_DIR") or str(ROOT / ".cache" / "comfyui"))
    p.add_argument("--cpu", action="store_true", help="run ComfyUI with --cpu (a dry run; no dynamic VRAM)")
    p.add_argument("--kind", default="loha", choices=("loha", "lokr", "diff"))
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    tiny_fixtures.comfy_on_path(args.comfy, cpu=args.cpu)
    import comfy.model_management
    import comfy.patcher_extension
    import comfy.sd
    import comfy.utils
    import folder_paths

    import lora_formats

    from diffusion_blend.blend.basis import make_basis
    from diffusion_blend.blend.lora_file import read_lora
    from diffusion_blend.nodes.blend_nodes import blend_model
    from diffusion_blend.nodes.comfy_wrapper import WRAPPER_KEY

    ckpt = tiny_fixtures.build_tiny_base(args.comfy)["checkpoint"]
    base = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False)[0]
    work = Path(tempfile.mkdtemp(prefix="db-gpu-check-"))
    lora = lora_formats.write_file(work / f"{args.kind}.safetensors", base.model, "comfyui", args.kind, seed=1)
    folder_paths.add_model_folder_path("loras", str(work))

    stock = comfy.sd.load_lora_for_models(base, None, comfy.utils.load_torch_file(str(lora)), 1.0, 0)[0]
    basis = (make_basis(read_lora(lora, strict=False), 1.0),)
    blend = blend_model(base, basis, 1.0, True, "sequential", merge_static=False)
    bank = blend.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)[0].bank
    bank.low_rank_side = "weight"
    bank.swap_budget_bytes = 0  # the weight functions, never merged copies (as on GPUs by default)

    device = comfy.model_management.get_torch_device()
    dtype = base.model.get_dtype()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 4, 16, 16, generator=g) * 3.0).to(device)
    sigma = torch.full((2,), 3.0, device=device)
    context = torch.randn(2, 77, 768, generator=g).to(device)

    cond = {"c_crossattn": context}
    eps_base = apply(base, x, sigma, cond)
    eps_stock = apply(stock, x, sigma, cond)
    outputs = [apply(blend, x, sigma, cond) for _ in range(args.calls)]
    scale = max(1.0, float(eps_stock.abs().max()))
    errors = [float((o - eps_stock).abs().max()) / scale for o in outputs]
    effect = float((eps_stock - eps_base).abs().max()) / scale
    identical = all(torch.equal(o, outputs[0]) for o in outputs)
    diffusion_model = blend.model.diffusion_model
    result = {
        "comfyui": getattr(__import__("comfyui_version"), "__version__", "?"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
        "dtype": str(dtype),
        "patcher": type(base).__name__,
        "dynamic_vram": bool(getattr(base, "is_dynamic", lambda: False)()),
        "streamed_layers": sum(hasattr(m, "_v") for m in diffusion_model.modules()),
        "kind": args.kind,
        "calls": args.calls,
        "lora_effect": effect,
        "max_rel_error_vs_stock": max(errors),
        "first_rel_error": errors[0],
        "last_rel_error": errors[-1],
        "calls_bit_identical": identical,
        "swapped_bytes": bank.swapped_bytes,
    }
    tol = 1e-3 if dtype in (torch.float16, torch.bfloat16) else 2e-5
    result["ok"] = bool(effect > 1e-3 and max(errors) <= tol and identical)
    line = json.dumps(result)
    print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(line + "\n")
        tmp.replace(args.out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
