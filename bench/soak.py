"""Soak the real ComfyUI server with mixed Diffusion Blend prompts: memory must plateau and every
re-run must be bit-identical.  ``--load``: the same under load (two clients at once, interrupts and
queue deletions interleaved; :func:`load`).

A pool of distinct prompts (all four modes, 1-8 bases, varying LoRA sets and weights, 64 px,
3 steps) is cycled; the server's RSS is read after every prompt.  The first pass over the pool is
warm-up (caches fill by design: parsed LoRAs up to their bound, the banks' cast factors, oneDNN's
kernels for each batch shape; in one 72-prompt run RSS rose 51 MB from prompt 10 to 50 and 3 MB
from 50 to 72) and is checked for mismatches only.  Plateau: over the prompts after it, the
highest RSS of the last half exceeds the highest of the first half by less than 1 % of the first
half's median.

    python bench/soak.py [--prompts 100] [--cache-mb 64]
    python bench/soak.py --load [--prompts 200] [--clients 2]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from diffusion_blend.client.graph import Graph  # noqa: E402

MODES = ("exact", "sequential", "merged", "stochastic")
CKPT = "tiny-sd15.safetensors"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def prompt_pool(lora_names: list[str], size: int = 12, seed: int = 0) -> list[dict]:
    """Distinct blend prompts: every mode, 1-8 bases from ``lora_names``, positive weights."""
    rng = random.Random(seed)
    pool = []
    for k in range(size):
        mode = MODES[k % len(MODES)]
        m = 1 + (k * 3) % min(8, len(lora_names))
        names = rng.sample(lora_names, m)
        weights = [round(rng.uniform(0.2, 1.0), 2) for _ in names]
        kl_scale = 0.8 if mode == "stochastic" else round(rng.uniform(0.5, 2.0), 2)  # stochastic needs c >= 0
        pool.append({"mode": mode, "bases": list(zip(names, weights)), "kl_scale": kl_scale, "seed": k})
    return pool


def smc_pool(lora_names: list[str], size: int = 4, seed: int = 1) -> list[dict]:
    """SMC prompts: a blend of 1-3 bases as the proposal, 4 particles, rule-based rewards per basis."""
    rng = random.Random(seed)
    rewards = ("brightness", "saturation", "jpeg_compressibility")
    pool = []
    for k in range(size):
        m = 1 + k % 3
        names = rng.sample(lora_names, m)
        weights = [round(rng.uniform(0.2, 1.0), 2) for _ in names]
        pool.append({"mode": "exact", "bases": list(zip(names, weights)), "kl_scale": round(rng.uniform(0.5, 1.5), 2),
                     "seed": 100 + k, "smc": ", ".join(rewards[:m])})
    return pool


def _blended(spec: dict, batch: int):
    """``(graph, checkpoint, blended model, positive, negative, empty latent)``: the part every prompt shares."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    basis = None
    for name, weight in spec["bases"]:
        kw = {"basis": basis[0]} if basis is not None else {}
        basis = g.add("DiffusionBlendBasis", lora_name=name, weight=weight, alpha_ref=0.0, **kw)
    model = g.add("DiffusionBlend", model=ckpt[0], basis=basis[0], kl_scale=spec["kl_scale"], normalize=True,
                  mode=spec["mode"], start_percent=0.0, end_percent=1.0, seed=spec["seed"])[0]
    pos = g.add("CLIPTextEncode", text="a photo of a cat", clip=ckpt[1])[0]
    neg = g.add("CLIPTextEncode", text="", clip=ckpt[1])[0]
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=batch)[0]
    return g, ckpt, model, pos, neg, latent


def graph(spec: dict) -> dict:
    """The API prompt of ``spec``: a blend, then KSampler (or, when ``spec["smc"]`` names the rewards,
    the SMC sampler with 4 particles and its report), then SaveImage; ``spec["steps"]`` (default 3)."""
    steps = spec.get("steps", 3)
    if spec.get("smc"):
        g, ckpt, model, pos, neg, latent = _blended(spec, batch=4)
        smc = g.add("DiffusionBlendSMCSampler", vae=ckpt[2], score_every=1, resample_below=0.5, eta=1.0,
                    rewards=spec["smc"])
        sigmas = g.add("BasicScheduler", model=model, scheduler="ddim_uniform", steps=steps, denoise=1.0)
        out = g.add("SamplerCustom", model=model, add_noise=True, noise_seed=spec["seed"], cfg=5.0, positive=pos,
                    negative=neg, sampler=smc[0], sigmas=sigmas[0], latent_image=latent)[0]
        g.add("DiffusionBlendSMCReport", smc_log=smc[1], samples=out)
    else:
        g, ckpt, model, pos, neg, latent = _blended(spec, batch=1)
        out = g.add("KSampler", model=model, seed=spec["seed"], steps=steps, cfg=5.0, sampler_name="ddpm",
                    scheduler="ddim_uniform", positive=pos, negative=neg, latent_image=latent, denoise=1.0)[0]
    img = g.add("VAEDecode", samples=out, vae=ckpt[2])
    g.add("SaveImage", images=img[0], filename_prefix="soak/smc" if spec.get("smc") else "soak/img")
    return g.prompt()


def _images(client, history: dict) -> bytes:
    """Every image a finished prompt saved, concatenated (its identity for the bit-for-bit check)."""
    return b"".join(client.view(image) for out in history.get("outputs", {}).values() for image in out.get("images", []))


def outcome(client, prompt_id: str) -> tuple[str, dict]:
    """``("success" | "interrupted" | "error" | "deleted" | "pending", history entry)``."""
    entry = client.get(f"/history/{prompt_id}").get(prompt_id)
    if entry is None:
        queue = client.queue()
        waiting = {item[1] for item in queue["queue_running"] + queue["queue_pending"]}
        return ("pending" if prompt_id in waiting else "deleted"), {}
    status = entry.get("status", {})
    if status.get("completed"):
        return "success", entry
    kinds = {m[0] for m in status.get("messages", [])}
    if status.get("status_str") == "error":
        return ("interrupted" if "execution_interrupted" in kinds else "error"), entry
    return "pending", entry


class _RssMonitor(threading.Thread):
    """The server's RSS every ``period`` seconds while the load runs."""

    def __init__(self, pid: int, period: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.period, self.samples, self._stop_event = pid, period, [], threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append(rss_bytes(self.pid))
            self._stop_event.wait(self.period)

    def stop(self) -> list[int]:
        self._stop_event.set()
        self.join()
        return self.samples


def _wait_running(client, prompt_id: str, timeout: float = 60.0) -> bool:
    """Until ``prompt_id`` runs (True) or has left the queue (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = client.queue()
        if any(item[1] == prompt_id for item in queue["queue_running"]):
            return True
        if not any(item[1] == prompt_id for item in queue["queue_pending"]):
            return False
        time.sleep(0.02)
    return False


def load(server, lora_names: list[str], n_prompts: int, clients: int = 2, seed: int = 0, report=print,
         pool_size: int = 12, smc_size: int = 4, long_size: int = 4, long_steps: int = 30) -> dict:
    """``n_prompts`` mixed prompts (every mode, 1-8 bases, SMC) from ``clients`` clients at once, with
    interrupts and queue deletions interleaved.

    Each client draws its actions: *run* a prompt of the pool; *interrupt* (a long prompt is queued,
    interrupted by id once it runs); *delete* (a long prompt is queued, then a prompt behind it, which is
    removed from the queue while it waits).  Every prompt of the pool is first run alone, in turn: the
    reference (the long ones too, as warm-up; each long prompt queued gets a seed of its own, so ComfyUI
    never serves it from its cache, and is run alone after the load if it completed).  Afterwards every
    prompt that completed must give the bytes of its reference, every targeted one must report interrupted (or have finished first, bit-identical), every
    deleted one must not have run, nothing may fail otherwise, and the server must still serve.  RSS is
    sampled all along; growth = highest of the last half minus highest of the first half.  The pool:
    ``pool_size`` blend prompts, ``smc_size`` SMC ones, ``long_size`` long ones (``long_steps`` steps)."""
    from diffusion_blend.client.api import ComfyClient

    pool = prompt_pool(lora_names, size=pool_size) + smc_pool(lora_names, size=smc_size)
    long_specs = [dict(spec, steps=long_steps) for spec in prompt_pool(lora_names, size=long_size, seed=7)]
    specs = list(pool)  # a long prompt gets a seed of its own each time (never served from ComfyUI's cache)
    reference: dict[int, bytes] = {}
    t0 = time.monotonic()
    took = []
    for k, spec in enumerate(specs + long_specs):  # alone, one after the other (also the warm-up)
        t1 = time.monotonic()
        result = server.client.run(graph(spec))
        if k < len(specs):
            reference[k] = _images(server.client, result.history)
        took.append(round(time.monotonic() - t1, 1))
    report(f"[load] seconds per reference prompt: {took}")
    report(f"[load] references: {len(specs)} prompts run alone ({time.monotonic() - t0:.0f} s); server RSS {rss_bytes(server.proc.pid) / 2**20:.1f} MB")
    monitor = _RssMonitor(server.proc.pid)
    monitor.start()
    started = time.monotonic()
    submitted: list[tuple[str, int, str]] = []  # (prompt id, spec index, what is expected of it)
    lock = threading.Lock()
    per_client = [n_prompts // clients + (i < n_prompts % clients) for i in range(clients)]

    crashed: list[BaseException] = []
    settled_rss: list[tuple[int, int]] = []  # (prompts submitted so far, server RSS) as each one settles

    def new_long(rng: random.Random) -> int:
        with lock:
            specs.append(dict(rng.choice(long_specs), seed=1000 + len(specs)))
            return len(specs) - 1

    def client_thread(i: int) -> None:
        try:
            drive(i)
        except BaseException as exc:  # re-raised below: a client that dies must fail the run
            crashed.append(exc)

    def settled(client, prompt_id: str) -> None:
        """A client waits for its prompt, as a user at a UI would (so the queue stays short and the
        interrupts and deletions fall all along the run)."""
        while outcome(client, prompt_id)[0] == "pending":
            time.sleep(0.02)
        with lock:
            settled_rss.append((len(submitted), rss_bytes(server.proc.pid)))

    def drive(i: int) -> None:
        client = ComfyClient(server.client.url, timeout=600)
        rng = random.Random(seed * 100 + i)
        left = per_client[i]
        forced = ("interrupt", "delete")[i % 2]  # every run has both kinds of event
        while left > 0:
            action = forced or rng.choices(("run", "interrupt", "delete"), weights=(8, 1, 1))[0]
            forced = None
            action = action if left >= 2 else "run"
            if action == "run":
                k = rng.randrange(len(pool))
                pid = client.submit(graph(specs[k]))
                with lock:
                    submitted.append((pid, k, "complete"))
                settled(client, pid)
                left -= 1
            elif action == "interrupt":
                k = new_long(rng)
                pid = client.submit(graph(specs[k]))
                with lock:
                    submitted.append((pid, k, "interrupt"))
                if _wait_running(client, pid):
                    time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the sampling
                    client.interrupt(pid)
                settled(client, pid)
                left -= 1
            else:
                k = new_long(rng)
                victim = rng.randrange(len(pool))
                busy = client.submit(graph(specs[k]))
                doomed = client.submit(graph(specs[victim]))
                client.delete_queued(doomed)
                with lock:
                    submitted.extend([(busy, k, "complete"), (doomed, victim, "delete")])
                settled(client, busy)
                left -= 2

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if crashed:
        monitor.stop()
        raise crashed[0]
    report(f"[load] {len(submitted)} prompts submitted ({time.monotonic() - started:.0f} s)")
    for pid, k, _ in submitted:  # long prompts that completed: their run alone, now
        if k not in reference and outcome(server.client, pid)[0] in ("success", "pending"):
            while outcome(server.client, pid)[0] == "pending":
                time.sleep(0.05)
            if outcome(server.client, pid)[0] == "success":
                reference[k] = _images(server.client, server.client.run(graph(specs[k])).history)
    counts = {"completed": 0, "interrupted": 0, "deleted": 0, "mismatches": 0, "errors": 0,
              "interrupted_untargeted": 0, "deleted_ran_anyway": 0}
    failures: list[str] = []
    deadline = time.monotonic() + 1800
    for pid, k, expected in submitted:
        while (state := outcome(server.client, pid))[0] == "pending":
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {pid} still pending after the load")
            time.sleep(0.05)
        kind, entry = state
        if kind == "success":
            counts["completed"] += 1
            counts["deleted_ran_anyway"] += expected == "delete"  # it had started before the deletion
            if _images(server.client, entry) != reference[k]:
                counts["mismatches"] += 1
                failures.append(f"{pid} (spec {k}): not bit-identical to its run alone")
        elif kind == "interrupted":
            counts["interrupted"] += 1
            counts["interrupted_untargeted"] += expected != "interrupt"
        elif kind == "deleted":
            counts["deleted"] += 1
            if expected != "delete":
                failures.append(f"{pid} (spec {k}): vanished from the queue without being deleted")
        else:
            counts["errors"] += 1
            failures.append(f"{pid} (spec {k}): failed: {json.dumps(entry.get('status'))[:300]}")
    rss = monitor.stop()
    after = server.client.run(graph(pool[0]))  # the server still serves, and the same bytes
    alive = _images(server.client, after.history) == reference[0]
    half = len(rss) // 2
    level = sorted(rss[:half])[half // 2] if half else rss[0]
    growth = max(rss[half:]) - max(rss[:half]) if half else 0
    marks = {n: next(v for count, v in settled_rss if count >= n) for n in (50, 100, 200)
             if any(count >= n for count, _ in settled_rss)}
    out = {**counts, "prompts": len(submitted), "failures": failures, "alive_and_identical": alive,
           "rss_samples": len(rss), "growth_bytes": growth, "first_half_level": level,
           "growth_fraction": growth / level, "plateau": growth < 0.01 * level,
           "rss_mb_at": {n: round(v / 2**20, 1) for n, v in marks.items()}}
    report(f"[load] {len(submitted)} prompts from {clients} clients: {counts}; RSS growth over the last half "
           f"{growth / 2**20:.1f} MB ({100 * growth / level:.2f} % of {level / 2**20:.0f} MB); RSS (MB) near prompt "
           f"{out['rss_mb_at']}; serving after: {alive}")
    return out


def soak(server, lora_names: list[str], n_prompts: int, report=print, warmup: int | None = None) -> dict:
    """Run ``n_prompts`` (cycling the pool); returns RSS per prompt, mismatches and the plateau check
    over the prompts after the first ``warmup`` (default: one pass over the pool)."""
    pool = prompt_pool(lora_names)
    warmup = len(pool) if warmup is None else warmup
    if n_prompts - warmup < 2:
        raise ValueError(f"n_prompts = {n_prompts}: expected at least warm-up ({warmup}) + 2")
    first: dict[int, bytes] = {}
    rss, mismatches = [], 0
    for k in range(n_prompts):
        idx = k % len(pool)
        result = server.client.run(graph(pool[idx]))
        image = server.client.view(result.images[0])
        if idx in first:
            mismatches += image != first[idx]
        else:
            first[idx] = image
        rss.append(rss_bytes(server.proc.pid))
        if k + 1 in (10, 50, 100) or k + 1 == n_prompts:
            report(f"[soak] after {k + 1:4d} prompts: server RSS {rss[-1] / 2**20:8.1f} MB, mismatches {mismatches}")
    measured = rss[warmup:]
    half = len(measured) // 2
    level = sorted(measured[:half])[half // 2]
    growth = max(measured[half:]) - max(measured[:half])
    return {"rss": rss, "mismatches": mismatches, "growth_bytes": growth, "first_half_level": level,
            "growth_fraction": growth / level, "plateau": growth < 0.01 * level}


def main(argv=None) -> int:
    import tempfile

    import tiny_fixtures

    from diffusion_blend.client.host import ComfyServer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--cache-mb", type=float, default=None, help="DIFFUSION_BLEND_LORA_CACHE_MB for the server")
    ap.add_argument("--load", action="store_true", help="two clients at once, interrupts and queue deletions "
                    "(default prompts: 200)")
    ap.add_argument("--clients", type=int, default=2)
    args = ap.parse_args(argv)
    comfy = ROOT / ".cache" / "comfyui"
    base = tiny_fixtures.build_tiny_base(comfy)
    unet = tiny_fixtures.load_diffusers_unet(base["diffusers"])
    models = Path(tempfile.mkdtemp(prefix="db-soak-"))
    (models / "checkpoints").mkdir()
    (models / "loras").mkdir()
    (models / "checkpoints" / CKPT).symlink_to(base["checkpoint"])
    names = []
    for i in range(10):
        name = f"soak_{i}.safetensors"
        tiny_fixtures.make_basis_lora(unet, models / "loras" / name, seed=100 + i, alpha_ref=1e-4 * (1 + i % 3))
        names.append(name)
    import os

    if args.cache_mb is not None:
        os.environ["DIFFUSION_BLEND_LORA_CACHE_MB"] = str(args.cache_mb)
    with ComfyServer(comfy, models) as server:
        if args.load:
            out = load(server, names, 200 if args.prompts == 100 else args.prompts, args.clients)
            ok = (out["plateau"] and not out["failures"] and out["alive_and_identical"]
                  and out["interrupted_untargeted"] == 0)
            return 0 if ok else 1
        out = soak(server, names, args.prompts)
    print(f"[soak] growth over the last half (after a warm-up pass): {out['growth_bytes'] / 2**20:.1f} MB = {100 * out['growth_fraction']:.2f} % "
          f"of the first half's {out['first_half_level'] / 2**20:.0f} MB; mismatches {out['mismatches']}")
    return 0 if out["plateau"] and out["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
