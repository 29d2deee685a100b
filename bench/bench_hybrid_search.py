"""Solve-time benchmark of the hybrid search (graphsplit.hybrid.search): tensor groups inside
a pipeline, on synthetic but format-valid cost tables with a tensor_parallel section
(tests/test_split_hybrid.py's `tp_section`) and a measured all-reduce for every group listed.

    python bench/bench_hybrid_search.py          # the table in docs/hybrid.md

Nodes alternate 1x / 2x / 3x block times; every pair (and, where named, every triple) of
nodes has a measured all_sum; 8 KV heads, so a pair has 7 share vectors, a triple 21. Each
row: the pure-pipeline optimum (bitmask DP), then the hybrid search seeded with it; what the
result is proven to be (graphsplit.result labels), the wall time, the plan.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from graphsplit.api import solve  # noqa: E402
from graphsplit.costmodel import Workload  # noqa: E402
from graphsplit.hybrid.search import solve_hybrid  # noqa: E402
from test_split_hybrid import cluster  # noqa: E402

ROWS = [(4, 32, 2), (4, 32, 4), (6, 32, 2), (6, 32, 3), (8, 32, 2), (10, 32, 2)]


def main() -> None:
    t = Table(title="hybrid search, this machine (derived from synthetic tables)")
    for col in ("nodes x layers", "groups up to", "objective", "pipeline s", "hybrid s",
                "proven", "gap", "plan"):
        t.add_column(col)
    w = Workload(64, 128, 4)
    for D, L, g in ROWS:
        ids = [f"n{i}" for i in range(D)]
        speeds = {n: 0.01 * (1 + i % 3) for i, n in enumerate(ids)}
        groups = [c for k in range(2, g + 1) for c in itertools.combinations(ids, k)]
        c = cluster(speeds, groups, L=L, n_kv=8, t8k=0.0002, t64k=0.0004)
        for obj in ("latency", "throughput"):
            t0 = time.perf_counter()
            pipe = solve(c, obj, w, "mlx-pipeline")
            t1 = time.perf_counter()
            r = solve_hybrid(c, obj, w, seed=pipe)
            t2 = time.perf_counter()
            plan = " ".join(("+".join(s.members)) + f"[{s.start_layer}:{s.end_layer}]"
                            + (f"({'/'.join(map(str, s.tensor.kv_heads))})" if s.tensor else "")
                            for s in r.stages)
            t.add_row(f"{D} x {L}", str(g), obj, f"{t1 - t0:.2f}", f"{t2 - t1:.2f}", r.proven,
                      f"{r.gap:.1%}", plan)
    Console(width=200).print(t)


if __name__ == "__main__":
    main()
