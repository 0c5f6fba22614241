"""``diffusion-blend-train``: train a basis-reward LoRA, or export a checkpoint.

    diffusion-blend-train --config run.yaml [--resume[=auto] | --overwrite] [--section.key value ...]
    diffusion-blend-train export --checkpoint RUN_DIR_OR_CHECKPOINT --out lora.safetensors
    diffusion-blend-train restamp --lora OLD.safetensors --log RUN/log.jsonl   (LoRAs from before raw-unit alpha_ref)
    accelerate launch [--num_processes N] -m diffusion_blend.training --config run.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, load_config, validate


def _export(argv) -> int:
    from safetensors.torch import load_file

    from .checkpoint import find_checkpoint
    from .config import _from_dict, TrainConfig
    from .export import export_lora, lora_modules_from_tensors, run_metadata

    ap = argparse.ArgumentParser(prog="diffusion-blend-train export")
    ap.add_argument("--checkpoint", required=True, help="a run folder (its latest checkpoint) or a checkpoint folder")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    folder = Path(args.checkpoint)
    if not (folder / "state.json").exists():
        found = find_checkpoint(folder, report=lambda msg: print(msg, file=sys.stderr))
        if found is None:
            print(f"export: no checkpoint in {folder}", file=sys.stderr)
            return 2
        folder = found
    try:
        meta = json.loads((folder / "state.json").read_text())
        extra = meta["extra"]
        missing = [k for k in ("config", "base_fingerprint", "reward_scale", "chain") if k not in extra]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"export: {folder / 'state.json'} is not a readable checkpoint ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    if missing:
        print(f"export: {folder} has no {', '.join(missing)} in its state.json (written by an older version?); "
              "expected a checkpoint of diffusion-blend-train", file=sys.stderr)
        return 2
    cfg = _from_dict(TrainConfig, extra["config"])
    tensors = {k[len("lora."):]: v for k, v in load_file(str(folder / "state.safetensors")).items() if k.startswith("lora.")}
    modules = lora_modules_from_tensors(tensors, cfg.lora.rank, cfg.lora.alpha, cfg.lora.rslora)
    export_lora(modules, args.out, run_metadata(cfg, steps=meta["step"], base_fingerprint=extra["base_fingerprint"],
                                                reward_scale=extra["reward_scale"], chain=extra["chain"],
                                                modules=modules))
    print(f"[export] {folder} -> {args.out}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return _export(argv[1:])
    if argv[:1] == ["restamp"]:
        from .restamp import main as restamp_main

        return restamp_main(argv[1:])
    ap = argparse.ArgumentParser(prog="diffusion-blend-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a YAML file, or a shipped config by name (sd15_aesthetic_am: configs/)")
    ap.add_argument("--resume", nargs="?", const="strict", default=False, choices=["strict", "auto"],
                    help="continue from the run's newest usable checkpoint (an error if there is none); "
                         "--resume=auto starts fresh when there is none")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over in an output_dir that holds checkpoints (deletes them)")
    ap.add_argument("--validate-only", action="store_true", help="check the config and exit")
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        validate(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"diffusion-blend-train: config error: {exc}", file=sys.stderr)
        return 2
    if args.validate_only:
        print("config ok")
        return 0
    from .checkpoint import CheckpointError
    from .train import run_training

    try:
        run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    except CheckpointError as exc:
        print(f"diffusion-blend-train: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
