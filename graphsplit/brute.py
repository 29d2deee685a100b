"""Brute-force oracle: every node order, every node subset, every set of cut points.

Evaluates each candidate with the reference cost model (`graphsplit.costmodel.predict`), so it
shares no code with the solvers' dense arrays. O(sum_k P(D, k) C(L-1, k-1)) plans: for tests on
small cases only (D <= 5, L <= 10).
"""

from __future__ import annotations

import itertools
import time
from typing import Sequence

from graphsplit.costmodel import Workload, objective_value, predict
from graphsplit.plan import Stage
from graphsplit.result import ALL_ORDERS, GIVEN_ORDER, SplitResult


def all_plans(ids: Sequence[str], n_layers: int, use_all_nodes: bool = False,
              fixed_order: bool = False):
    """Yield every stage list (ordered distinct nodes, contiguous non-empty ranges)."""
    D = len(ids)
    sizes = [D] if use_all_nodes else range(1, D + 1)
    for k in sizes:
        if k > n_layers:
            continue
        seqs = itertools.combinations(ids, k) if fixed_order else itertools.permutations(ids, k)
        for seq in seqs:
            for cuts in itertools.combinations(range(1, n_layers), k - 1):
                bounds = (0,) + cuts + (n_layers,)
                yield [Stage(n, bounds[i], bounds[i + 1]) for i, n in enumerate(seq)]


def brute_force(cluster, objective: str = "latency", workload: Workload = Workload(),
                runtime: str = "exo-current", use_all_nodes: bool = False,
                fixed_order: bool = False) -> SplitResult:
    """Exhaustive minimum of the objective over feasible plans (pareto: the frontier in extra):
    over every order and subset, or with fixed_order over subsequences of the node order."""
    t0 = time.perf_counter()
    best, best_stages, n = float("inf"), None, 0
    points = []
    for stages in all_plans(cluster.ids, cluster.n_layers, use_all_nodes, fixed_order):
        n += 1
        pr = predict(cluster, stages, workload, runtime)
        if not pr.fits:
            continue
        if objective == "pareto":
            points.append((pr.tpot_s, pr.bottleneck_s, stages))
            v = pr.tpot_s
        else:
            v = objective_value(pr, objective, workload)
        if v < best:
            best, best_stages = v, stages
    extra = {}
    if objective == "pareto":
        pts = sorted(points, key=lambda x: (x[0], x[1]))
        front = []
        for s, m, st in pts:
            if front and s <= front[-1][0] * (1 + 1e-9):  # equal sums up to rounding
                if m < front[-1][1] * (1 - 1e-9):
                    front[-1] = (s, m, st)
            elif not front or m < front[-1][1] * (1 - 1e-9):
                front.append((s, m, st))
        extra["frontier"] = [{"tpot_s": s, "bottleneck_s": m, "stages": st}
                             for s, m, st in front]
    proven = GIVEN_ORDER if fixed_order else ALL_ORDERS
    if best_stages is None:
        return SplitResult(None, float("inf"), True, 2, "infeasible", "brute-force",
                           time.perf_counter() - t0, n, extra, proven=proven)
    return SplitResult(best_stages, best, True, 0, f"exhaustive over {n} plans", "brute-force",
                       time.perf_counter() - t0, n, extra, proven=proven)
