"""Replicas: split the nodes into k independent pipelines, each serving a share of the streams.

Problem. Given D nodes and B streams, choose a set partition of (a subset of) the nodes into
replicas A_1..A_k, each replica's split (node order, subset, layer ranges, micro-batch) and its
streams b_j (sum b_j = B) to maximise the total throughput sum_j f(A_j, b_j), where f(A, b) is
the best single-pipeline throughput over the nodes of A serving b streams under the runtime's
batching pattern (graphsplit.batching.solve_serving, the inner solver; f(A, 0) = 0: a replica
with no streams is not run). Replicas share nothing: no stage of one talks to another, each
holds the KV of its own streams, and current exo runs each as its own instance.

Symmetry. Two nodes are interchangeable when swapping them changes nothing (same cost table,
memory, links to every other node and to each other); within a class any permutation is an
automorphism, so f(A, b) depends only on how many nodes of each class A holds, and a partition
only on the multiset of those count vectors. Partitions are enumerated by restricted growth
strings (Bell(D): 15 for 4 nodes, 4,140 for 8) and kept once up to symmetry.

Method (best-first). A partition's value is the knapsack over its blocks (the streams shared
optimally, O(k B^2), ties to the smaller slowest cycle) of f(A, b) where solved and an upper
bound U(A, b) where not: an upper bound on the partition's optimum that falls as entries are
solved. Partitions sit in a heap by that value; the top one is re-valued, and if its knapsack's
shares use only solved entries its value is exact and at least every other partition's bound:
the optimum, proven. Otherwise the (A, b) its shares use are solved (the inner solver, seeded
with the set's nearest solved b's plan) and it goes back. So f is solved only where a
partition that may still win needs it (e.g. 41 of 15 x 32 = 480 (set, streams) pairs for
mlx-pipeline on 4 unlike nodes and 32 streams; bench/bench_serving.py). exo-current's f(A, b)
for b past its batch cap (8) is f(A, 8) with the same plan, no solve: its prediction reads the
streams only through the served min(b, 8) (costmodel.predict, stage_memory).

Bounds, for one pipeline on A serving b streams at decode batch m (M = ceil(b / m) batches,
served = min(b, 8) for exo-current, else b; t_d,i(m) node d's time for block i at batch m as
the runtime's protocol charges it). (i) Memory: every block sits on one node of A, with its
weights and the KV of `served` streams (plus the node's least resident embedding/head), so
with n_d the most blocks node d can hold (smallest first) A needs sum_d n_d >= L, else
f(A, b) = 0; and a plan has at least s_min stages, the fewest nodes whose n_d reach L.
(ii) throughput = min(served / tpot, (served / M) / T_max) (costmodel.predict). tpot (the sum
of the stages' compute and transfers) >= P_m = max(sum_i min_d t_d,i(m), the L cheapest of
the nodes' n_d cheapest block times) + the cheapest embedding + the cheapest head, + (s_min -
1) cheapest cuts + the cheapest closure when s_min > 1 (node d's x_d blocks cost at least its
x_d cheapest; every step runs the embedding and head once and crosses every cut). T_max >=
max(P_m / |A|, T*), T* = min over integers x_d <= n_d, sum x_d = L, of max over used d of
(d's x_d cheapest block times + the cheapest cut or closure when s_min > 1) (a binary search
over its candidate values). exo-current runs no overlap: served / P_m. U(A, b) is the largest
over the batches m the runtime may run (1..b for mlx-pipeline, 1 for exo-legacy, the served
batch for exo-current, or --micro-batch). (iii) Micro-batch runtimes: a plan at batch m that
fits b streams fits b0 < b (less KV), and b / ceil(b / m) <= (b / b0) x b0 / ceil(b0 / m), so
its throughput at b is at most b / b0 times that at b0: f(A, b) <= max(f(A, b0) b / b0, the
(ii) bound over m > b0) once f(A, b0) is solved (proven). Each bound is checked against
brute-force f(A, b) in tests/test_split_replicas.py. mlx-pipeline's f(A, b) itself is solved
one micro-batch m at a time (solve_serving with that m), in decreasing order of the (ii) bound
at m, until the next bound cannot beat the best found: the same optimum in fewer DP runs.

Size (deterministic: a size, never a time). The best-first search runs when D <= 10 and the
partitions up to symmetry number at most MAX_PARTITIONS; it stops once the inner solves' work
(their DP states, SplitResult.nit) passes `max_work` with a real plan in hand (the one pipeline
on every node at B streams is the first); it then returns the best plan among the solved
entries, labelled `bound`, with the heap's top value (an upper bound on every partition) as the
throughput bound, and the gap. Past the size: k = 1..D replicas of nodes dealt in speed order
(snake order, fastest first), each solved exactly, labelled `bound` against min(sum_d 1 /
(L c_d), B / L_min) (throughput_upper_bound, valid for any replicas on the whole cluster).

Complexity: at most (distinct sets x B) inner solves (usually far fewer, above), + Bell(D)
partitions enumerated + O(P k B^2) for the P distinct partitions' knapsacks, once each and
again per re-valuation.
Reference: set partitions by restricted growth strings (Knuth, TAOCP 7.2.1.5); best-first with
lazily tightened bounds (A*, Hart, Nilsson & Raphael 1968, the admissible heuristic here an
upper bound).
"""

from __future__ import annotations

import bisect
import heapq
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

from graphsplit.batching import (PATTERN, Serving, batch_grid, max_batch, proven_label,
                                 served_streams, serving_for, solve_serving)
from graphsplit.costmodel import Prediction, Workload, predict
from graphsplit.plan import Stage
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


class _Bounds:
    """Upper bounds on f(A, b), one pipeline on node set A serving b streams (module
    docstring, "Bounds"), from per-node pieces cached by batch size."""

    def __init__(self, cluster, workload: Workload, runtime: str, micro_batch: int | None):
        from graphsplit.costmodel import resident_bytes
        self.cluster, self.runtime, self.micro_batch = cluster, runtime, micro_batch
        self.C, self.L = workload.context_tokens, cluster.n_layers
        self.kv_tokens, self.workload = workload.kv_tokens, workload
        self.rows = {n.id: [n.table.row(f"layers.{i}") for i in range(self.L)]
                     for n in cluster.nodes}
        self.room = {n.id: n.memory_bytes - min(resident_bytes(n.table, runtime, f, la)
                                                for f in (False, True) for la in (False, True))
                     for n in cluster.nodes}
        self.times: dict[tuple, tuple] = {}  # (node, m) -> (per block step, least, embed, head)
        self.lm: dict[tuple, float] = {}  # (sorted ids, m) -> L_m(A) (with embedding and head)

    def batches(self, b: int) -> list[int]:
        """The decode batches a pipeline serving b streams may run."""
        if self.runtime != "mlx-pipeline":
            return [serving_for(self.runtime, b).micro_batch]
        return [min(self.micro_batch, b)] if self.micro_batch else list(range(1, b + 1))

    def step(self, nid: str, m: int) -> tuple:
        """Node nid at decode batch m: (per block step time, the least, embedding, head with
        sampling), as the runtime's protocol charges them (costmodel.protocol_time)."""
        k = (nid, m)
        if k not in self.times:
            from graphsplit.costmodel import protocol
            pr = protocol(self.cluster, self.runtime, "decode", replace(self.workload, batch=m))
            t = self.cluster.node(nid).table
            ts = [pr.block_time(t, r) for r in self.rows[nid]]
            self.times[k] = (ts, min(ts), pr.block_time(t, t.embed),
                             pr.head_time(t, self.workload.sampling_s))
        return self.times[k]

    def blocks_held(self, nid: str, served: int) -> int:
        """The most blocks node nid can hold with the KV of `served` streams (smallest first)."""
        room, n = self.room[nid], 0
        for need in sorted(r.weight_bytes + self.kv_tokens * served * r.kv_bytes_per_token
                           for r in self.rows[nid]):
            if need > room:
                break
            room -= need
            n += 1
        return n

    def links(self, ids: tuple, m: int) -> tuple[float, float]:
        """(the cheapest cut between two nodes of ids, the cheapest ring closure) at batch m,
        as the protocol charges them (the least activation bytes of any block)."""
        k = ("links", ids, m)
        if k not in self.lm:
            from graphsplit.costmodel import protocol
            pr = protocol(self.cluster, self.runtime, "decode", replace(self.workload, batch=m))
            act = min(r.activation_bytes_per_token for x in ids for r in self.rows[x])
            lk = self.cluster.link
            pairs = [(u, v) for u in ids for v in ids if u != v]
            self.lm[k] = (min((pr.cut_time(lk(u, v), lk(v, u), act) for u, v in pairs),
                              default=0.0),
                          min((pr.closure_time(lk(u, v), self.workload.token_bytes)
                               for u, v in pairs), default=0.0))
        return self.lm[k]

    def capped(self, ids: tuple, m: int, held: tuple) -> float:
        """A lower bound on a step's compute when node d runs at most held_d blocks: node d's
        x_d blocks take at least its x_d cheapest block times, so the step takes at least the
        L cheapest of the nodes' held_d cheapest (a convex separable relaxation, taken greedily),
        plus the cheapest embedding and head."""
        k = ("capped", ids, m, held)
        if k not in self.lm:
            per = [self.step(x, m) for x in ids]
            pool = [t for p, n in zip(per, held) for t in sorted(p[0])[:n]]
            self.lm[k] = (sum(heapq.nsmallest(self.L, pool)) + min(p[2] for p in per)
                          + min(p[3] for p in per))
        return self.lm[k]

    def bottleneck(self, ids: tuple, m: int, held: tuple, s_min: int) -> float:
        """A lower bound on a plan's slowest stage (compute + outgoing transfer) at batch m:
        a stage of x blocks on node d computes at least d's x cheapest block times, and with
        two stages or more sends at least the cheapest cut or closure (_least_bottleneck)."""
        k = ("bott", ids, m, held, s_min)
        if k not in self.lm:
            prefix = []
            for x in ids:
                p = [0.0]
                for t in sorted(self.step(x, m)[0]):
                    p.append(p[-1] + t)
                prefix.append(p)
            extra = min(self.links(ids, m)) if s_min > 1 else 0.0
            self.lm[k] = _least_bottleneck(prefix, list(held), self.L, extra)
        return self.lm[k]

    def per_batch(self, ids: Sequence[str], b: int) -> list[tuple[int, float]]:
        """[(m, an upper bound on the throughput of any plan on A = ids serving b streams at
        decode batch m)] over the batches m the runtime may run; [] when A cannot hold the
        model with the KV of b streams."""
        ids = tuple(sorted(ids))
        served = served_streams(self.runtime, b)
        held = [self.blocks_held(x, served) for x in ids]
        if sum(held) < self.L:
            return []
        s_min = next(s for s in range(1, len(held) + 1)  # stages at least: nodes to hold L
                     if sum(sorted(held, reverse=True)[:s]) >= self.L)
        out = []
        for m in self.batches(b):
            k = (ids, m)
            if k not in self.lm:  # every step runs each block, the embedding and the head once
                per = [self.step(x, m) for x in ids]
                self.lm[k] = (sum(min(col) for col in zip(*(p[0] for p in per)))
                              + min(p[2] for p in per) + min(p[3] for p in per))
            lm = max(self.lm[k], self.capped(ids, m, tuple(held)))
            if s_min > 1:  # and crosses s_min - 1 cuts or more, and the closure
                cut, close = self.links(ids, m)
                lm += (s_min - 1) * cut + close
            if lm <= 0:
                out.append((m, math.inf))
            elif self.runtime == "exo-current":  # tpot >= L_m, one batch per step
                out.append((m, served / lm))
            else:
                M = -(-served // m)
                tmax = max(lm / len(ids), self.bottleneck(ids, m, tuple(held), s_min))
                out.append((m, min(served / lm, served / (M * tmax))))
        return out


def _least_bottleneck(prefix: list[list[float]], cap: list[int], L: int,
                      extra: float) -> float:
    """min over integers 0 <= x_d <= cap_d with sum x_d = L of max over d with x_d > 0 of
    prefix_d[x_d] + extra (prefix_d[x]: node d's x cheapest block times, summed; extra: what
    every stage adds); inf when the caps cannot cover L. Binary search over the candidate
    values: T is feasible when the blocks each node fits within T add up to L."""
    stage = [[t + extra for t in p] for p in prefix]  # stage[d][x]: x blocks on d, and extra
    cands = sorted({s[x] for s, c in zip(stage, cap) for x in range(1, c + 1)})

    def ok(T: float) -> bool:
        return sum(bisect.bisect_right(s, T, 1, c + 1) - 1 for s, c in zip(stage, cap)) >= L

    lo, hi = 0, len(cands) - 1
    if hi < 0 or not ok(cands[hi]):
        return math.inf
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(cands[mid]):
            hi = mid
        else:
            lo = mid + 1
    return cands[lo]


_UNSOLVED = "unsolved"


class _Table:
    """f(A, b): the best single pipeline on node set A for b streams, solved lazily (only the
    (A, b) a search asks for) and cached up to symmetry; beside it an upper bound per (A, b)."""

    def __init__(self, cluster, workload: Workload, runtime: str, micro_batch, use_all, solver):
        self.cluster, self.workload, self.runtime = cluster, workload, runtime
        self.micro_batch, self.use_all, self.solver = micro_batch, use_all, solver
        self.cls = node_classes(cluster)
        self.n_cls = max(self.cls.values()) + 1
        self.bounds = _Bounds(cluster, workload, runtime, micro_batch)
        self.cache: dict[tuple, list] = {}  # key -> [None] + per b: entry, None or _UNSOLVED
        self.ub: dict[tuple, list] = {}  # key -> [None] + per b: upper bound on f
        self.per: dict[tuple, list] = {}  # key -> [None] + per b: [(m, bound at batch m)]
        self.solves, self.work, self.labels = 0, 0, set()

    def key(self, ids: Sequence[str]) -> tuple:
        v = [0] * self.n_cls
        for x in ids:
            v[self.cls[x]] += 1
        return tuple(v)

    def canonical(self, ids: Sequence[str]) -> list[str]:
        """The first nodes of each class (sorted ids) in the counts of `ids`."""
        return self._members(self.key(ids))

    def _slots(self, k: tuple, ids: Sequence[str]) -> list:
        if k not in self.cache:
            canon = self.canonical(ids)
            per = [None] + [self.bounds.per_batch(canon, b)
                            for b in range(1, self.workload.streams + 1)]
            ub = [None] + [max((x for _, x in p), default=0.0) for p in per[1:]]
            self.per[k], self.ub[k] = per, ub
            self.cache[k] = [None] + [_UNSOLVED if u > 0 else None for u in ub[1:]]
        return self.cache[k]

    def entry(self, ids: Sequence[str], b: int):
        """f(A, b)'s entry (thr, result, workload, canonical ids, cycle), solving it if
        needed; None when A cannot hold the model at b streams."""
        k = self.key(ids)
        slots = self._slots(k, ids)
        if slots[b] is _UNSOLVED:
            self._solve(k, slots, b)
        return slots[b]

    def _solve(self, k: tuple, slots: list, b: int) -> None:
        canon = self._members(k)
        sub = subcluster(self.cluster, canon)
        cap = max_batch(self.runtime)
        if cap and b > cap:  # exo-current: streams past its cap only queue (module docstring)
            e = self.entry(canon, cap)
            if e is not None:
                wl = replace(e[2], streams=b)
                p = predict(sub, e[1].stages, wl, self.runtime)
                slots[b] = (p.throughput_tps, e[1], wl, canon, p.cycle_s)
            else:
                slots[b] = None
            return
        near = sorted((abs(b - j), j) for j in range(1, len(slots))
                      if isinstance(slots[j], tuple))
        seeds = [slots[near[0][1]][1].stages] if near else []  # a solved b's plan: an incumbent
        r, wl = self._serve(sub, self.per[k][b], b, seeds)
        self.solves += 1
        if r is None or r.stages is None:  # cannot hold the model at b: nor at more streams
            for j in range(b, len(slots)):
                slots[j] = None
            return
        self.labels.add(proven_label(r))
        pr = predict(sub, r.stages, wl, self.runtime)
        slots[b] = (1.0 / r.fun if r.fun > 0 else math.inf, r, wl, canon, pr.cycle_s)
        if proven_label(r) != "bound" and PATTERN[self.runtime] == "micro-batch":
            self._scale_down(k, b, slots[b][0])

    def _serve(self, sub, per: list[tuple[int, float]], b: int, seeds):
        """solve_serving on sub for b streams. mlx-pipeline choosing its micro-batch: one m at a
        time, in decreasing order of this module's bound at m (per), until the bound at the
        next m cannot beat the best found (the same optimum, with the tighter bounds)."""
        wl = replace(self.workload, streams=b, batch=1)
        if self.runtime != "mlx-pipeline" or self.micro_batch:
            mb = min(self.micro_batch, b) if self.micro_batch else None
            r, wl = solve_serving(sub, wl, self.runtime, mb, self.use_all, self.solver, seeds)
            self.work += getattr(r, "nit", 0) or 0
            return r, wl
        best = (None, wl)
        for m, x in sorted(per, key=lambda z: (-z[1], z[0])):
            if best[0] is not None and x <= (1.0 / best[0].fun) * (1 + 1e-9):
                break
            r, w = solve_serving(sub, wl, self.runtime, m, self.use_all, self.solver, seeds)
            self.work += getattr(r, "nit", 0) or 0
            if r is None or r.stages is None:  # memory does not depend on m: nothing fits
                return r, w
            if best[0] is None or r.fun < best[0].fun * (1 - 1e-12):
                best = (r, w)
        return best

    def _scale_down(self, k: tuple, b0: int, f0: float) -> None:
        """f(A, b) <= max(f(A, b0) b / b0, the bound at batches m > b0) for b > b0
        (module docstring, "Bounds", iii)."""
        slots, ub, per = self.cache[k], self.ub[k], self.per[k]
        for b in range(b0 + 1, len(slots)):
            if slots[b] is _UNSOLVED:
                above = max((x for m, x in per[b] if m > b0), default=0.0)
                ub[b] = min(ub[b], max(f0 * b / b0, above))

    def _members(self, k: tuple) -> list[str]:
        want, out = list(k), []
        for x in sorted(self.cluster.ids):
            if want[self.cls[x]]:
                want[self.cls[x]] -= 1
                out.append(x)
        return out

    def row(self, ids: Sequence[str], mode: str = "solve") -> list:
        """Per b = 0..B, in _share's shape: "solve" f itself (every b solved), "exact" the
        solved entries only (a lower bound), "upper" solved entries and the bound elsewhere
        (an upper bound)."""
        k = self.key(ids)
        slots = self._slots(k, ids)
        if mode == "solve":
            return [None] + [self.entry(ids, b) for b in range(1, len(slots))]
        ub = self.ub[k]
        return [None] + [s if isinstance(s, tuple) else
                         (ub[b], None, None, None, math.inf) if s is _UNSOLVED and mode == "upper"
                         else None for b, s in enumerate(slots) if b]

    def unsolved(self, ids: Sequence[str], b: int) -> bool:
        return self._slots(self.key(ids), ids)[b] is _UNSOLVED


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
    """min(sum_d 1 / (L c_d), B / L_min): no plan, with any replicas on any of the nodes,
    exceeds it. c_d: node d's cheapest time per block per stream over the batches b it could
    run (b <= B ours, <= 8 exo-current, 1 legacy exo; decode_seconds is piecewise-linear in b,
    so t(b) / b is least at a grid point or an end): each token needs all L blocks once and
    node d spends at least c_d per block-token, so d adds at most 1 / (L c_d) tok/s whatever
    replica it serves in. L_min: per block the cheapest step time of any node at any of those
    batches, summed: a stream's next token needs every block in turn, so it comes at most once
    per L_min (embedding, head and links only add)."""
    from graphsplit.batching import decode_seconds
    top = workload.streams if runtime == "mlx-pipeline" else \
        serving_for(runtime, workload.streams).micro_batch
    C, L = workload.context_tokens, cluster.n_layers
    total, step = 0.0, [math.inf] * L
    for n in cluster.nodes:
        t = n.table
        bs = sorted({b for b in batch_grid(t) if b <= top} | {1, top})
        times = [[decode_seconds(t, t.row(f"layers.{i}"), C, b) for b in bs] for i in range(L)]
        c = min(x / b for row in times for x, b in zip(row, bs))
        total += math.inf if c <= 0 else 1.0 / (L * c)
        step = [min(s_, min(row)) for s_, row in zip(step, times)]
    lmin = sum(step)
    return min(total, workload.streams / lmin if lmin > 0 else math.inf)


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
