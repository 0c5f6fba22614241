"""A reduced soak through the real server (the full count is ``bench/soak.py``): mixed blend
prompts (every mode, 1-8 bases, varying LoRA sets); the server's memory plateaus and every re-run
of a prompt gives the same bytes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import soak  # noqa: E402  (bench/soak.py)


def test_mixed_prompts_plateau_in_memory_and_rerun_bit_identically(comfy_server, make_lora):
    names = []
    for i in range(8):
        make_lora(f"soak_{i}.safetensors", seed=300 + i, alpha_ref=1e-4 * (1 + i % 3))
        names.append(f"soak_{i}.safetensors")
    out = soak.soak(comfy_server, names, n_prompts=36)  # a warm-up pass of 12, then two of 12 compared
    print(f"growth {out['growth_bytes'] / 2**20:.1f} MB of {out['first_half_level'] / 2**20:.0f} MB")
    assert out["mismatches"] == 0
    assert out["plateau"], (out["growth_bytes"], out["first_half_level"])


def test_two_clients_with_interrupts_and_deletions_get_their_isolated_results(comfy_server, make_lora):
    """The load test, small (12 prompts; the full 200 is ``bench/soak.py --load``): two clients at once, mixed blend
    and SMC prompts, long prompts interrupted by id while they run, prompts deleted while they wait.
    Every completed prompt gives the bytes of its run alone, every targeted one reports interrupted (or
    finished first, identical), deleted ones never run, nothing else fails, the server still serves."""
    names = []
    for i in range(8):
        make_lora(f"soak_{i}.safetensors", seed=300 + i, alpha_ref=1e-4 * (1 + i % 3))
        names.append(f"soak_{i}.safetensors")
    out = soak.load(comfy_server, names, n_prompts=12, seed=3, pool_size=5, smc_size=1, long_size=2, long_steps=12)
    assert not out["failures"], out["failures"]
    assert out["errors"] == 0 and out["mismatches"] == 0 and out["interrupted_untargeted"] == 0
    assert out["alive_and_identical"]
    assert out["completed"] + out["interrupted"] + out["deleted"] == out["prompts"]
    assert out["interrupted"] >= 1 and out["deleted"] >= 1  # the seed draws both kinds of event
