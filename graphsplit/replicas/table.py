"""f(A, b): the best single pipeline on node set A for b streams, solved lazily and cached up
to symmetry, with the per-set bounds standing in where it is not solved yet."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

from graphsplit.batching import PATTERN, max_batch, proven_label, solve_serving
from graphsplit.costmodel import Workload, predict
from graphsplit.replicas.bounds import _Bounds
from graphsplit.replicas.nodes import node_classes, subcluster


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
