"""Re-stamp ``db.alpha_ref`` of a LoRA trained before the objective was stated in raw reward units.

Until then the loop divided advantages by the *batch* reward std ``sigma`` at every step while the
KL term kept weight ``beta`` (loss ``rho * PG(A / sigma) + beta * KL``), so the KL weight it really
trained at, in raw reward units, is ``alpha = sigma * beta / rho`` -- but the file states
``beta / rho``.  ``sigma`` moves as the policy trains; the fixed point the run ended near is set by
the ``sigma`` of its last steps, so this command takes the median ``reward_std`` of the last quarter
of the run's ``log.jsonl``.  Two things it cannot repair, and says so: the old loss dropped the KL
still to come (a quadratic-type reward then behaves like a somewhat larger alpha), and per-prompt
whitening gave every prompt its own temperature (refused unless ``--force``).

    diffusion-blend-train restamp --lora OLD.safetensors --log RUN/log.jsonl [--out NEW.safetensors]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from ..blend.lora_file import LoraFormatError, read_lora, update_metadata

__all__ = ["restamped_alpha", "main"]


def restamped_alpha(stated: float, log_entries: list[dict], tail: float = 0.25) -> tuple[float, float, int]:
    """``(alpha in raw units, sigma used, number of steps it was read from)``."""
    stds = [float(e["reward_std"]) for e in log_entries if "reward_std" in e]
    if not stds:
        raise ValueError("the log has no reward_std entries")
    last = stds[-max(1, round(len(stds) * tail)):]
    sigma = statistics.median(last)
    return stated * sigma, sigma, len(last)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffusion-blend-train restamp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lora", required=True, help="a LoRA exported before db.reward_scale existed")
    ap.add_argument("--log", required=True, help="the run's log.jsonl (reward_std per step)")
    ap.add_argument("--out", help="write here instead of rewriting --lora in place (atomically)")
    ap.add_argument("--force", action="store_true", help="also per-prompt runs, or files that look re-stamped")
    args = ap.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"restamp: {msg}", file=sys.stderr)
        return 2

    try:
        lora = read_lora(args.lora)
    except LoraFormatError as exc:
        return fail(str(exc))
    meta = lora.metadata
    if lora.alpha_ref is None:
        return fail(f"--lora {lora.name}: no db.alpha_ref to re-stamp (DDPO files have none)")
    if ("db.reward_scale" in meta or "db.alpha_ref_restamped_from" in meta) and not args.force:
        return fail(f"--lora {lora.name}: already states alpha_ref in raw reward units (db.reward_scale / a "
                    "previous re-stamp); nothing to do (--force to re-stamp anyway)")
    log = Path(args.log)
    try:
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        return fail(f"--log {log}: cannot read it as JSON lines ({exc})")
    config = log.parent / "config.json"
    advantage = json.loads(config.read_text()).get("algorithm", {}).get("advantage") if config.is_file() else None
    if advantage == "per_prompt" and not args.force:
        return fail(f"{config}: advantage = per_prompt whitened every prompt by its own std, so no single alpha "
                    "describes this LoRA (--force uses the batch std anyway)")
    try:
        alpha, sigma, n = restamped_alpha(lora.alpha_ref, entries)
    except ValueError as exc:
        return fail(f"--log {log}: {exc}")
    statement = (f"alpha_ref = {lora.alpha_ref:g} (as stated, beta/rho on whitened advantages) x sigma_r = {sigma:.6g} "
                 f"(median batch reward_std of the last {n} logged steps) = {alpha:.6g} in raw reward units; "
                 "assumes the fixed point is set by the final sigma; the old loss dropped the KL still to come")
    out = Path(args.out) if args.out else Path(args.lora)
    if out != Path(args.lora):
        shutil.copyfile(args.lora, out)
    update_metadata(out, {"db.alpha_ref": repr(alpha), "db.alpha_ref_restamped_from": repr(lora.alpha_ref),
                          "db.reward_scale_assumed": repr(sigma), "db.restamp_note": statement})
    print(f"[restamp] {out}: {statement}")
    return 0
