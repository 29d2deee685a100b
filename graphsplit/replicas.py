"""Replicas: split the nodes into k independent pipelines, each serving a share of the streams.

Problem. Given D nodes and B streams, choose a set partition of (a subset of) the nodes into
replicas A_1..A_k, each replica's split (node order, subset, layer ranges, micro-batch) and its
streams b_j (sum b_j = B) to maximise the total throughput sum_j f(A_j, b_j), where f(A, b) is
the best single-pipeline throughput over the nodes of A serving b streams under the runtime's
batching pattern (graphsplit.batching.solve_serving; f(A, 0) = 0: a replica with no streams is
not run). Replicas share nothing: no stage of one talks to another, each holds the KV of its own
streams, and current exo runs each as its own instance.

Method (exact). f(A, b) for every node set A up to symmetry and every b = 1..B (the inner
solver; a set that cannot hold the model at b streams cannot at more, so b stops there); then
every set partition of the nodes (Bell(D) of them, e.g. 4,140 for 8 nodes) up to symmetry, each
with its optimal stream shares by a knapsack DP over its blocks (O(k B^2)). Symmetry: two nodes
are interchangeable when swapping them changes nothing (same cost table, same memory, same links
to every other node and to each other); within a class any permutation is an automorphism, so
f(A, b) depends only on how many nodes of each class A holds, and a partition only on the
multiset of those count vectors. Exact (label of the inner solver: all orders and subsets for
the bitmask DP) when the distinct node sets times B stays within `max_solves`.

Method (bound), beyond that size: k = 1..D replicas of nodes dealt in speed order (snake order,
fastest first), each solved exactly and the streams shared optimally; the best is returned with
an upper bound on any plan's throughput, sum_d 1 / (L x c_d), c_d node d's cheapest per-token
block time over the batches it could run (each token needs all L blocks once; node d spends at
least c_d per block-token) and B / L_1 (a stream's token needs every block in turn, at least
L_1, the fastest node's batch-1 time per block summed), and the gap to it.

Complexity: (distinct sets x B) inner solves + Bell(D) x k B^2 for the partitions.
Reference: set partitions enumerated by restricted growth strings (Knuth, TAOCP 7.2.1.5).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

from graphsplit.batching import (Serving, batch_grid, max_batch, proven_label, serving_for,
                                 solve_serving)
from graphsplit.costmodel import Prediction, Workload, predict
from graphsplit.plan import Stage
from graphsplit.result import SplitResult
from profiler.errors import UserError

MAX_SOLVES = 200  # exact search: distinct node sets x B inner solves at most
EXACT_MAX_NODES = 10  # and Bell(10) = 115,975 set partitions


@dataclass
class Replica:
    """One independent pipeline: its nodes, split, streams and their prediction."""
    stages: list[Stage]
    streams: int
    workload: Workload
    prediction: Prediction
    serving: Serving

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.__dict__.copy() for s in self.stages], "streams": self.streams,
                "serving": self.serving.to_dict(),
                "predicted": {**self.prediction.to_dict(),
                              "derived_from": "measured cost tables"}}


@dataclass
class ReplicaResult:
    replicas: list[Replica]
    result: SplitResult  # stages = replicas[0].stages, fun = 1 / total throughput

    @property
    def throughput_tps(self) -> float:
        return sum(r.prediction.throughput_tps for r in self.replicas)


def subcluster(cluster, ids: Sequence[str]):
    """The cluster restricted to the nodes `ids` (links kept)."""
    keep = set(ids)
    return replace(cluster, nodes=[n for n in cluster.nodes if n.id in keep])


def node_classes(cluster) -> dict[str, int]:
    """Node id -> class index; nodes of one class are interchangeable (module docstring)."""
    ids = sorted(cluster.ids)

    def same(u: str, v: str) -> bool:
        nu, nv = cluster.node(u), cluster.node(v)
        if nu.table is not nv.table and _costs(nu.table) != _costs(nv.table):
            return False
        if nu.memory_bytes != nv.memory_bytes or cluster.link(u, v) != cluster.link(v, u):
            return False
        return all(cluster.link(u, x) == cluster.link(v, x) and
                   cluster.link(x, u) == cluster.link(x, v) for x in ids if x not in (u, v))

    cls: dict[str, int] = {}
    reps: list[str] = []
    for u in ids:
        for c, r in enumerate(reps):
            if same(u, r):
                cls[u] = c
                break
        else:
            cls[u] = len(reps)
            reps.append(u)
    return cls


def _costs(table) -> tuple:
    """Everything of a table the cost model reads (not the host's name): rows with every
    measured field (batch grids included), the grids, the model, the device's numbers."""
    d = table.device
    return (repr([sorted(vars(r).items()) for r in table.rows]), table.prefill_tokens,
            table.decode_context, repr(getattr(table, "decode_batch", None)),
            repr(table.model), d.memory_bandwidth_gbs, d.matmul_tflops,
            d.memory_usable_bytes, d.memory_total_bytes)


def set_partitions(items: Sequence[str]) -> Iterator[list[list[str]]]:
    """Every set partition of `items` (restricted growth strings), blocks in first-item order."""
    n = len(items)
    if n == 0:
        yield []
        return
    a = [0] * n

    def rec(i: int, k: int):
        if i == n:
            blocks = [[] for _ in range(k)]
            for x, b in zip(items, a):
                blocks[b].append(x)
            yield blocks
            return
        for b in range(k + 1):
            a[i] = b
            yield from rec(i + 1, max(k, b + 1))

    yield from rec(1, 1) if n > 1 else iter([[list(items)]])


class _Table:
    """f(A, b): the best single pipeline on node set A for b streams (cached up to symmetry)."""

    def __init__(self, cluster, workload: Workload, runtime: str, micro_batch, use_all, solver):
        self.cluster, self.workload, self.runtime = cluster, workload, runtime
        self.micro_batch, self.use_all, self.solver = micro_batch, use_all, solver
        self.cls = node_classes(cluster)
        self.n_cls = max(self.cls.values()) + 1
        self.cache: dict[tuple, list] = {}  # key -> [None] + per b: (thr, result, wl) or None
        self.solves, self.labels = 0, set()

    def key(self, ids: Sequence[str]) -> tuple:
        v = [0] * self.n_cls
        for x in ids:
            v[self.cls[x]] += 1
        return tuple(v)

    def canonical(self, ids: Sequence[str]) -> list[str]:
        """The first nodes of each class (sorted ids) in the counts of `ids`."""
        want = list(self.key(ids))
        out = []
        for x in sorted(self.cluster.ids):
            if want[self.cls[x]]:
                want[self.cls[x]] -= 1
                out.append(x)
        return out

    def row(self, ids: Sequence[str]) -> list:
        k = self.key(ids)
        if k in self.cache:
            return self.cache[k]
        canon = self.canonical(ids)
        sub = subcluster(self.cluster, canon)
        out: list = [None]
        for b in range(1, self.workload.streams + 1):
            wl = replace(self.workload, streams=b, batch=1)
            mb = min(self.micro_batch, b) if self.micro_batch else None
            seeds = [out[-1][1].stages] if out[-1] else []  # b - 1's plan: a first incumbent
            r, wl = solve_serving(sub, wl, self.runtime, mb, self.use_all, self.solver, seeds)
            self.solves += 1
            if r is None or r.stages is None:
                out += [None] * (self.workload.streams + 1 - len(out))
                break
            self.labels.add(proven_label(r))
            cycle = predict(sub, r.stages, wl, self.runtime).cycle_s
            out.append((1.0 / r.fun if r.fun > 0 else math.inf, r, wl, canon, cycle))
        self.cache[k] = out
        return out


def _share(rows: list[list], B: int, at_least_one: bool):
    """Knapsack: max sum_j thr_j(b_j) subject to sum_j b_j = B; among equal sums (relative
    1e-9) the smaller slowest per-stream cycle. Returns (total, [b_j]) or (-inf, None).
    O(k B^2)."""
    NEG = (-math.inf, -math.inf)
    best = [(0.0, 0.0)] + [NEG] * B  # streams used -> (total tok/s, -max cycle)
    choice = []
    for row in rows:
        nb, ch = [NEG] * (B + 1), [0] * (B + 1)
        for used in range(B + 1):
            if best[used] == NEG:
                continue
            for b in range(1 if at_least_one else 0, B - used + 1):
                if b and not row[b]:
                    continue
                cand = (best[used][0] + (row[b][0] if b else 0.0),
                        min(best[used][1], -row[b][4]) if b else best[used][1])
                if _better(cand, nb[used + b]):
                    nb[used + b], ch[used + b] = cand, b
        choice.append(ch)
        best = nb
    if best[B] == NEG:
        return -math.inf, None
    shares, left = [], B
    for ch in reversed(choice):  # walk back: the share each block took
        shares.append(ch[left])
        left -= ch[left]
    return best[B][0], list(reversed(shares))


def _better(a: tuple, b: tuple) -> bool:
    if b[0] == -math.inf:
        return a[0] > -math.inf
    if abs(a[0] - b[0]) > 1e-9 * max(abs(a[0]), abs(b[0])):
        return a[0] > b[0]
    return a[1] > b[1] + 1e-12 * abs(b[1])


def _replica(cluster, runtime: str, entry, streams: int) -> Replica:
    thr, r, wl, canon, _ = entry
    return Replica(stages=list(r.stages), streams=streams, workload=wl,
                   prediction=predict(cluster, r.stages, wl, runtime),
                   serving=r.extra["serving"])


def _relabel(stages: list[Stage], mapping: dict[str, str]) -> list[Stage]:
    return [Stage(mapping[s.node], s.start_layer, s.end_layer) for s in stages]


def throughput_upper_bound(cluster, workload: Workload, runtime: str) -> float:
    """min(sum_d 1 / (L c_d), B / L_1): no plan, with any replicas, exceeds it (module
    docstring; L_1 the fastest node's batch-1 time per block summed: a stream's token needs
    every block in turn, so it comes at most once per L_1)."""
    from graphsplit.batching import _fastest_sum, decode_seconds
    cap = max_batch(runtime) or workload.streams
    top = min(cap, workload.streams)
    C = workload.context_tokens
    total = 0.0
    for n in cluster.nodes:
        t = n.table
        bs = sorted({b for b in batch_grid(t) if b <= top} | {1, top})
        c = min(decode_seconds(t, t.row(f"layers.{i}"), C, b) / b
                for i in range(cluster.n_layers) for b in bs)
        total += math.inf if c <= 0 else 1.0 / (cluster.n_layers * c)
    l1 = _fastest_sum(cluster, replace(workload, batch=1), runtime)
    return min(total, workload.streams / l1 if l1 > 0 else math.inf)


def solve_replicas(cluster, workload: Workload, runtime: str, replicas: int | None = None,
                   micro_batch: int | None = None, use_all_nodes: bool = False,
                   solver: str = "auto", max_solves: int = MAX_SOLVES) -> ReplicaResult | None:
    """The best replicas (`replicas`: None = any k, else exactly that many); None if nothing
    fits. See the module docstring for the method and its exactness."""
    t0 = time.perf_counter()
    B, ids = workload.streams, sorted(cluster.ids)
    if replicas is not None and replicas > min(len(ids), B):
        raise UserError(f"--replicas {replicas}: {len(ids)} node(s) and {B} stream(s) make at "
                        f"most {min(len(ids), B)} replicas (each needs a node and a stream)")
    tab = _Table(cluster, workload, runtime, micro_batch, use_all_nodes, solver)
    sizes = [list(tab.cls.values()).count(c) for c in range(tab.n_cls)]
    n_sets = math.prod(s + 1 for s in sizes) - 1  # distinct node sets up to symmetry
    exact = len(ids) <= EXACT_MAX_NODES and n_sets * B <= max_solves
    parts = set_partitions(ids) if exact else _snake_partitions(cluster, ids, replicas)
    best = (-math.inf, None, None)
    seen = set()
    for blocks in parts:
        if replicas is not None and len(blocks) != replicas:
            continue
        canon = tuple(sorted(tab.key(b) for b in blocks))
        if canon in seen:
            continue
        seen.add(canon)
        rows = [tab.row(b) for b in blocks]
        total, shares = _share(rows, B, at_least_one=replicas is not None or use_all_nodes)
        if shares is not None and total > best[0] * (1 + 1e-12):
            best = (total, blocks, shares)
    total, blocks, shares = best
    if blocks is None:
        return None
    reps = []
    for blk, b, row in zip(blocks, shares, [tab.row(x) for x in blocks]):
        if b == 0:
            continue
        rep = _replica(cluster, runtime, row[b], b)
        # the cached plan runs on the canonical members of blk's classes: map them onto blk
        canon = row[b][3]
        mapping = dict(zip(canon, _by_class(tab, canon, blk)))
        rep.stages = _relabel(rep.stages, mapping)
        rep.prediction = predict(cluster, rep.stages, rep.workload, runtime)
        reps.append(rep)
    reps.sort(key=lambda r: (-r.streams, r.stages[0].node))
    total = sum(r.prediction.throughput_tps for r in reps)
    labels = tab.labels
    if exact:
        proven = "bound" if "bound" in labels else (
            "optimal-given-order" if "optimal-given-order" in labels
            else "optimal-all-orders-subsets")
        lb = (1.0 / total) if proven != "bound" else None
        how = (f"exact over {len(seen)} distinct node partition(s) (symmetry-reduced), "
               f"{tab.solves} inner solve(s)")
    else:
        proven = "bound"
        ub = throughput_upper_bound(cluster, workload, runtime)
        lb = 1.0 / ub if ub > 0 else None
        how = (f"best of {len(seen)} speed-ordered partition(s) ({n_sets} node sets x "
               f"{B} streams exceeds the exact search's {max_solves} solves); throughput "
               f"bound {ub:.4g} tok/s")
    msg = f"{len(reps)} replica(s) serving {', '.join(str(r.streams) for r in reps)} stream(s): {how}"
    res = SplitResult(reps[0].stages, 1.0 / total, proven != "bound", 0 if proven != "bound"
                      else 1, msg, "replicas", time.perf_counter() - t0, tab.solves,
                      {"replicas": reps}, proven=proven, lower_bound=lb,
                      gap=None if lb is None else (1.0 / total - lb) * total)
    return ReplicaResult(reps, res)


def _by_class(tab: _Table, canon: list[str], blk: list[str]) -> list[str]:
    """Members of blk matched to `canon` class by class (same order within a class)."""
    pool = {}
    for x in sorted(blk):
        pool.setdefault(tab.cls[x], []).append(x)
    return [pool[tab.cls[c]].pop(0) for c in canon]


def _snake_partitions(cluster, ids: Sequence[str], replicas: int | None):
    """k = 1..D groups of nodes dealt fastest first in snake order (the bound mode)."""
    speed = {n.id: sum(n.table.decode_time(r, 1) for r in n.table.blocks())
             for n in cluster.nodes}
    order = sorted(ids, key=lambda x: (speed[x], x))
    ks = [replicas] if replicas else range(1, len(ids) + 1)
    for k in ks:
        groups = [[] for _ in range(k)]
        for i, x in enumerate(order):
            r = i % (2 * k)
            groups[r if r < k else 2 * k - 1 - r].append(x)
        yield [g for g in groups if g]
