"""Brute-force oracle for hybrid plans: every sequence of disjoint groups, every chain order of
each group, every share vector, every set of cut points, each priced by the reference model
(graphsplit.costmodel.predict -> graphsplit.hybrid.costs). Shares no code with the search's
arrays. For tests on small cases only (3-4 nodes, a few layers, a few KV heads).
"""

from __future__ import annotations

import itertools
import time

from graphsplit.costmodel import Workload, objective_value, predict
from graphsplit.hybrid.costs import model_dims
from graphsplit.hybrid.shares import share_vectors, tensor_stage
from graphsplit.plan import Stage
from graphsplit.result import SplitResult


def _kinds(cluster, n_kv: int, tp_shares: str):
    """Every stage kind: (members in chain order, shares or None)."""
    out = [((d,), None) for d in sorted(cluster.ids)]
    for (group, op) in sorted(cluster.collectives):
        if op != "all_sum" or len(group) > n_kv:
            continue
        for order in itertools.permutations(group):
            for sh in share_vectors(n_kv, len(group), tp_shares):
                out.append((order, sh))
    return out


def all_hybrid_plans(cluster, n_layers: int, tp_shares: str = "any", use_all: bool = False):
    n_kv, inter, _ = model_dims(cluster)
    kinds = _kinds(cluster, n_kv, tp_shares)
    D = len(cluster.ids)

    def seqs(used: frozenset, depth: int):
        yield []
        if depth == 0:
            return
        for order, sh in kinds:
            if used & set(order):
                continue
            for rest in seqs(used | set(order), depth - 1):
                yield [(order, sh)] + rest

    for seq in seqs(frozenset(), min(D, n_layers)):
        if not seq or (use_all and sum(len(o) for o, _ in seq) != D):
            continue
        k = len(seq)
        for cuts in itertools.combinations(range(1, n_layers), k - 1):
            b = (0,) + cuts + (n_layers,)
            yield [Stage(o[0], b[i], b[i + 1]) if sh is None else
                   tensor_stage(o, sh, b[i], b[i + 1], inter)
                   for i, (o, sh) in enumerate(seq)]


def brute_force_hybrid(cluster, objective: str = "latency", workload: Workload = Workload(),
                       tp_shares: str = "any", use_all_nodes: bool = False) -> SplitResult:
    """Exhaustive minimum of the objective over every feasible hybrid plan (mlx-pipeline)."""
    t0 = time.perf_counter()
    best, best_st, n = float("inf"), None, 0
    for stages in all_hybrid_plans(cluster, cluster.n_layers, tp_shares, use_all_nodes):
        n += 1
        pr = predict(cluster, stages, workload, "mlx-pipeline")
        if not pr.fits:
            continue
        v = objective_value(pr, objective, workload)
        if v < best * (1 - 1e-12):
            best, best_st = v, stages
    return SplitResult(best_st, best, True, 0 if best_st else 2, f"exhaustive over {n} plans",
                       "hybrid-brute-force", time.perf_counter() - t0, n)
