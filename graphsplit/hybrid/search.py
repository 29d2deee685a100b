"""Exact search over hybrid plans: stages as groups, their order, their layers and their shares.

Problem. Choose a sequence of stages, each a plain node or a tensor-parallel group (one whose
all-reduce was measured) with a whole-KV-head share per member, disjoint, in any order, with
contiguous block ranges covering the model, minimising time per output token (latency), time
to first token (ttft) or 1 / throughput = max(sum_s T_s / B, max_s T_s) under the cost model
of graphsplit.hybrid.costs, every member within its memory. This is HexGen's space
(per-stage tensor degree, any stage order) plus unequal shares.

Method. A candidate stage kind (group, first member h, last member t) has a cost matrix
C[a, b] already minimised over shares and interior chain order (graphsplit.hybrid.groups: both
choices only affect the stage itself). Dynamic program over states (first member f of the first
stage, set of used nodes, open candidate c, its first block a), value = min sum of the closed
stages; closing c at b and opening c' (disjoint from the set) costs
T = C_c[a, b] + link(t_c -> h_c', b); closing at L pays the ring closure t_c -> f. Vectorised
over (a, b) per (state, next first member) pair. `cap` bounds every T (S(cap) = min sum s.t. max <= cap).

* latency / ttft: one uncapped run.
* throughput: min over caps T of G(T) = max(S(T) / B, T) is the optimum (the optimal plan's own
  bottleneck is a cap whose min-sum plan is no worse); S is non-increasing, so G's minimum sits
  where S(T) / B crosses T: a binary search over the sorted possible stage times, two capped
  runs per step, O(log #times) runs.

The state space is complete, so the result is optimal over every plan the model can price
(label "optimal-all-orders-subsets"); groups never measured are not plans it can price and are
listed as left out. With --max-group (or a cluster too large for the exact program: more than
MAX_EXACT_NODES nodes or MAX_EXACT_CANDIDATES candidate kinds; then groups of two up to
MAX_RESTRICTED_NODES for latency and ttft, else the pipeline optimum alone) the search is
restricted and labelled "bound": its
objective is compared with a lower bound (every block at its cheapest candidate per block, no
links; graphsplit.hybrid.search.lower_bound) and the gap is reported.

Complexity: O(#states x #candidates x L^2), #states <= D 2^D #candidates L. Exponential in
the node count, like the pipeline bitmask DP; HexGen searches this space heuristically (genetic
algorithm), Alpa/Galvatron-style planners by DP over fixed stage shapes.

Reference: HexGen (Jiang et al., ICML 2024): asymmetric tensor degrees per pipeline stage;
PipeEdge (Hu et al., 2022): bitmask DP over device subsets.
"""

from __future__ import annotations

import time

import numpy as np

from graphsplit.costmodel import Workload
from graphsplit.hybrid.groups import HybridCosts, build
from graphsplit.hybrid.shares import tensor_stage
from graphsplit.plan import Stage
from graphsplit.result import SplitResult

INF = np.inf
REL = 1e-9
MAX_EXACT_CANDIDATES = 160  # beyond these the search is restricted and labelled "bound"
MAX_EXACT_NODES = 8
MAX_RESTRICTED_NODES = 10  # up to here pairs are still searched (latency / ttft; throughput's
# capped runs are too many there): beyond, the seed (the pipeline optimum) alone


def _per_block(hc: HybridCosts) -> np.ndarray:
    """The cheapest cost of each block on any node or group (blocks and all-reduces only)."""
    cc, L = hc.cc, hc.L
    per = np.min(np.diff(cc.prefix, axis=1), axis=0)
    for c in hc.cands:
        if c.blocks is not None:
            per = np.minimum(per, [c.blocks[i, i + 1] for i in range(L)])
    return per


def _dp(hc: HybridCosts, use_all: bool, cap: float = INF, incumbent: float = INF):
    """Min sum of stage times (every one <= cap) below `incumbent`. Returns (value, path,
    work) where path is [(candidate index, first block)] in execution order, or (inf, None,
    work) when no plan beats the incumbent. Branch and bound: a state whose value plus a lower
    bound on the rest (every remaining block at its cheapest, the cheapest head) reaches the
    best plan so far cannot lead to a better one."""
    L, D = hc.L, len(hc.ids)
    per = _per_block(hc)
    rest = np.concatenate([np.cumsum(per[::-1])[::-1], [0.0]])
    rest[:L] += hc.cc.t_head.min()
    rest *= 1 - 1e-9  # rounding never prunes an optimal plan
    full = (1 << D) - 1
    out, close, cands = hc.cc.out, hc.cc.close, hc.cands
    capped = np.isfinite(cap)
    cols = np.arange(L + 1)
    keys: list[tuple[int, int, int]] = []  # (f, mask, open candidate)
    ids: dict[tuple[int, int, int], int] = {}
    val, par_key, par_a = [], [], []
    by_mask: dict[int, list[int]] = {}

    def state(key) -> int:
        if key not in ids:
            ids[key] = len(keys)
            keys.append(key)
            val.append(np.full(L + 1, INF))
            par_key.append(np.full(L + 1, -1))
            par_a.append(np.full(L + 1, -1))
            by_mask.setdefault(key[1], []).append(ids[key])
        return ids[key]

    for ci, c in enumerate(cands):
        val[state((c.head, c.mask, ci))][0] = 0.0
    best, best_end, work = incumbent, None, 0
    for mask in range(1, full + 1):
        for si in sorted(by_mask.get(mask, []), key=lambda i: keys[i]):
            f, _, ci = keys[si]
            v = val[si]
            v[v + rest >= best] = INF
            if not np.isfinite(v).any():
                continue
            c = cands[ci]
            if not use_all or mask == full:  # close the open stage at L: closure back to f
                last = c.C[:, L] + close[c.tail, f]
                if capped:
                    last = np.where(last <= cap, last, INF)
                tot = v + last
                a = int(np.argmin(tot))
                if tot[a] < best * (1 - REL):
                    best, best_end = float(tot[a]), (si, a)
            by_head: dict[int, tuple] = {}  # closing c at b depends on the next head only
            for cj, c2 in enumerate(cands):
                if c2.mask & mask:
                    continue
                if c2.head not in by_head:
                    work += 1
                    T = c.C + out[c.tail, c2.head][None, :]
                    if capped:
                        T = np.where(T <= cap, T, INF)
                    M = v[:, None] + T
                    arg = np.argmin(M, axis=0)
                    nv = M[arg, cols]
                    nv[nv + rest >= best] = INF
                    by_head[c2.head] = (nv, arg, np.isfinite(nv).any())
                nv, arg, any_ = by_head[c2.head]
                if not any_:
                    continue
                sj = state((f, mask | c2.mask, cj))
                upd = nv < val[sj] * (1 - REL)
                if upd.any():
                    val[sj][upd] = nv[upd]
                    par_key[sj][upd] = si
                    par_a[sj][upd] = arg[upd]
    if best_end is None:
        return INF, None, work
    path, (si, a) = [], best_end
    while si >= 0:
        path.append((keys[si][2], a))
        si, a = int(par_key[si][a]), int(par_a[si][a])
    return best, path[::-1], work


def _stages(hc: HybridCosts, path) -> list[Stage]:
    """[(candidate, start block)] in order -> Stages (ends from the next start, L last)."""
    out = []
    starts = [a for _, a in path] + [hc.L]
    for (ci, a), b in zip(path, starts[1:]):
        c = hc.cands[ci]
        if c.shares is None:
            out.append(Stage(hc.ids[c.head], a, b))
            continue
        shares = dict(zip(c.group, c.share_list[int(c.shares[a, b])]))
        order = c.orders[a]
        out.append(tensor_stage(order, [shares[m] for m in order], a, b, hc.intermediate))
    return out


def _stage_times(hc: HybridCosts, path) -> list[float]:
    starts = [a for _, a in path] + [hc.L]
    times = []
    for s, ((ci, a), b) in enumerate(zip(path, starts[1:])):
        c = hc.cands[ci]
        if s + 1 < len(path):
            o = hc.cc.out[c.tail, hc.cands[path[s + 1][0]].head, b]
        else:
            o = hc.cc.close[c.tail, hc.cands[path[0][0]].head]
        times.append(float(c.C[a, b] + o))
    return times


def _all_stage_times(hc: HybridCosts) -> np.ndarray:
    """Every finite stage time a plan can contain (candidate caps for throughput)."""
    vals = []
    heads = sorted({c.head for c in hc.cands})
    for c in hc.cands:
        for h in heads + [None]:
            if h is None:
                T = c.C[:, hc.L][:, None] + hc.cc.close[c.tail, heads][None, :]
            else:
                if h == c.tail or (1 << h) & c.mask:
                    continue
                T = c.C + hc.cc.out[c.tail, h][None, :]
            T = T[np.isfinite(T)]
            vals.append(T.ravel())
    v = np.unique(np.concatenate(vals)) if vals else np.zeros(0)
    return v


def _throughput(hc: HybridCosts, use_all: bool, B: int, seed: float = INF):
    """min over caps T of G(T) = max(S(T) / B, T), exactly, by elimination (module docstring):
    with the best F found so far, a cap T >= F cannot improve (G >= T), and a capped run that
    finds no plan with sum < B x F rules out every smaller cap too (S only grows as T falls);
    a run that finds one improves F and rules out the caps below it (G >= S(T) / B) or above
    F. Every probe halves the range of candidate caps; runs are pruned at B x F. `seed`: the
    objective of a plan known beforehand (the pipeline optimum), beaten or kept by the caller."""
    caps = _all_stage_times(hc)
    v0, p0, work = _dp(hc, use_all, INF, B * seed)  # min sum, no cap: a first plan
    best, best_p = seed, None
    if p0 is not None:
        f0 = max(v0 / B, max(_stage_times(hc, p0)))
        if f0 < best * (1 - REL):
            best, best_p = f0, p0
    lo, hi = 0, int(np.searchsorted(caps, best * (1 - REL)))
    while lo < hi:
        mid = (lo + hi) // 2
        v, p, w = _dp(hc, use_all, caps[mid] * (1 + REL), B * best)
        work += w
        if p is None:  # S(caps[mid]) >= B x best: no cap <= mid helps
            lo = mid + 1
            continue
        f = max(v / B, max(_stage_times(hc, p)))
        if f < best * (1 - REL):
            best, best_p = f, p
        hi = min(hi, int(np.searchsorted(caps, best * (1 - REL))))
        if v / B >= best * (1 - REL) or v / B > caps[mid]:
            lo = mid + 1  # every smaller cap has G >= S(caps[mid]) / B >= best
        else:
            hi = min(hi, mid)  # S / B <= cap: G(T) >= T > caps[mid] >= f >= best above it
    return best, best_p, work


def lower_bound(hc: HybridCosts, objective: str, B: int) -> float:
    """A lower bound on every plan (any groups, shares, order): each block at its cheapest
    cost on any node or group (blocks and all-reduces only: no links, no chain, memory only as
    far as the block alone must fit), plus the cheapest embedding and head. Throughput: also
    the costliest single block (a stage holds at least one)."""
    cc = hc.cc
    per = _per_block(hc)
    s = float(per.sum() + cc.t_embed.min() + cc.t_head.min())
    if objective == "throughput":
        return max(s / B, float(per.max()))
    return s


def solve_hybrid(cluster, objective: str = "latency", workload: Workload = Workload(),
                 use_all_nodes: bool = False, tp_shares: str = "any",
                 max_group: int | None = None, seed: SplitResult | None = None) -> SplitResult:
    """The best hybrid plan for runtime mlx-pipeline (see the module docstring). `seed`: a
    plan already known (the pure-pipeline optimum under mlx-pipeline, same objective and
    use_all_nodes), kept when nothing beats it and pruning the search meanwhile."""
    t0 = time.perf_counter()
    metric = "prefill" if objective == "ttft" else "decode"
    hc = build(cluster, workload, metric, tp_shares, max_group)
    known = seed is not None and seed.stages is not None
    restricted = max_group is not None
    D = len(hc.ids)
    B = workload.streams
    full = build(cluster, workload, metric, tp_shares, None) if restricted else hc
    lb = lower_bound(full, objective, B)  # over every candidate, before any restriction
    if D > MAX_EXACT_NODES or len(hc.cands) > MAX_EXACT_CANDIDATES:
        restricted = True
        keep = 2 if D <= MAX_RESTRICTED_NODES and objective != "throughput" else 1
        hc.cands = [c for c in hc.cands if len(c.group) <= keep]
        hc.skipped.append(f"groups of {keep + 1}+ nodes ({D} nodes, {len(hc.cands)} candidate "
                          "stage kinds: beyond the exact program's limits "
                          f"({MAX_EXACT_NODES} nodes, {MAX_EXACT_CANDIDATES} kinds))")
        if keep == 1 and known:  # the pipeline optimum is the search over single nodes
            hc.cands = []
    sv = seed.fun if known else INF
    if objective == "throughput":
        val, path, work = _throughput(hc, use_all_nodes, B, sv)
    else:
        val, path, work = _dp(hc, use_all_nodes, INF, sv)
    extra = {"left_out": list(hc.skipped), "candidates": len(hc.cands)}
    dt = time.perf_counter() - t0
    if path is None and not known:
        return SplitResult(None, INF, not restricted, 2, "infeasible: no hybrid plan fits",
                           "hybrid-dp", dt, work, extra)
    stages = _stages(hc, path) if path is not None else list(seed.stages)
    val = val if path is not None else sv
    groups = len({c.group for c in hc.cands if c.shares is not None})
    if restricted:
        gap = (val - lb) / val if val > 0 else 0.0
        res = SplitResult(stages, val, False, 1,
                          f"restricted search ({'; '.join(hc.skipped)}); lower bound "
                          f"{lb:.6g}, gap {gap:.1%}", "hybrid-dp", dt, work, extra)
        _label(res, "bound", lb, gap)
        return res
    left = f"; left out: {'; '.join(hc.skipped)}" if hc.skipped else ""
    res = SplitResult(stages, val, True, 0,
                      f"exact over every order and subset of {len(hc.ids)} nodes and "
                      f"{groups} measured tensor groups, every share vector and chain order{left}",
                      "hybrid-dp", dt, work, extra)
    _label(res, "optimal-all-orders-subsets", val, 0.0)
    return res


def _label(res: SplitResult, proven: str, lower: float | None, gap: float | None) -> None:
    """The solver labels of INTERFACES I7 (graphsplit.result), set whether or not that
    release's SplitResult declares them."""
    res.proven, res.lower_bound, res.gap = proven, lower, gap
