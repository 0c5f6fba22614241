"""Shared timing for the benchmarks in ``bench/`` (run as scripts: this folder is on ``sys.path``)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_ratios(reference: Callable[[], object], variants: dict[str, Callable[[], object]], rounds: int,
                  warmup: int = 1) -> tuple[float, dict[str, float]]:
    """Median seconds of ``reference`` and, per variant, the median over ``rounds`` of
    ``time(variant) / time(reference)`` with the two timed back to back in each round -- on a
    shared, throttled machine the ratio of neighbouring calls drifts far less than either time."""
    for fn in (reference, *variants.values()):
        for _ in range(warmup):
            fn()
    base_times, ratios = [], {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            reference()
            t1 = time.perf_counter()
            fn()
            t2 = time.perf_counter()
            base_times.append(t1 - t0)
            ratios[name].append((t2 - t1) / (t1 - t0))
    return statistics.median(base_times), {name: statistics.median(r) for name, r in ratios.items()}
