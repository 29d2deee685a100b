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
    inner: int = 1  # calls per timed sample (each sample is their mean; see time_fn)


def sync() -> None:
    mx.synchronize()


def time_fn(fn: Callable[[], None], warmup: int = 1, repeats: int = 3,
            max_rel_spread: float = 0.15, max_rounds: int = 3,
            setup: Callable[[], None] | None = None, max_round_s: float = 60.0,
            clock: str = "wall", settle_s: float = 0.0, min_sample_s: float = 0.0,
            max_inner: int = 1, between: Callable[[], None] | None = None) -> Timing:
    """Time `fn` (which must mx.eval what it computes). `setup` runs untimed before each call
    (e.g. to rewind a KV cache). A round that took longer than `max_round_s` is not repeated
    (seconds-long runs on a slow CPU: the spread then comes from other processes, and another
    round would cost minutes); its spread is recorded as measured.

    clock "wall" is time.perf_counter; "process" is time.process_time, the CPU time of every
    thread of this process: on MLX's CPU backend it equals wall time on an idle machine and
    leaves out the time other processes take from us (for shared machines; meaningless on
    GPU backends, where the work is not CPU time).

    settle_s > 0 idles that long after `setup` and before the clock starts, so that each timed
    run starts as a pipeline stage does after waiting for its input. Under a CPU quota (cgroup
    CFS bandwidth, enforced at the scheduler tick) the CPU that the untimed setup used is
    otherwise repaid as throttling INSIDE the timed run: measured on a 0.9-core quota with a
    2 ms period, a ~7 ms decode block read 11.0 ms (median, 2.9 ms of it throttled) right after
    a 64 MiB cache flush, 9.5 ms after a 10-40 ms idle, 9.3 ms per block in an 8-block stage.

    min_sample_s > 0 with max_inner > 1: when one call is shorter than min_sample_s (judged
    from the last warm-up), each timed sample makes up to `max_inner` calls back to back
    (`between` runs before each, inside the clock: keep it cheap, e.g. a KV-cache rewind) and
    records their mean. The other side of the quota: a run that starts after an idle may
    overrun its quota by up to a tick and repay it after the clock stops, so one short call
    reads faster than the same work inside a longer stage (0.25-core quota, 4 ms period: one
    ~37 ms decode block 37.1 ms median, 8 calls per sample 39.4 ms per call, the 8-block stage
    40.3 ms per block)."""
    now = time.process_time if clock == "process" else time.perf_counter
    last = None
    for _ in range(max(warmup, 0)):
        if setup:
            setup()
        t0 = now()
        fn()
        sync()
        last = now() - t0
    inner = 1
    if min_sample_s > 0 and max_inner > 1 and last is not None and last < min_sample_s:
        inner = min(max_inner, max(1, int(-(-min_sample_s // max(last, 1e-9)))))
    best: Timing | None = None
    for rnd in range(1, max(max_rounds, 1) + 1):
        samples = []
        for _ in range(max(repeats, 1)):
            if setup:
                setup()
            sync()
            if settle_s > 0:
                time.sleep(settle_s)
            t0 = now()
            for k in range(inner):
                if k and between:
                    between()
                fn()
            sync()
            samples.append((now() - t0) / inner)
        med = statistics.median(samples)
        spread = (max(samples) - min(samples)) / med if med > 0 else 0.0
        if best is None or spread < best.spread:
            best = Timing(med, spread, samples, inner=inner)
        best.rounds = rnd
        if spread <= max_rel_spread or sum(samples) * inner > max_round_s:
            break
    return best
