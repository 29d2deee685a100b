"""Proven upper bounds on a replica's throughput f(A, b) and on any plan's (see the package
docstring, "Bounds")."""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import replace
from typing import Sequence

from graphsplit.batching import batch_grid, served_streams, serving_for
from graphsplit.costmodel import Workload


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
