"""The search over node partitions: best first with lazily solved values, the stream-sharing
knapsack, and the speed-ordered fallback beyond the exact size (see the package docstring)."""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

from graphsplit.batching import Serving
from graphsplit.costmodel import Prediction, Workload, predict
from graphsplit.plan import Stage
from graphsplit.replicas.bounds import throughput_upper_bound
from graphsplit.replicas.nodes import set_partitions
from graphsplit.replicas.table import _Table
from graphsplit.result import SplitResult
from profiler.errors import UserError

MAX_WORK = 50_000  # the best-first search stops (labelled bound) past this much inner work
EXACT_MAX_NODES = 10  # and Bell(10) = 115,975 set partitions to enumerate
MAX_PARTITIONS = 5000  # distinct partitions (up to symmetry) the best-first search ranks


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


def solve_replicas(cluster, workload: Workload, runtime: str, replicas: int | None = None,
                   micro_batch: int | None = None, use_all_nodes: bool = False,
                   solver: str = "auto", max_work: int = MAX_WORK) -> ReplicaResult | None:
    """The best replicas (`replicas`: None = any k, else exactly that many); None if nothing
    fits. See the module docstring for the method and its exactness."""
    t0 = time.perf_counter()
    B, ids = workload.streams, sorted(cluster.ids)
    if replicas is not None and replicas > min(len(ids), B):
        raise UserError(f"--replicas {replicas}: {len(ids)} node(s) and {B} stream(s) make at "
                        f"most {min(len(ids), B)} replicas (each needs a node and a stream)")
    tab = _Table(cluster, workload, runtime, micro_batch, use_all_nodes, solver)
    need_one = replicas is not None or use_all_nodes
    parts = _distinct_partitions(tab, ids, replicas)
    if parts is not None:
        found = _best_first(tab, parts, B, need_one, max_work)
    else:
        found = _snake(tab, cluster, ids, replicas, B, need_one)
    total, blocks, shares, upper, how = found
    if blocks is None:
        return None
    reps = _replicas_of(tab, cluster, runtime, blocks, shares)
    total = sum(r.prediction.throughput_tps for r in reps)
    labels = tab.labels
    if upper is None:  # proven: the best partition, its shares and splits exact
        proven = "bound" if "bound" in labels else (
            "optimal-given-order" if "optimal-given-order" in labels
            else "optimal-all-orders-subsets")
    else:
        proven = "bound"
    if proven == "bound":
        upper = min(upper if upper is not None else math.inf,
                    throughput_upper_bound(cluster, workload, runtime))
        lb = min(1.0 / upper, 1.0 / total) if 0 < upper < math.inf else None
        how += f"; throughput bound {upper:.4g} tok/s"
    else:
        lb = 1.0 / total
    shares = ", ".join(str(r.streams) for r in reps)
    msg = f"{len(reps)} replica(s) serving {shares} stream(s): {how}"
    res = SplitResult(reps[0].stages, 1.0 / total, proven != "bound", 0 if proven != "bound"
                      else 1, msg, "replicas", time.perf_counter() - t0, tab.solves,
                      {"replicas": reps}, proven=proven, lower_bound=lb,
                      gap=None if lb is None else (1.0 / total - lb) * total)
    return ReplicaResult(reps, res)


def _replicas_of(tab: _Table, cluster, runtime: str, blocks, shares) -> list[Replica]:
    """The chosen partition's replicas, each cached plan mapped onto its block's own nodes."""
    reps = []
    for blk, b in zip(blocks, shares):
        if b == 0:
            continue
        e = tab.entry(blk, b)
        rep = _replica(cluster, runtime, e, b)
        # the cached plan runs on the canonical members of blk's classes: map them onto blk
        canon = e[3]
        rep.stages = _relabel(rep.stages, dict(zip(canon, _by_class(tab, canon, blk))))
        rep.prediction = predict(cluster, rep.stages, rep.workload, runtime)
        reps.append(rep)
    reps.sort(key=lambda r: (-r.streams, r.stages[0].node))
    return reps


def _distinct_partitions(tab: _Table, ids: list[str], replicas: int | None):
    """The set partitions of the nodes up to symmetry (with `replicas` blocks when given), in
    restricted-growth order; None past the search's size (EXACT_MAX_NODES nodes, or
    MAX_PARTITIONS distinct partitions): a size, never a time."""
    if len(ids) > EXACT_MAX_NODES or (tab.n_cls == len(ids) and
                                      _bell(len(ids)) > MAX_PARTITIONS):
        return None
    seen, out = set(), []
    for blocks in set_partitions(ids):
        if replicas is not None and len(blocks) != replicas:
            continue
        canon = tuple(sorted(tab.key(b) for b in blocks))
        if canon not in seen:
            seen.add(canon)
            out.append(blocks)
            if len(out) > MAX_PARTITIONS:
                return None
    return out


def _bell(n: int) -> int:
    row = [1]
    for _ in range(n - 1):
        nxt = [row[-1]]
        for x in row:
            nxt.append(nxt[-1] + x)
        row = nxt
    return row[-1]


def _best_first(tab: _Table, parts: list, B: int, need_one: bool, max_work: int):
    """Best-first over partitions by their upper value (the knapsack over solved entries and
    bounds elsewhere); solves only the (set, streams) the top partition's shares use. Returns
    (total, blocks, shares, None when proven else the proven upper bound on throughput, how)."""
    def value(i: int, mode: str):
        return _share([tab.row(blk, mode) for blk in parts[i]], B, need_one)

    heap = []
    for i in range(len(parts)):
        v, sh = value(i, "upper")
        if sh is not None:
            heap.append((-v, i))
    heapq.heapify(heap)
    inc = (-math.inf, None, None)  # the best real plan seen: (total, partition, shares)
    one = [j for j, p in enumerate(parts) if len(p) == 1]
    if one and tab.entry(parts[one[0]][0], B) is not None:  # one pipeline: a first incumbent
        inc = (tab.entry(parts[one[0]][0], B)[0], one[0], [B])
    while heap:
        _, i = heapq.heappop(heap)
        v, sh = value(i, "upper")
        if sh is None:
            continue
        if heap and (-v, i) > heap[0]:  # its bound fell since it was queued
            heapq.heappush(heap, (-v, i))
            continue
        todo = [(blk, b) for blk, b in zip(parts[i], sh) if b and tab.unsolved(blk, b)]
        if not todo:  # its value is exact and no other partition's bound exceeds it
            return (v, parts[i], sh, None,
                    f"exact: best-first over {len(parts)} distinct node partition(s) "
                    f"(symmetry-reduced), {tab.solves} inner solve(s)")
        if tab.work >= max_work and inc[1] is not None:
            break
        for blk, b in todo:
            tab.entry(blk, b)
        ev, esh = value(i, "exact")
        if esh is not None and ev > inc[0] * (1 + 1e-12):
            inc = (ev, i, esh)
        heapq.heappush(heap, (-v, i))
    else:
        return (-math.inf, None, None, None, "")
    upper = v  # the top bound: every partition's optimum is at most it
    for j in range(len(parts)):  # the best real plan among what was solved (no new solves)
        ev, esh = value(j, "exact")
        if esh is not None and ev > inc[0] * (1 + 1e-12):
            inc = (ev, j, esh)
    return (inc[0], parts[inc[1]], inc[2], upper,
            f"best of {tab.solves} inner solve(s) over {len(parts)} distinct node "
            f"partition(s) (the search stops past {max_work} units of inner work)")


def _snake(tab: _Table, cluster, ids: list[str], replicas: int | None, B: int, need_one: bool):
    """The bound mode past the partition search's size: the best snake partition."""
    best = (-math.inf, None, None)
    n = 0
    for blocks in _snake_partitions(cluster, ids, replicas):
        n += 1
        total, shares = _share([tab.row(b) for b in blocks], B, need_one)
        if shares is not None and total > best[0] * (1 + 1e-12):
            best = (total, blocks, shares)
    return (*best, math.inf,
            f"best of {n} speed-ordered partition(s) ({len(ids)} nodes exceed the partition "
            f"search's size), {tab.solves} inner solve(s)")


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
