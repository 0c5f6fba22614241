"""``diffusion-blend``: run workflows and sweeps against a running ComfyUI server.

    diffusion-blend run WORKFLOW.json [MORE.json ...] [--set NODE.input=VALUE ...] [--server URL ...] [--out DIR]
    diffusion-blend sweep --ckpt NAME --lora A.safetensors --lora B.safetensors [--reward r_A --reward r_B]
                          [--weights 0,0.25,0.5,0.75,1] [--kl-scales 1] [--smc N] [--server URL ...] [--out DIR]
    diffusion-blend sweep --host diffusers --ckpt PIPELINE_FOLDER --lora A.safetensors --lora B.safetensors ...
                          (the same grid, trade-off plot and sweep.json from a diffusers pipeline; no server)
    diffusion-blend workflows [--server URL]      (regenerate workflows/ and example_workflows/)

``NODE`` in ``--set`` is a node id, a node title (``_meta.title``) or a class type (then every node of
that type); the value is read as JSON when it parses (numbers, true/false), else as a string.
Several ``--server`` URLs spread the workflows (or a sweep's cells) over the servers, one at a time
each; the work of a server that dies is redone on another, and the outputs are the same as from one
server.  Progress comes over the server's websocket.  Exit codes: 0 ok, 1 the server failed the prompt,
2 bad arguments or files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..rewards import reward_options
from ..rewards.files import RewardFileError
from .api import ComfyClient, ComfyError
from .workflows import WorkflowFormatError, load_api

__all__ = ["main", "apply_sets", "ProgressPrinter"]

DEFAULT_SERVER = "http://127.0.0.1:8188"


class UsageError(ValueError):
    pass


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_sets(prompt: dict, sets: list[str]) -> dict:
    """Apply ``NODE.input=VALUE`` assignments to an API-format prompt (in place; returned)."""
    for item in sets:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected NODE.input=VALUE")
        key, value_text = item.rsplit("=", 1)
        if "." not in key:
            raise UsageError(f"--set {item!r}: expected NODE.input=VALUE (NODE: id, title or class type)")
        target, name = key.rsplit(".", 1)
        ids = [target] if target in prompt else [
            i for i, n in prompt.items() if n.get("_meta", {}).get("title") == target
        ] or [i for i, n in prompt.items() if n["class_type"] == target]
        if not ids:
            known = ", ".join(f"{i} ({n.get('_meta', {}).get('title') or n['class_type']})" for i, n in prompt.items())
            raise UsageError(f"--set {item!r}: no node with id, title or type {target!r}; nodes: {known}")
        value = _parse_value(value_text)
        for node_id in ids:
            inputs = prompt[node_id]["inputs"]
            if name not in inputs:
                raise UsageError(f"--set {item!r}: node {node_id} ({prompt[node_id]['class_type']}) has no input "
                                 f"{name!r}; its inputs: {', '.join(inputs)}")
            if isinstance(inputs[name], list):
                raise UsageError(f"--set {item!r}: input {name!r} of node {node_id} is a link, not a value")
            inputs[name] = value
    return prompt


class ProgressPrinter:
    """Prints a line when a node starts and when a sampler passes each quarter of its steps."""

    def __init__(self, prompt: dict, stream=None):
        self.prompt = prompt
        self.stream = stream or sys.stdout
        self.t0 = time.monotonic()
        self._last: dict[str, int] = {}

    def _name(self, node_id) -> str:
        node = self.prompt.get(str(node_id), {})
        return f"node {node_id} ({node.get('_meta', {}).get('title') or node.get('class_type', '?')})"

    def __call__(self, kind: str, data: dict) -> None:
        stamp = f"[{time.monotonic() - self.t0:6.1f}s]"
        if kind == "executing" and data.get("node") is not None:
            print(f"{stamp} {self._name(data['node'])}", file=self.stream, flush=True)
        elif kind == "progress":
            value, total, node = data.get("value", 0), data.get("max", 1) or 1, str(data.get("node"))
            quarter = int(4 * value / total)
            if quarter > self._last.get(node, 0) or value == total:
                self._last[node] = quarter
                print(f"{stamp}   {value}/{total}", file=self.stream, flush=True)
        elif kind == "execution_cached" and data.get("nodes"):
            print(f"{stamp} cached: {', '.join(map(str, data['nodes']))}", file=self.stream, flush=True)
        elif kind == "execution_error":
            print(f"{stamp} error in {self._name(data.get('node_id'))}: {data.get('exception_message', '').strip()}",
                  file=self.stream, flush=True)


def _csv_floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} {text!r}: expected comma-separated numbers") from None


def _clients(args) -> list[ComfyClient]:
    return [ComfyClient(url, timeout=args.timeout) for url in args.server]


def _object_info(clients: list[ComfyClient]) -> dict:
    """``/object_info`` of the first server that answers (the servers are meant to run the same nodes)."""
    error: OSError | None = None
    for client in clients:
        try:
            return client.object_info()
        except OSError as exc:
            error = exc
    raise error if error is not None else OSError("no server")


def cmd_run(args) -> int:
    from threading import Lock

    from .servers import spread

    clients = _clients(args)
    info = _object_info(clients)
    jobs = [(Path(path), apply_sets(load_api(path, info), args.set or [])) for path in args.workflow]
    uploaded: set[str] = set()
    lock = Lock()

    def render(client: ComfyClient, job):
        path, prompt = job
        with lock:
            first_here = client.url not in uploaded
            uploaded.add(client.url)
        if first_here:  # each server reads inputs from its own folder
            for image in args.upload or []:
                print(f"uploaded {image} to {client.url} as {client.upload_image(image)}")
        progress = ProgressPrinter(prompt) if len(clients) == 1 and len(jobs) == 1 else None
        result = client.run(prompt, on_event=progress)
        if len(clients) > 1:
            print(f"{path}: done on {client.url}")
        files = [(Path(image["filename"]).name, client.view(image)) for image in result.images]
        texts = [(node_id, output["text"]) for node_id, output in result.history.get("outputs", {}).items()
                 if "text" in output]
        return files, texts

    results = spread(clients, jobs, render, name=lambda c: c.url)
    for (path, _), (files, texts) in zip(jobs, results):
        out = Path(args.out) / path.stem if len(jobs) > 1 else Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (out / name).write_bytes(data)
            print(f"saved {out / name}")
        for node_id, text in texts:
            print(f"node {node_id}: " + " | ".join(str(t).replace("\n", "; ") for t in text))
    return 0


def _reward_of(lora: str) -> str:
    """The reward a LoRA's file name mentions (``db_brightness.safetensors`` -> ``brightness``); its
    ``db.reward`` metadata is on the server, so name rewards with ``--reward`` otherwise."""
    stem = Path(lora).stem
    from ..rewards import REWARDS

    for name in sorted(REWARDS, key=len, reverse=True):
        if name in stem:
            return name
    raise UsageError(f"--lora {lora}: cannot tell its reward from the name; give --reward for each --lora")


def _reward_from_file(lora: str) -> str | None:
    """A local LoRA file's ``db.reward`` (the diffusers host reads the files itself), else None."""
    from ..blend.lora_file import LoraFormatError, read_lora

    try:
        return read_lora(lora, strict=False).reward
    except LoraFormatError:
        return None


def cmd_sweep(args) -> int:
    from .sweep import SweepSpec, run_sweep

    if len(args.lora) != 2:
        raise UsageError(f"--lora: give exactly two basis LoRAs, got {len(args.lora)}")
    diffusers = args.host == "diffusers"
    if diffusers:
        for lora in args.lora:
            if not Path(lora).is_file():
                raise UsageError(f"--lora {lora}: no such file (with --host diffusers give LoRA file paths)")
    rewards = args.reward or [(_reward_from_file(lora) if diffusers else None) or _reward_of(lora) for lora in args.lora]
    if len(rewards) != 2:
        raise UsageError(f"--reward: give one per --lora (2), got {len(rewards)}")
    if args.smc < 0 or args.smc == 1:
        raise UsageError(f"--smc {args.smc}: expected a number of particles >= 2 (or 0: no SMC)")
    if args.smc_score_every < 1:
        raise UsageError(f"--smc-score-every {args.smc_score_every}: expected an integer >= 1")
    try:
        options = reward_options(args.reward_path or [], args.reward_option or [])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    spec = SweepSpec(
        ckpt=args.ckpt, loras=tuple(args.lora), rewards=tuple(rewards),
        weights=_csv_floats(args.weights, "--weights"), kl_scales=_csv_floats(args.kl_scales, "--kl-scales"),
        images=args.images, seed=args.seed, steps=args.steps, cfg=args.cfg, size=args.size, mode=args.mode,
        sampler=args.sampler, scheduler=args.scheduler,
        positive=args.prompt, negative=args.negative, reward_options=options,
        smc_particles=args.smc, smc_score_every=args.smc_score_every, host=args.host,
    )
    if diffusers:
        from ..blend.coefficients import BlendInputError
        from ..blend.lora_file import LoraFormatError
        from ..diffusers_host.sweep import DiffusersRenderer, load_pipeline

        import torch

        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            renderer = DiffusersRenderer(load_pipeline(args.ckpt, device), spec)
            try:
                summary = run_sweep(renderer, spec, args.out)
            finally:
                renderer.close()
        except (BlendInputError, LoraFormatError) as exc:
            raise UsageError(str(exc)) from None
    else:
        summary = run_sweep(_clients(args), spec, args.out, on_event=ProgressPrinter({}) if args.verbose else None)
    for reward, rows in summary["spearman_own_weight"].items():
        print(f"{reward}: Spearman(own weight, mean reward) = " + ", ".join(f"λ={k}: {v:.2f}" for k, v in rows.items()))
    print(f"wrote {Path(args.out) / 'grid.png'}, {Path(args.out) / 'tradeoff.png'}, {Path(args.out) / 'sweep.json'}")
    return 0


def cmd_workflows(args) -> int:
    from .workflows import main as workflows_main

    return workflows_main(["--server", args.server[0]])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="diffusion-blend", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", action="append", metavar="URL",
                        help=f"ComfyUI URL (default {DEFAULT_SERVER}); give several to spread the work over them "
                             "(one server per GPU or machine; work on a server that dies is redone on another)")
    common.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for one prompt")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="submit workflows (API or UI format) and save their outputs")
    run.add_argument("workflow", nargs="+", help="one or more workflow files (several: outputs in OUT/<file name>/)")
    run.add_argument("--set", action="append", metavar="NODE.input=VALUE")
    run.add_argument("--upload", action="append", metavar="IMAGE", help="upload an input image first")
    run.add_argument("--out", default="out/run")
    run.set_defaults(fn=cmd_run)

    sweep = sub.add_parser("sweep", parents=[common], help="weight x KL grid of two bases: grid.png, tradeoff.png, sweep.json")
    sweep.add_argument("--host", choices=("comfyui", "diffusers"), default="comfyui",
                       help="comfyui: cells run on the --server; diffusers: on a diffusers pipeline in this process")
    sweep.add_argument("--device", default="auto",
                       help="with --host diffusers: the torch device (default: cuda when available, else cpu)")
    sweep.add_argument("--ckpt", required=True, help="checkpoint name in the server's checkpoints folder "
                                                     "(--host diffusers: a diffusers pipeline folder)")
    sweep.add_argument("--lora", action="append", required=True,
                       help="basis LoRA (twice): a name in the server's loras folder (--host diffusers: a file)")
    sweep.add_argument("--reward", action="append", help="reward of each --lora (registry name)")
    sweep.add_argument("--reward-path", action="append", metavar="REWARD=PATH",
                       help="a learned reward's official file (ImageReward.pt, HPS_v2.1_compressed.pt, "
                            "sac+logos+ava1-l14-linearMSE.pth) or model folder (PickScore_v1, CLIP)")
    sweep.add_argument("--reward-option", action="append", metavar="REWARD.KEY=VALUE",
                       help="another option of that reward's loader, e.g. aesthetic.clip=FOLDER, "
                            "imagereward.med_config=FILE, pickscore.processor=FOLDER, hpsv2.arch=ViT-H-14")
    sweep.add_argument("--weights", default="0,0.25,0.5,0.75,1", help="weights w of the first basis (second: 1-w)")
    sweep.add_argument("--kl-scales", default="1", help="KL scales lambda")
    sweep.add_argument("--images", type=int, default=4, help="images per cell")
    sweep.add_argument("--seed", type=int, default=42)
    sweep.add_argument("--steps", type=int, default=50, help="sampling steps (the LoRAs' training chain: 50)")
    sweep.add_argument("--cfg", type=float, default=7.5, help="CFG scale (the LoRAs' training chain: 7.5)")
    sweep.add_argument("--size", type=int, default=512)
    sweep.add_argument("--sampler", default="ddpm",
                       help="ComfyUI sampler name (default: ddpm, i.e. DDIM eta = 1, the chain the LoRAs are trained on; "
                            "--host diffusers runs the pipeline's own scheduler, with eta = 1 where it takes one)")
    sweep.add_argument("--scheduler", default="ddim_uniform",
                       help="ComfyUI scheduler name (default: ddim_uniform, the training's leading timesteps)")
    sweep.add_argument("--mode", default="exact", choices=["exact", "sequential", "merged", "stochastic"])
    sweep.add_argument("--prompt", default="a photo of a cat sitting in a garden")
    sweep.add_argument("--negative", default="")
    sweep.add_argument("--smc", type=int, default=0, metavar="N",
                       help="sample every cell with the DB-SMC sampler, N particles (the cell's images; --images "
                            "is then ignored)")
    sweep.add_argument("--smc-score-every", type=int, default=5, metavar="K",
                       help="with --smc: score the predicted clean images every K steps")
    sweep.add_argument("--out", default="out/sweep")
    sweep.add_argument("--verbose", action="store_true", help="print per-node progress")
    sweep.set_defaults(fn=cmd_sweep)

    wf = sub.add_parser("workflows", parents=[common], help="regenerate workflows/ and example_workflows/ from their definitions")
    wf.set_defaults(fn=cmd_workflows)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.server = args.server or [DEFAULT_SERVER]
    try:
        return args.fn(args)
    except (UsageError, WorkflowFormatError, FileNotFoundError, RewardFileError) as exc:
        print(f"diffusion-blend: {exc}", file=sys.stderr)
        return 2
    except ComfyError as exc:
        print(f"diffusion-blend: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # connection refused, ...
        print(f"diffusion-blend: cannot reach ComfyUI at {', '.join(args.server)}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
