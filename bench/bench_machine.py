#!/usr/bin/env python
"""How steady is this machine? The same fixed computation, timed back to back for a while.

    python bench/bench_machine.py                 # 30 s
    python bench/bench_machine.py --seconds 120 --window 5

Every accuracy target of the benchmarks (rows within 5 % of the whole, testbed runs within
10-15 % of their predictions) assumes that the machine runs the same work in the same time
from one minute to the next. This script measures whether it does: a fixed MLX computation
(decode-shaped: a 1 x 1024 activation through four 1024 x 4096 / 4096 x 1024 float32 weight
pairs, ~50 MB of weights read per sample, one `mx.eval`, one thread) is timed back to back,
wall clock and CPU time of this process side by side. It prints the spread of the samples
(min, p10, median, p90, max, as multiples of the fastest), the same per time window (so slow
phases show as windows, not as scattered outliers), and how much of the wall time was not
this process's CPU time (other processes or the scheduler took the core).

When CPU time moves with wall time, the core itself ran slower (on a shared VM: the host's
other tenants, memory-bandwidth contention or SMT siblings), which nothing inside the VM can
see or remove. Everything printed is measured, or derived from the samples (quantiles,
ratios).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def quantile(s: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted list."""
    return s[min(len(s) - 1, max(0, int(q * (len(s) - 1) + 0.5)))]


def quantiles(v: list[float]) -> tuple[float, float]:
    """p10, p90 (nearest rank) of an unsorted list: the spread the benchmarks print."""
    s = sorted(v)
    return quantile(s, 0.1), quantile(s, 0.9)


def samples(seconds: float) -> list[tuple[float, float, float]]:
    """(start since the first sample, wall s, CPU s) of each run of the fixed computation."""
    import mlx.core as mx

    mx.random.seed(0)
    a = mx.random.normal((1024, 4096))
    ws = [mx.random.normal((4096, 1024)) for _ in range(4)]
    x = mx.random.normal((1, 1024))
    mx.eval(a, x, *ws)

    def job():
        h = x
        for _ in range(2):
            for w in ws:
                h = mx.tanh((h @ a) @ w)
        mx.eval(h)

    for _ in range(3):  # warm-up
        job()
    out = []
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        job()
        out.append((t0 - t_start, time.perf_counter() - t0, time.process_time() - c0))
    return out


def summary(out) -> dict:
    """Quantiles of the samples' wall times as multiples of the fastest (derived)."""
    walls = sorted(w for _, w, _ in out)
    fast = walls[0]
    cpu = sum(c for _, _, c in out)
    wall = sum(w for _, w, _ in out)
    return {"samples": len(out), "min_ms": 1e3 * fast,
            "p10": quantile(walls, 0.1) / fast, "median": statistics.median(walls) / fast,
            "p90": quantile(walls, 0.9) / fast, "max": walls[-1] / fast,
            "not_cpu": 1 - cpu / wall if wall else 0.0}


def steadiness(seconds: float = 8.0) -> dict:
    """The probe for other benchmarks: `seconds` of samples, their summary (see `report`).
    Each benchmark runs it before and after its measurements and prints `line()` of both, so
    that its table says how steady the machine was while it ran."""
    return summary(samples(seconds))


def line(s: dict, when: str) -> str:
    return (f"machine steadiness {when} (bench/bench_machine.py, {s['samples']} samples of a "
            f"fixed computation): median {s['median'] * s['min_ms']:.1f} ms = "
            f"{s['median']:.2f}x its fastest ({s['min_ms']:.1f} ms), p90 {s['p90']:.2f}x "
            f"(measured; 1.00x = perfectly steady; compare the medians in ms across lines)")


def report(out, window: float) -> dict:
    """Print the summary and the per-window table; return the summary."""
    fast = min(w for _, w, _ in out)
    sm = summary(out)
    print(f"{len(out)} samples of one fixed computation, fastest {1e3 * fast:.1f} ms (measured); "
          f"as multiples of the fastest (derived): p10 {sm['p10']:.2f}  median "
          f"{sm['median']:.2f}  p90 {sm['p90']:.2f}  max {sm['max']:.2f}; "
          f"{100 * sm['not_cpu']:.1f}% of the wall time was not this process's CPU time")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover (rich is a dependency)
        return sm
    t = Table(title=f"per {window:g} s window (medians as multiples of the fastest sample)")
    for col in ("window s", "samples", "median", "min", "max", "CPU / wall"):
        t.add_column(col, justify="right")
    k = 0
    while k * window < out[-1][0] + 1e-9:
        sel = [(w, c) for s, w, c in out if k * window <= s < (k + 1) * window]
        if sel:
            ws = [w for w, _ in sel]
            t.add_row(f"{k * window:g}-{(k + 1) * window:g}", str(len(sel)),
                      f"{statistics.median(ws) / fast:.2f}", f"{min(ws) / fast:.2f}",
                      f"{max(ws) / fast:.2f}", f"{sum(c for _, c in sel) / sum(ws):.2f}")
        k += 1
    Console().print(t)
    return sm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="how long to sample (> 0)")
    ap.add_argument("--window", type=float, default=3.0, help="seconds per table row (> 0)")
    args = ap.parse_args(argv)
    if not args.seconds > 0 or not args.window > 0:
        print("bench_machine: --seconds and --window must be positive numbers", file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    print(f"python bench/bench_machine.py --seconds {args.seconds:g} --window {args.window:g}"
          f"   (load average {load:.2f} on {os.cpu_count()} cores at start)")
    report(samples(args.seconds), args.window)
    return 0


if __name__ == "__main__":
    sys.exit(main())
