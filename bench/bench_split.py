"""Solve-time benchmark of the splitter's solvers (synthetic but format-valid cost tables).

    python bench/bench_split.py            # the table in docs/splitter.md
    python bench/bench_split.py --quick    # skips the slowest rows (126 x 12 bitmask)
    python bench/bench_split.py --full     # adds the MILP on a 4,000-operation DAG

Chain solvers on L layers x D heterogeneous nodes (random speeds 0.5-2x, memory 15-50 % of the
model each, random directed links 0.1-3 ms / 1-40 Gbit/s), and the MILP on transformer DAGs with
attention / MLP sub-blocks and residual edges (V = 2 L + 2 operations) split over 4 devices.
PiPPy reports 0.2-3.1 s for its graph-split MILP on 1K-4K node graphs with 2-4 stages.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from costtables import MiB, make_table  # noqa: E402
from graphsplit.cluster import cluster_from_tables  # noqa: E402
from graphsplit.costmodel import Workload  # noqa: E402
from graphsplit.graph import build_graph  # noqa: E402
from graphsplit.solve_dp import solve_bitmask, solve_fixed_order  # noqa: E402
from graphsplit.solve_milp import solve_milp  # noqa: E402


def make_cluster(L: int, D: int, seed: int = 2, mem_lo=0.15, mem_hi=0.5):
    rnd = random.Random(seed)
    tabs = {}
    for i in range(D):
        s = rnd.uniform(0.5, 2)
        tabs[f"n{i:02d}"] = make_table(
            f"n{i:02d}", L, decode_s=[0.01 * s * rnd.uniform(0.95, 1.05) for _ in range(L)],
            weight_bytes=400 * MiB, memory_usable=int(rnd.uniform(mem_lo, mem_hi) * L * 400 * MiB))
    links = {(a, b): {"latency_ms": rnd.uniform(0.1, 3), "bandwidth_gbps": rnd.uniform(1, 40)}
             for a in tabs for b in tabs if a != b}
    return cluster_from_tables(tabs, links=links)


def row(name, size, objective, res, dt):
    n_st = len(res.stages) if res.stages else "-"
    print(f"| {name:<16} | {size:<22} | {objective:<10} | {dt:8.3f} | "
          f"{'yes' if res.optimal and res.status == 0 else 'no':<7} | {n_st!s:>6} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true", help="also the MILP on a 4,000-operation "
                    "DAG")
    args = ap.parse_args(argv)
    w = Workload(prompt_tokens=512, context_tokens=1024, streams=8)
    # Our own pipeline runtime: under exo-current one batch crosses every stage, so its
    # "throughput" objective is latency again and would not exercise the min-max search.
    rt = "mlx-pipeline"
    print("| solver           | size                   | objective  | solve s  | optimal | stages |")
    print("|------------------|------------------------|------------|----------|---------|--------|")
    for L, D in ((32, 4), (80, 8), (126, 12)):
        c = make_cluster(L, D)
        size = f"{L} layers x {D} nodes"
        for obj in ("latency", "throughput"):
            t = time.perf_counter()
            r = solve_fixed_order(c, obj, w, runtime=rt)
            row("fixed-order DP", size, obj, r, time.perf_counter() - t)
        for obj in ("latency", "ttft", "throughput"):
            if D >= 12 and args.quick:
                continue
            t = time.perf_counter()
            r = solve_bitmask(c, obj, w, runtime=rt)
            row("bitmask DP", size, obj, r, time.perf_counter() - t)
    sizes = (499,) if args.quick else ((499, 999, 1999) if args.full else (499, 999))
    for L in sizes:
        c = make_cluster(L, 4, seed=3, mem_lo=0.3, mem_hi=0.6)
        g = build_graph(c, w, sub_blocks=True)
        devs = c.ids
        for obj in ("latency", "throughput"):
            t = time.perf_counter()
            r = solve_milp(g, c, devs, obj, w, time_limit=120)
            dt = time.perf_counter() - t
            row("MILP (HiGHS)", f"DAG {g.number_of_nodes()} ops, 4 stages", obj, r, dt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
