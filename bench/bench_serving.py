"""Solve time and predicted throughput of the many-streams planner (graphsplit.batching,
graphsplit.replicas) on synthetic but format-valid tables with a batch grid.

    python bench/bench_serving.py          # the table in docs/splitter.md ("Many streams")
    python bench/bench_serving.py --quick  # the small rows only
    python bench/bench_serving.py --size 32x5x32  # other sizes (blocks x nodes x streams)

Nodes: random speeds 0.5-2x, memory 30-120 % of the model each, random directed links 0.1-3 ms /
1-40 Gbit/s (bench_split.make_cluster), every block and head given a batch grid 1, 2, 4, 8, 16
with a decode step of b streams costing (1 + 0.08 (b - 1)) x the batch-1 time (memory-bound:
the weights are read once per step). Every tok/s printed is predicted by the cost model from
these tables; every time is this machine's wall clock for the solve (it varies up to 2x with the
host: compare the inner solves, solve_serving calls, a deterministic count).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_split import make_cluster  # noqa: E402
from graphsplit.batching import solve_serving  # noqa: E402
from graphsplit.costmodel import Workload  # noqa: E402
from graphsplit.replicas import solve_replicas  # noqa: E402

GRID = [1, 2, 4, 8, 16]


def with_batch_grid(cluster, slope=0.08):
    for n in cluster.nodes:
        t = n.table
        t.decode_batch = list(GRID)
        for r in t.rows:
            if r.kind in ("block", "head"):
                r.decode_batch_s = [[d * (1 + slope * (b - 1)) for b in GRID] for d in r.decode_s]
    return cluster


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", action="append", metavar="LxDxB",
                    help="blocks x nodes x streams instead of the table's rows (repeatable)")
    args = ap.parse_args(argv)
    rows = [(32, 4, 8), (32, 4, 32), (80, 8, 8)] if not args.quick else [(32, 4, 8)]
    if args.size:
        rows = [tuple(int(x) for x in s.split("x")) for s in args.size]
    print("| runtime | size | streams | plan | tok/s (predicted) | micro-batch | replicas | "
          "proven | solve s | inner solves |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for L, D, B in rows:
        c = with_batch_grid(make_cluster(L, D, seed=3, mem_lo=0.3, mem_hi=1.2))
        wl = Workload(prompt_tokens=512, context_tokens=1024, streams=B)
        for rt in ("mlx-pipeline", "exo-current", "exo-legacy"):
            t0 = time.perf_counter()
            res, w = solve_serving(c, wl, rt)
            dt = time.perf_counter() - t0
            print(f"| {rt} | {L} x {D} | {B} | one pipeline | {1 / res.fun:.1f} | {w.batch} | 1 "
                  f"| {res.proven} | {dt:.2f} | 1 |", flush=True)
            if D > 4 and args.quick:
                continue
            t0 = time.perf_counter()
            rr = solve_replicas(c, wl, rt)
            dt = time.perf_counter() - t0
            print(f"| {rt} | {L} x {D} | {B} | replicas auto | {rr.throughput_tps:.1f} | "
                  f"{'/'.join(str(r.workload.batch) for r in rr.replicas)} | "
                  f"{len(rr.replicas)} ({'/'.join(str(r.streams) for r in rr.replicas)}) | "
                  f"{rr.result.proven}"
                  + (f", gap {rr.result.gap:.1%}" if rr.result.gap else "")
                  + f" | {dt:.2f} | {rr.result.nit} |", flush=True)


if __name__ == "__main__":
    main()
