"""Honest timing of MLX work: warm-ups, repeats, synchronisation, median and spread.

MLX is lazy: nothing runs until `mx.eval`. Every timed call here builds the graph, evaluates
the outputs (and the KV-cache state it wrote), then `mx.synchronize()`s the device, so the
wall time covers the whole computation on CPU, Metal or CUDA.

`time_fn(fn, ...)` runs `warmup` untimed calls, then `repeats` timed ones; when the spread
(max - min) / median of a round is above `max_rel_spread`, it measures another round (up to
`max_rounds`) and keeps the round with the smallest spread. The result records every sample.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx


@dataclass
class Timing:
    median_s: float
    spread: float  # (max - min) / median of the kept round
    samples: list[float] = field(default_factory=list)
    rounds: int = 1  # rounds measured (> 1: the spread was too wide at first)


def sync() -> None:
    mx.synchronize()


def time_fn(fn: Callable[[], None], warmup: int = 1, repeats: int = 3,
            max_rel_spread: float = 0.15, max_rounds: int = 3,
            setup: Callable[[], None] | None = None, max_round_s: float = 60.0,
            clock: str = "wall") -> Timing:
    """Time `fn` (which must mx.eval what it computes). `setup` runs untimed before each call
    (e.g. to rewind a KV cache). A round that took longer than `max_round_s` is not repeated
    (seconds-long runs on a slow CPU: the spread then comes from other processes, and another
    round would cost minutes); its spread is recorded as measured.

    clock "wall" is time.perf_counter; "process" is time.process_time, the CPU time of every
    thread of this process: on MLX's CPU backend it equals wall time on an idle machine and
    leaves out the time other processes take from us (for shared machines; meaningless on
    GPU backends, where the work is not CPU time)."""
    now = time.process_time if clock == "process" else time.perf_counter
    for _ in range(max(warmup, 0)):
        if setup:
            setup()
        fn()
        sync()
    best: Timing | None = None
    for rnd in range(1, max(max_rounds, 1) + 1):
        samples = []
        for _ in range(max(repeats, 1)):
            if setup:
                setup()
            sync()
            t0 = now()
            fn()
            sync()
            samples.append(now() - t0)
        med = statistics.median(samples)
        spread = (max(samples) - min(samples)) / med if med > 0 else 0.0
        if best is None or spread < best.spread:
            best = Timing(med, spread, samples)
        best.rounds = rnd
        if spread <= max_rel_spread or sum(samples) > max_round_s:
            break
    return best
