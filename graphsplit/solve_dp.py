"""Exact dynamic programs for chain splits: fixed node order, and free order + subset (bitmask).

Problem. Blocks 0..L-1 form a chain; nodes d have per-block times (from measured tables), usable
memory and directed links. A plan is a sequence of distinct nodes d_1..d_S (a ring: d_S sends the
token back to d_1) with contiguous ranges covering the blocks. Stage time
T_s = compute + outgoing transfer (see graphsplit.costmodel). Objectives:

* ``latency``: min sum_s T_s (decode metric)   * ``ttft``: the same with the prefill metric
* ``throughput``: min max(sum_s T_s / B, max_s T_s) (= 1 / tokens per second)
* ``pareto``: every non-dominated (sum, max) pair.

Method. States (first node f, set of used nodes, current node d, first block b of d's stage),
value = min sum of the finished stages. A transition closes d's stage at c and opens node q at c
(cost comp_d[b, c] + link(d, q, c)); the last stage pays the ring closure back to f. An optional
per-stage cap (every T_s <= cap) gives S(cap) = min sum s.t. max <= cap.

* latency / ttft: one uncapped run.
* throughput: the optimum is min over the finitely many possible stage times T of
  G(T) = max(S(T) / B, T), S(T) non-increasing. An incumbent-driven search over the candidate
  T (see _throughput_search) excludes candidates from both ends with each capped run, every run
  pruned at sum >= B x incumbent and every plan found improving the incumbent; the bitmask solver
  starts from the fixed-order optimum (fastest nodes first, cheap) and needs no min-sum run; a
  probe is decided by any real plan with every stage <= T and S / B <= T, so a relaxed run that
  finds one needs no exact re-run. 5 capped runs at 80 x 8, 6 at 126 x 12.
* pareto: min sum, then min sum with every stage strictly below the last plan's bottleneck,
  until infeasible: the exact (sum, max) frontier (at most MAX_PARETO_POINTS points).

Complexity: fixed order O(D^3 L + D^2 L log L) per run (every first node at once, range
minima from sparse tables, the admissible ranges by binary search). Bitmask:
O(2^D D^3 L log L) work per run, vectorised over all states of one subset size: a stage [b, c)
on d costs P_d[c] - P_d[b], memory and cap are monotone in b, so min over b is a range-minimum
query over an admissible suffix, answered from sparse tables; branch and bound with a
fixed-order seed (fastest nodes first) and a lower bound per set of still-usable nodes
(_set_lower_bound: their fastest blocks filled up to the most blocks each can hold under memory
and cap; infinite when they cannot hold the rest, which makes infeasible caps cost one level of
the DP). Each bitmask run (_bitmask_dp) first solves a relaxation with no first node in the
state (last stage charged its cheapest closure into the used set: a lower bound on every plan,
returned when its plan's real closure is the charged one or when nothing beats the incumbent),
else the exact program with the relaxed plan's real sum as incumbent; both are pruned by a
reverse cost-to-go bound (_reverse_lower_bound: a relaxed reverse bitmask DP over the
still-allowed nodes, a superset of the real transitions). Exact: the state
space is complete; ties resolve to the first index (smallest block, smallest node index), and
node indices follow node ids (bitmask) or the given order (fixed), so answers are deterministic.

Types. The free-order program runs on node types (graphsplit.solve_types): interchangeable
nodes (twins) are counted, not listed, so a state's "set of used nodes" is a count vector of
types and the first / current node a type; with every node its own type it is the bitmask
program above. Complexity O(S T^3 L log L) per run for S = prod_t (n_t + 1) count vectors and
T types; only the states reached below the bounds are stored, a level at a time.

Labels. Every result says what it proves (graphsplit.result): "optimal-all-orders-subsets"
(the typed program within MAX_KEYS), "optimal-given-order" (the fixed-order DP), or "bound"
(beyond MAX_KEYS: the best plan found and a proven lower bound, see _solve_bounded).

Reference: PipeEdge (Hu et al., 2022) bitmask DP over device subsets; min-sum / min-max
contiguous partitioning (classical DP, e.g. Pinar & Aykanat 2004).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from graphsplit.costmodel import ChainCosts, Workload, predict
from graphsplit.plan import Stage
from graphsplit.result import ALL_ORDERS, BOUND, GIVEN_ORDER, SplitResult
from graphsplit.solve_types import TypedCosts, as_typed, coarsen, n_keys, padded, typed_costs

INF = np.inf
MAX_PARETO_POINTS = 200
# the exact program's size limit: count-vector states x types x (blocks + 1), the size of its
# reverse bound (_reverse_lower_bound), which it builds whole: 12 distinct nodes x 126 layers
# (6.2 million) fit, 13 do not; 24 nodes in 4 types of 6 need 1.2 million. Beyond, the best
# plan found with a proven lower bound, from programs of a quarter (the plan) and a half (the
# bound) of this size (deterministic: a size, not a time limit)
MAX_KEYS = 1 << 23
# programs this small (5 distinct nodes) run without the seed and the reverse bound: building
# them costs more than they prune
SMALL_KEYS = 160
# The bound mode's relaxation (_solve_bounded) is solved for its lower bound only: its
# throughput search stops once its proven floor is within this (relative) of its incumbent,
# giving up at most 1 % of the bound for runs that would only close that last 1 %.
RELAX_FLOOR = 0.01
REL = 1e-9  # relative tolerance: sums of the same times in another order differ by rounding


def _ring_dp(cc: ChainCosts, order: Sequence[int], use_all: bool, cap: float = INF,
             incumbent: float = INF):
    """Min sum of stage times subject to every stage time <= cap, the nodes used in this order
    (a subsequence of it; the whole of it when use_all); only plans below `incumbent` are
    looked for. Returns (value, [(node_index, b, c)] or None, work).

    States (first node f, position p in the order, first block b of p's stage), every first
    node at once (one row per f): O(K^2) states of L + 1 blocks, each closed at every cut c by
    range-minimum queries (_ring_open): O(K^3 L + K^2 L log L) per run in O(K) numpy passes.
    Row f is pruned at the best value found by the rows f' <= f, and ties go to the smaller
    first node, then the earlier position, then the smaller block.
    """
    K, L = len(order), cc.L
    rq = _memo(cc, ("rq", cap), lambda: _range_queries(cc, cap))
    F = 1 if use_all else K
    order_a = np.asarray(order, dtype=np.int64)
    V = np.full((F, K, L + 1), INF)
    BPK = np.full((F, K, L + 1), -1, dtype=np.int64)
    BPB = np.full((F, K, L + 1), -1, dtype=np.int64)
    V[np.arange(F), np.arange(F), 0] = 0.0
    rbest = np.full(F, float(incumbent))  # per first node: the best value found (or incumbent)
    found = [None] * F
    work = 0
    for p in range(K):
        nf = min(p + 1, F)  # rows f <= p
        thr = np.minimum.accumulate(rbest[:nf])
        v = V[:nf, p]
        alive = v + cc.lower_bound[None, :] < thr[:, None]
        rows_alive = alive.any(axis=1)
        if not rows_alive.any():
            continue
        work += int(rows_alive.sum())
        v = np.where(alive, v, INF)
        d = order[p]
        if p == K - 1 or not use_all:  # close the ring: the stage [b, L) on d is the last
            fn = order_a[:nf]
            clo = np.where(fn != d, cc.close[d, fn], 0.0)
            tl = cc.comp[d, :, L][None, :] + clo[:, None]
            tot = v + (np.where(tl <= cap, tl, INF) if np.isfinite(cap) else tl)
            bb = np.argmin(tot, axis=1)
            tb = tot[np.arange(nf), bb]
            for f in np.nonzero(tb < rbest[:nf])[0]:
                rbest[f], found[f] = float(tb[f]), (p, int(bb[f]), d)
        q0 = p + 1
        if q0 < K:  # open the next node(s) q at cut c
            qs = np.arange(q0, q0 + 1) if use_all else np.arange(q0, K)
            _ring_open(rq, V[:nf], BPK[:nf], BPB[:nf], p, d, order_a[qs], qs, v)
    best_v, best_p = incumbent, None
    for f in range(F):  # smallest value, then smallest first node
        if found[f] is not None and rbest[f] < best_v:
            best_v, best_p = float(rbest[f]), _ring_path(found[f], BPK[f], BPB[f], order, L)
    return best_v, best_p, work


def _ring_open(rq, V, BPK, BPB, p: int, d: int, qn, nk, v) -> None:
    """Close d's stage (values v[f] over its first block, one row per first node f) at every
    cut c and open the nodes qn (positions nk) there, keeping the better value and its
    back-pointers. min over the admissible first blocks b of v[b] + comp[d, b, c] + out[d, q, c]
    is a range-minimum query of v + embedding - P_d over the suffix [lo, c) (see
    _range_queries), leftmost on ties."""
    mn, ix = _sparse_table(v + rq.u_off[d][None, :], rq.J)  # (J, f, b)
    if rq.capped:
        kk, lo, rs = rq.kk[d, qn], rq.lo_c[d, qn], rq.rs[d, qn]  # (nq, c)
    else:
        kk, lo, rs = rq.kk[d][None], rq.lo_c[d][None], rq.rs[d][None]  # (1, c)
    fr = np.arange(v.shape[0])[:, None, None]
    left, right = mn[kk[None], fr, lo[None]], mn[kk[None], fr, rs[None]]  # (f, nq or 1, c)
    take_r = right < left
    cand = np.where(take_r, right, left) + rq.addc[d, qn][None]  # (f, nq, c)
    bsel = np.broadcast_to(np.where(take_r, ix[kk[None], fr, rs[None]],
                                    ix[kk[None], fr, lo[None]]), cand.shape)
    cur = V[:, nk]
    better = cand < cur
    if better.any():
        V[:, nk] = np.where(better, cand, cur)
        BPK[:, nk] = np.where(better, p, BPK[:, nk])
        BPB[:, nk] = np.where(better, bsel, BPB[:, nk])


def _ring_path(found, BPK, BPB, order, L: int):
    p, b, d = found
    path = [(d, b, L)]
    c = b
    while True:
        pk, pb = int(BPK[p, c]), int(BPB[p, c])
        if pk < 0:
            break
        path.append((order[pk], pb, c))
        p, c = pk, pb
    return list(reversed(path))


def _range_lo(cc: ChainCosts, cap: float) -> np.ndarray:
    """lo[d, q, c]: the first block b such that the stage [b, c) on d followed by q fits memory
    and has T = comp + out <= cap. comp[d, :, c] is non-increasing in b (+inf for b >= c) and
    adding out[d, q, c] keeps that order (rounding is monotone), so the admissible b form the
    suffix [lo, c): a vectorised binary search over b, O(D^2 L log L), with the same floating
    point comparison as everywhere else; lo = c when none (c = 0 or L, q = d: empty)."""
    D, L = cc.D, cc.L
    dd = np.arange(D)[:, None, None]
    cs = np.broadcast_to(np.arange(L + 1)[None, None, :], (D, D, L + 1))
    out = cc.out
    lo = np.zeros((D, D, L + 1), dtype=np.int64)
    hi = cs.copy()  # the answer is in [lo, hi]; b = c stands for "none"
    while True:
        open_ = lo < hi
        if not open_.any():
            return lo
        mid = (lo + hi) >> 1
        t = cc.comp[dd, mid, cs] + out
        ok = (t <= cap) if np.isfinite(cap) else np.isfinite(t)
        ok |= mid >= cs
        hi = np.where(open_ & ok, mid, hi)
        lo = np.where(open_ & ~ok, mid + 1, lo)


def _set_lower_bound(cc, cap: float, cnt: np.ndarray | None = None, fill=None) -> np.ndarray:
    """lbt[A, b]: a lower bound on the sum of the stage times of blocks b..L-1 when only the
    nodes of the set A may run them (a state (mask, d, b) can use d and the nodes outside
    mask). A is a state of the count-vector space (solve_types.StateSpace; with one node per
    type, the bitmask of the set); `cnt`: only these count vectors (rows), in that order;
    `fill`: _fill_params(cc, cap), when already computed.

    Valid because every completion puts the blocks b..L-1 on distinct nodes of A in contiguous
    ranges: node n runs at most cap_n blocks (the longest range that fits its memory and, with a
    stage cap, has compute <= cap: links are >= 0), each block costs at least mn_n (n's fastest
    block), and the last stage pays at least min_{n in A} head_n. The cheapest fractional filling
    of L - b blocks (fastest nodes first, up to their caps) is therefore a lower bound; inf when
    the caps of A cannot hold L - b blocks. The classical per-block bound (fastest node per block,
    cc.lower_bound) is also valid; the larger of the two is used, shrunk by a relative 1e-9 so
    rounding never prunes an optimal plan. O(|A| T L) for T types."""
    tc = as_typed(cc)
    T, L = tc.D, tc.L
    cnt = tc.space.cnt if cnt is None else cnt
    capn, mn, order = fill if fill is not None else _fill_params(tc, cap)
    n_sets = cnt.shape[0]
    caps = cnt[:, order] * capn[order][None, :]  # (A, i) in speed order
    cumcap = np.concatenate([np.zeros((n_sets, 1)), np.cumsum(caps, axis=1)], axis=1)
    cumt = np.concatenate([np.zeros((n_sets, 1)), np.cumsum(caps * mn[order][None, :], axis=1)],
                          axis=1)
    r = (L - np.arange(L + 1)).astype(float)  # blocks left at b
    j = np.zeros((n_sets, L + 1), dtype=np.int64)  # (A, b): the type that fills r
    for i in range(T):
        j += cumcap[:, None, i + 1] < r[None, :]
    jj = np.minimum(j, T - 1)
    rows = np.arange(n_sets)[:, None]
    val = cumt[rows, j] + (r[None, :] - cumcap[rows, j]) * mn[order][jj]
    val = np.where(j >= T, INF, val)
    head = np.where(cnt >= 1, tc.t_head[None, :], INF).min(axis=1)  # (A,)
    val = val + head[:, None]
    val[:, L] = 0.0
    per_block = tc.lower_bound[None, :]
    return np.maximum(val * (1 - 1e-9), per_block)


def _fill_params(tc, cap: float):
    """Per type: the most blocks one node can run (memory, cap), its fastest block time, and
    the types by that time (_set_lower_bound)."""
    T, L = tc.D, tc.L
    span = np.arange(L + 1)[None, :] - np.arange(L + 1)[:, None]
    ok = np.isfinite(tc.comp) & (tc.comp <= cap)  # (T, b, c)
    capn = np.where(ok, span[None], 0).max(axis=(1, 2)).astype(float)
    mn = np.diff(tc.prefix, axis=1).min(axis=1) if L else np.zeros(T)
    return capn, mn, np.argsort(mn, kind="stable")


def _hi_windows(tc, cap: float):
    """Sparse-table query parameters of the reverse bound's windows [b + 1, hi_d(b)] (see
    _reverse_lower_bound): (level kk, start, right start rs, length ln, levels J)."""
    L = tc.L
    cs = np.arange(L + 1)
    omin = np.where(np.isfinite(tc.out), tc.out, INF).min(axis=(1, 2))  # (d,)
    omin = np.where(np.isfinite(omin), omin, 0.0)
    ok = np.isfinite(tc.comp) & (tc.comp + omin[:, None, None] <= cap)  # (d, b, c)
    ok[:, :, L] = False
    ok &= cs[None, None, :] > cs[None, :, None]
    has = ok.any(axis=2)
    hi = np.where(has, L - np.argmax(ok[:, :, ::-1], axis=2), 0)  # (d, b): last ok c
    st = cs[None, :] + 1
    ln = np.where(has, hi - st + 1, 0)
    kk = np.zeros_like(ln)
    kk[ln > 0] = np.floor(np.log2(ln[ln > 0])).astype(np.int64)
    st_c = np.where(ln > 0, st, 0)
    rs = np.where(ln > 0, hi + 1 - (1 << kk), 0)
    return kk, st_c, rs, ln, int(kk.max()) + 1


def _reverse_lower_bound(cc, use_all: bool, cap: float) -> np.ndarray:
    """H[A, d, b]: a lower bound on the sum of the stage times of blocks b..L-1 when d runs the
    stage that starts at b and the later stages use distinct nodes of A \\ {d} (d in A), every
    stage <= cap; with use_all, exactly the nodes of A. A is a count-vector state and d a type
    (solve_types; with one node per type, A is a bitmask and d a node). A reverse DP over the
    allowed set, O(S T^2 L log L) for S states, of a relaxation of the exact program:
      * a transition d -> q at cut c (c < L) costs comp[d, b, c] + out[d, q, c] =
        P_d[c] - P_d[b] (+ embedding at b = 0) + out[d, q, c] for every c in (b, hi_d(b)],
        hi_d(b) the LARGEST c < L with comp[d, b, c] finite and <= cap - min_q,c out[d, q, c]:
        a superset of the admissible cuts (memory and cap are checked only through hi);
      * the last stage pays the cheapest closure to a node outside A (the first node is outside
        A when b > 0); H[., ., 0] = 0 (no bound for the first stage).
    Fewer options never lower a minimum, so H <= the real cost-to-go of every state (A = the
    nodes outside the forward mask, plus d); it is shrunk by a relative 1e-9 for rounding."""
    tc = as_typed(cc)
    sp, T, L = tc.space, tc.D, tc.L
    if L == 0:
        return np.zeros((sp.n_states, T, L + 1))
    H = np.full((sp.n_states, T, L + 1), INF)
    kk, st_c, rs, ln, J = _hi_windows(tc, cap)
    cs = np.arange(L + 1)
    base_b = np.where(cs == 0, tc.t_embed[:, None], 0.0) - tc.prefix  # (d, b)
    tlast = tc.comp[:, :, L]  # (d, b)
    for k in range(1, sp.total + 1):
        Ak_all, mem_all, _, _ = sp.levels[k]
        for sl in _chunks(len(Ak_all), mem_all.shape[1] * T * (L + 1)):
            Ak, mem = Ak_all[sl], mem_all[sl]
            n, W = mem.shape
            # final stage on d: closure to the cheapest node outside A
            if use_all and k > 1:
                fin = np.full((n, W, L + 1), INF)
            else:
                outside = sp.cnt[Ak] < sp.counts[None, :]  # (n, T)
                clo = np.where(outside[:, None, :], tc.close[mem], INF).min(axis=2)  # (n, W)
                fin = tlast[mem] + clo[:, :, None]
                fin = np.where(fin <= cap, fin, INF)
            if k > 1:
                prev = Ak[:, None] - sp.radix[mem]  # (n, W): A \ {d}
                Y = (tc.out[mem] + H[prev]).min(axis=2)  # (n, W, c)
                Z = tc.prefix[mem] + Y
                Z[..., L] = INF
                mn, _ = _sparse_table(Z, J)
                mnf = mn.ravel()
                slab = n * W * (L + 1)
                rowoff = (np.arange(n * W).reshape(n, W) * (L + 1))[:, :, None]
                kg = kk[mem]
                left = mnf.take(kg * slab + rowoff + st_c[mem])
                right = mnf.take(kg * slab + rowoff + rs[mem])
                rmq = np.where(ln[mem] > 0, np.minimum(left, right), INF)
                fin = np.minimum(fin, base_b[mem] + rmq)
            H[Ak[:, None], mem] = fin
    H *= 1 - 1e-9
    H[:, :, 0] = 0.0
    return H


def _memo(tc, key, make, max_elems: int = 1 << 22):
    """make(), kept on tc (TypedCosts or ChainCosts) under key when it holds at most max_elems
    numbers (the per-cap tables of a repeated solve of the same cost arrays: chain_costs caches
    those). A copy of tc (copy.copy keeps the attribute) starts a memo of its own."""
    owner, memo = tc.__dict__.get("_memo", (None, None))
    if owner is not tc:  # none yet, or copied along with a copy of tc (without_nodes_above)
        owner, memo = tc, {}
        tc._memo = (owner, memo)
    if key in memo:
        return memo[key]
    val = make()
    arrays = val if isinstance(val, tuple) else getattr(val, "__dict__", {"v": val}).values()
    if sum(np.size(a) for a in arrays) <= max_elems:
        if len(memo) >= 16:
            memo.pop(next(iter(memo)))
        memo[key] = val
    return val


def _chunks(n: int, per_row: int, max_elems: int = 1 << 22):
    """Slices of range(n), each of at most max_elems / per_row rows (bounds temporaries)."""
    step = max(1, max_elems // max(per_row, 1))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _sparse_table(u: np.ndarray, J: int):
    """Range-minimum tables over the last axis: mn[j][..., b] = min u[..., b : b + 2^j] and the
    leftmost argmin ix (ties to the smaller block index)."""
    n = u.shape[-1]
    mn = np.empty((J,) + u.shape)
    ix = np.empty((J,) + u.shape, dtype=np.int64)
    mn[0] = u
    ix[0] = np.arange(n)
    for j in range(1, J):
        h = 1 << (j - 1)
        a, b = mn[j - 1][..., :n - h], mn[j - 1][..., h:]
        take_b = b < a
        mn[j][..., :n - h] = np.where(take_b, b, a)
        ix[j][..., :n - h] = np.where(take_b, ix[j - 1][..., h:], ix[j - 1][..., :n - h])
        mn[j][..., n - h:] = INF
        ix[j][..., n - h:] = 0
    return mn, ix


@dataclass
class _RangeQueries:
    """What every level of the vectorised bitmask program shares: for a stage on d ending at c
    (followed by q), the admissible first blocks b form the suffix [lo, c); the minimum over it
    is a sparse-table query of level kk over [lo_c, lo_c + 2^kk) and [rs, rs + 2^kk).
    addc[d, q, c] = P_d[c] + out[d, q, c] (inf where no b is admissible); u_off[d, b] is added
    to a state's value before the query (embedding at b = 0, - P_d[b])."""
    capped: bool
    lo: np.ndarray
    lo_c: np.ndarray
    kk: np.ndarray
    rs: np.ndarray
    J: int
    addc: np.ndarray
    u_off: np.ndarray


def _range_queries(cc: ChainCosts, cap: float) -> _RangeQueries:
    L = cc.L
    capped = bool(np.isfinite(cap))
    lo = _range_lo(cc, cap)  # (d, q, c)
    cs = np.arange(L + 1)
    # without a cap the admissible range does not depend on q (memory only): (d, c)
    lo_use = lo if capped else np.minimum(lo.min(axis=1), cs)
    length = cs - lo_use
    valid = length > 0
    kk = np.zeros_like(length)
    kk[valid] = np.floor(np.log2(length[valid])).astype(np.int64)
    rs = np.where(valid, cs - (1 << kk), 0)
    lo_c = np.where(valid, lo_use, 0)
    J = int(kk.max()) + 1 if valid.any() else 1
    addc = cc.prefix[:, None, :] + np.where(lo < cs, cc.out, INF)  # (d, q, c)
    emb = np.where(cs == 0, cc.t_embed[:, None], 0.0)  # (d, b)
    u_off = emb - cc.prefix  # (d, b)
    u_off[:, L] = INF
    return _RangeQueries(capped, lo, lo_c, kk, rs, J, addc, u_off)


def _extend(rq: _RangeQueries, U: np.ndarray, mem: np.ndarray, non: np.ndarray, D: int, L: int):
    """One transition for a batch of states: close the stage of d (a member, value U[n, k, b])
    at c and open q (a non-member) there. Returns, per (state n, q, c), the best value, the
    first block b of the closed stage and the node d that closed it."""
    n, k = mem.shape
    Q = non.shape[1]
    cs = np.arange(L + 1)
    mn, ix = _sparse_table(U + rq.u_off[mem], rq.J)  # (J, n, k, b)
    mnf, ixf = mn.ravel(), ix.ravel()
    slab = n * k * (L + 1)
    rowoff = (np.arange(n * k).reshape(n, k) * (L + 1))
    if not rq.capped:
        kk_g, lo_g, rs_g = rq.kk[mem], rq.lo_c[mem], rq.rs[mem]  # (n, k, c)
        base = kk_g * slab + rowoff[:, :, None]
        left, right = mnf.take(base + lo_g), mnf.take(base + rs_g)
        take_r = right < left
        rmq = np.where(take_r, right, left)
        barg = np.where(take_r, ixf.take(base + rs_g), ixf.take(base + lo_g))
        val = rmq[:, :, None, :] + rq.addc[mem[:, :, None], non[:, None, :]]  # (n, k, Q, c)
        dpos = np.argmin(val, axis=1)  # (n, Q, c)
        vbest = np.take_along_axis(val, dpos[:, None], axis=1)[:, 0]
        bbest = np.take_along_axis(barg.reshape(n, -1), (dpos * (L + 1) + cs).reshape(n, -1),
                                   axis=1).reshape(n, Q, L + 1)
    else:
        # flat sparse-table positions of the two halves of each range query:
        # (level, row, first block) -> level * slab + row + block, per (d, q, c)
        pair = mem[:, :, None] * D + non[:, None, :]  # (n, k, Q)
        row4 = rowoff[:, :, None, None]
        li = (rq.kk * slab + rq.lo_c).reshape(D * D, L + 1)[pair] + row4  # (n, k, Q, c)
        ri = (rq.kk * slab + rq.rs).reshape(D * D, L + 1)[pair] + row4
        left, right = mnf.take(li), mnf.take(ri)
        val = np.minimum(left, right) + rq.addc.reshape(D * D, L + 1)[pair]
        dpos = np.argmin(val, axis=1)  # (n, Q, c)
        # flat positions of the chosen d in the (n, k, Q, c) arrays (one index, many takes)
        fsel = ((np.arange(n)[:, None, None] * k + dpos) * Q
                + np.arange(Q)[None, :, None]) * (L + 1) + cs

        def sel(A):
            return A.reshape(-1).take(fsel)

        vbest = sel(val)
        bbest = np.where(sel(right) < sel(left), ixf.take(sel(ri)), ixf.take(sel(li)))
    dbest = np.take_along_axis(mem, dpos.reshape(n, -1), axis=1).reshape(n, Q, L + 1)
    return vbest, bbest, dbest


def _last_stage_times(tc, f, Ms, mem, k: int, cap: float, relax_first: bool):
    """(n, W, b): the time of d's stage [b, L) as the last one, with its ring closure (none at
    k = 1: one stage); to the first type f (n,), or with relax_first the cheapest closure to
    another node of the state (another type, or another node of d's own type)."""
    L = tc.L
    if k == 1:
        clo = np.zeros(mem.shape)
    elif relax_first:
        others = tc.space.cnt[Ms][:, None, :] - (mem[:, :, None] == np.arange(tc.D))
        clo = np.where(others >= 1, tc.close[mem], INF).min(axis=2)  # (n, W)
    else:
        clo = tc.close[mem, f[:, None]]
    tl = tc.comp[mem, :, L] + clo[:, :, None]
    return np.where(tl <= cap, tl, INF) if np.isfinite(cap) else tl


@dataclass
class _Level:
    """The reached states of one level (total count k) of the forward program: keys (sorted)
    = first type x n_states + count-vector state (first type 0 when relaxed), V[row, d, b] the
    min sum of the finished stages with d's stage starting at b, back-pointers BPd (previous
    type) and BPb (its first block)."""
    keys: np.ndarray
    V: np.ndarray
    BPd: np.ndarray
    BPb: np.ndarray


def _first_level(tc, relax_first: bool) -> _Level:
    sp, T, L = tc.space, tc.D, tc.L
    fs = np.arange(T)
    keys = sp.radix[fs] + (0 if relax_first else fs * sp.n_states)
    order = np.argsort(keys)
    V = np.full((T, T, L + 1), INF)
    V[np.arange(T), fs[order], 0] = 0.0
    return _Level(keys[order], V, np.full(V.shape, -1, dtype=np.int16),
                  np.full(V.shape, -1, dtype=np.int32))


def _next_level(pieces, T: int, L: int) -> _Level | None:
    """Merge the extensions of one level (target key, type q, values, back-pointers) into the
    next level's rows (one per reached key; pads repeat identical entries)."""
    pieces = [p for p in pieces if p[0].size]
    if not pieces:
        return None
    tk, q, vb, db, bb = (np.concatenate(x) for x in zip(*pieces))
    keys, inv = np.unique(tk, return_inverse=True)
    V = np.full((keys.size, T, L + 1), INF)
    BPd = np.full(V.shape, -1, dtype=np.int16)
    BPb = np.full(V.shape, -1, dtype=np.int32)
    V[inv, q], BPd[inv, q], BPb[inv, q] = vb, db, bb
    return _Level(keys, V, BPd, BPb)


def _expand(tc, lvl: _Level, rows: slice, k: int, rq, fill, hrev, use_all: bool, cap: float,
            relax_first: bool, best: list):
    """Expand rows of level k: prune by the bounds (fill: the set bound's table over every
    state, or its _fill_params), record a plan that ends here (in best: [value, (level, key,
    d, b)]), extend to level k + 1. Returns (states expanded, piece)."""
    sp, L = tc.space, tc.L
    keys = lvl.keys[rows]
    f, Ms = keys // sp.n_states, keys % sp.n_states
    mem, pad = padded(sp.cnt[Ms] >= 1)
    U = lvl.V[rows][np.arange(keys.size)[:, None], mem]  # (n, W, b)
    U[pad] = INF
    # prune: blocks b.. still go to d and the nodes outside the state
    avail = (sp.full - Ms)[:, None] + sp.radix[mem]  # (n, W)
    lbk = fill[avail] if isinstance(fill, np.ndarray) else \
        _set_lower_bound(tc, cap, sp.cnt[avail.ravel()], fill).reshape(avail.shape + (L + 1,))
    if hrev is not None:
        lbk = np.maximum(lbk, hrev[avail, mem])
    U = np.where(U + lbk < best[0], U, INF)
    alive = np.nonzero(np.isfinite(U).any(axis=(1, 2)))[0]
    empty = (np.zeros(0, dtype=np.int64),) * 2 + (np.zeros((0, L + 1)),) + \
        (np.zeros((0, L + 1), dtype=np.int64),) * 2
    if not alive.size:
        return 0, empty
    keys, f, Ms, mem, U = keys[alive], f[alive], Ms[alive], mem[alive], U[alive]
    if not use_all or k == sp.total:
        tot = U + _last_stage_times(tc, f, Ms, mem, k, cap, relax_first)
        i = int(np.argmin(tot))
        v = float(tot.flat[i])
        if v < best[0]:
            n_, dp_, b = np.unravel_index(i, tot.shape)
            best[:] = [v, (k, int(keys[n_]), int(mem[n_, dp_]), int(b))]
    if k == sp.total:
        return int(alive.size), empty
    non, _ = padded(sp.cnt[Ms] < sp.counts[None, :])
    vbest, bbest, dbest = _extend(rq, U, mem, non, tc.D, L)
    tk = keys[:, None] + sp.radix[non]  # (n, Q)
    live = np.isfinite(vbest).any(axis=2)
    return int(alive.size), (tk[live], non[live], vbest[live], dbest[live], bbest[live])


def _backtrack(found, levels: list[_Level], radix, n_states: int, L: int):
    k, key, d, b = found
    path = [(d, b, L)]
    while not (key % n_states == radix[d] and b == 0):
        lvl = levels[k - 1]
        row = int(np.searchsorted(lvl.keys, key))
        pd, pb = int(lvl.BPd[row, d, b]), int(lvl.BPb[row, d, b])
        key -= int(radix[d])
        k -= 1
        path.append((pd, pb, b))
        d, b = pd, pb
    return list(reversed(path))


def _bitmask_dp_vec(cc, use_all: bool, cap: float = INF, incumbent: float = INF,
                    relax_first: bool = False, hrev=None):
    """The exact program over count vectors of types (solve_types; with one node per type,
    the bitmask program), vectorised over the reached states of one level (total count).
    States (f, state, d, b): first type f, types used (count vector), type d whose stage starts
    at block b. A stage [b, c) on d costs P_d[c] - P_d[b] (+ embedding at b = 0), so min_b
    (V[b] + cost) over the admissible suffix b in [lo, c) is a range-minimum query, answered for
    a whole batch of (state, d in state, q not exhausted, c) from sparse tables (_range_queries,
    _extend): O(S T^3 L log L) work for S states and T types, in O(T) numpy passes per level,
    batched to bound the temporaries. Only states reached below the bounds are stored (a level
    at a time, sorted keys), so memory and work follow the pruned search, not S. Returns
    (value, type path, states expanded); a ChainCosts is read as one type per node, so its
    paths are node paths.

    relax_first: drop f from the state (a T / 2 times smaller program) and charge the last stage
    the cheapest ring closure to any other node of the state (none for a single-stage plan).
    Every plan keeps its stages and pays at most its real closure, so the value is a lower
    bound on the exact one and "no plan below the incumbent" is exact; the plan returned is a
    real plan (its first type is read from the back-pointers) whose real sum may be larger
    (see _bitmask_dp)."""
    tc = as_typed(cc)
    sp, T, L = tc.space, tc.D, tc.L
    rq = _memo(tc, ("rq", cap), lambda: _range_queries(tc, cap))
    fill = _memo(tc, ("fill", cap), lambda: _fill_params(tc, cap))
    if sp.n_states <= 1 << 14:  # small: the whole table at once (else per expanded batch)
        fill = _memo(tc, ("lbt", cap), lambda: _set_lower_bound(tc, cap, fill=fill))
    best, work = [incumbent, None], 0
    levels = [_first_level(tc, relax_first)]
    for k in range(1, sp.total + 1):
        lvl, pieces = levels[-1], []
        W = int(sp.counts.size)
        for sl in _chunks(lvl.keys.size, W * W * (L + 1)):
            n, piece = _expand(tc, lvl, sl, k, rq, fill, hrev, use_all, cap, relax_first, best)
            work += n
            pieces.append(piece)
        nxt = _next_level(pieces, T, L)
        if nxt is None:
            break
        levels.append(nxt)
    if best[1] is None:
        return best[0], None, work
    return best[0], _backtrack(best[1], levels, sp.radix, sp.n_states, L), work


def _bitmask_dp(cc, use_all: bool, cap: float = INF, incumbent: float = INF,
                enough=None):
    """The exact program (types or nodes, see _bitmask_dp_vec), first run without the first
    type in the state.

    The relaxed run (_bitmask_dp_vec(relax_first=True)) charges every plan at most its real cost,
    so (a) no relaxed plan below the incumbent means no real one either, and (b) when the relaxed
    optimum's closure is the one it was charged (its last node's cheapest closure in the state is
    to its actual first node, or it has one stage) its relaxed value is its real value computed
    with the same floating-point operations as the exact program, and no plan is cheaper: it is
    returned as is. Otherwise the exact program (first type in the state) runs, with the relaxed
    plan's real sum as incumbent when that plan satisfies the cap (the exact program then finds
    it or a cheaper plan). In the throughput search most capped runs end in (a) or (b), which
    removes the ~T / 2 factor that the first type adds to the state space.

    enough(sum) -> bool: a caller that needs only SOME real plan with every stage <= cap and
    a sum it accepts (the throughput search's "predicate true") gets the relaxed plan as it is
    when its real stage times qualify, returned with its real sum (not then the minimum)."""
    tc = as_typed(cc)
    hrev = None if tc.n_keys <= SMALL_KEYS else \
        _memo(tc, ("hrev", use_all, cap), lambda: _reverse_lower_bound(tc, use_all, cap))
    v, p, w = _bitmask_dp_vec(tc, use_all, cap, incumbent, relax_first=True, hrev=hrev)
    if p is None or len(p) == 1:
        return v, p, w
    f, dl = p[0][0], p[-1][0]
    others = np.bincount([d for d, _, _ in p], minlength=tc.D)
    others[dl] -= 1
    if tc.close[dl, f] == tc.close[dl][others >= 1].min():
        return v, p, w
    ts = _stage_times(tc, p)
    if enough is not None and max(ts) <= cap and enough(sum(ts)):
        return sum(ts), p, w
    if max(ts) <= cap:
        incumbent = min(incumbent, sum(ts) * (1 + 1e-9) + 1e-15)
    v2, p2, w2 = _bitmask_dp_vec(tc, use_all, cap, incumbent, hrev=hrev)
    return v2, p2, w + w2


def _to_stages(costs, path) -> list[Stage]:
    """Stages of a path over costs (a ChainCosts: node indices; TypedCosts: type indices)."""
    if isinstance(costs, TypedCosts):
        costs, path = costs.cc, costs.node_path(path)
    return [Stage(costs.ids[d], b, c) for d, b, c in path]


def _stage_times(cc, path) -> list[float]:
    """Stage times of a path (node or type indices; the last stage pays the closure to the
    first unless it is the only one: two stages of one type run on distinct nodes)."""
    S = len(path)
    ts = []
    for s, (d, b, c) in enumerate(path):
        if s < S - 1:
            ts.append(cc.comp[d, b, c] + cc.out[d, path[s + 1][0], c])
        else:
            ts.append(cc.comp[d, b, c] + (cc.close[d, path[0][0]] if S > 1 else 0.0))
    return ts


def _candidate_caps(cc: ChainCosts, upto: float) -> np.ndarray:
    """Every stage time a plan can have (sorted, unique, <= upto): the bottleneck is one."""
    if isinstance(cc, TypedCosts) and cc.exact:  # twin types have their nodes' stage times
        cc = cc.cc
    memo = _memo(cc, "cands", lambda: ([],))[0]  # [upto, candidates] of the last call
    if memo and memo[0] >= upto:  # a search with a larger upper end: the same set, cut
        return memo[1][:int(np.searchsorted(memo[1], upto, side="right"))]
    L = cc.L
    vals = [(cc.comp[:, None, :, 1:L] + cc.out[:, :, None, 1:L]).ravel(),
            (cc.comp[:, None, :, L] + cc.close[:, :, None]).ravel(),
            cc.comp[:, :, L].ravel()]  # single stage: no closure
    v = np.concatenate(vals)
    v = np.unique(v[np.isfinite(v) & (v <= upto)])
    if v.size <= 1 << 22:  # (kept like _memo's tables: the seed's search, then the exact one's)
        memo[:] = [upto, v]
    return v


def _throughput_search(cc, dp, val, path, B, D, floor_within: float = 0.0):
    """min over plans of f = max(S / B, M) (S: sum, M: bottleneck), from a first plan `path`
    (the min-sum plan, of sum val, or any plan with val None); D nodes. Returns (best, runs,
    floor): best = [f, plan], floor <= the optimum (= best[0] when the search ran to the end).

    Let S(T) = min sum subject to every stage <= T (the capped DP) and G(T) = max(S(T) / B, T).
    The optimum is min over the candidate stage times T of G(T): a plan p is no better than the
    capped DP's plan at T = M_p. The search keeps an incumbent `best` (a real plan) and the index
    range [lo, hi) of candidates that may still beat it, each DP run at T = cands[mid] being
    pruned at sum >= B best (only plans that beat the incumbent are looked for):
      * a plan found with S / B <= T: for every T' >= T, G(T') >= T >= f_p >= best: hi = mid;
      * a plan found with S / B > T, or no plan below the bound: for every T' <= T,
        G(T') >= S(T') / B >= S(T) / B >= best: lo = mid + 1;
      * candidates >= best are excluded (G(T) >= T), and so are those below S_min / D (no plan
        has M < S / D).
    Every plan found updates `best`. When the range is empty every candidate is excluded, so
    best is optimal. Probes (they only decide how fast the range empties, not the answer): first
    and after a predicate-false run, the candidate just below the incumbent (S(T') <= S(T) =
    B best there, so it often proves the rest); after a predicate-true run, galloping down from
    the incumbent (0.1 %, 0.2 %, 0.4 % ... below it; once that falls into the range a run with
    no plan excluded, the candidate just below the incumbent again); after a run with no plan,
    bisection.

    At any point min(best, cands[lo]) is a lower bound on the optimum (every excluded candidate
    has G >= best, every remaining one G >= T >= cands[lo]). floor_within > 0 (a caller that
    needs only a lower bound: the relaxation of _solve_bounded) stops as soon as that bound is
    within floor_within (relative) of the incumbent, and returns it as floor."""
    ts0 = _stage_times(cc, path)
    best = [max(sum(ts0) / B, max(ts0)), path]

    def offer(p):
        ts = _stage_times(cc, p)
        f = max(sum(ts) / B, max(ts))
        if f < best[0]:
            best[0], best[1] = f, p
        return sum(ts), max(ts)

    n_dp = 0
    if val is not None and val / B >= max(ts0):
        return best, n_dp, best[0]  # the min-sum plan is latency bound: S / B bounds all
    cands = _candidate_caps(cc, best[0])
    lo = 0 if val is None else int(np.searchsorted(cands, val / D * (1 - 1e-12)))
    hi = int(np.searchsorted(cands, best[0]))
    last = None
    step = 1e-3
    while lo < hi and cands[lo] < best[0] * (1 - floor_within):
        if last in (None, "false"):
            mid = hi - 1  # S(T') <= S(T) = B best for T' > T: try just below the incumbent
        elif last == "true":
            # the incumbent is usually close to the optimum: gallop down from it
            mid = int(np.searchsorted(cands, best[0] * (1 - step)))
            step *= 2
            if mid <= lo:  # a run with no plan already excluded that far: try to close
                mid = hi - 1
        else:
            mid = (lo + hi) // 2
        mid = min(max(mid, lo), hi - 1)
        T = cands[mid]
        # any plan with S / B <= T decides this probe (hi = mid), the minimum is not needed
        v, p = dp(T, bound=B * best[0] * (1 + 1e-9) + 1e-15, enough=lambda s_: s_ / B <= T)
        n_dp += 1
        if p is not None:
            s_, m_ = offer(p)
            if s_ / B <= T:
                hi = mid
                last = "true"
            else:
                lo = mid + 1
                last = "false"
            if last == "false" or mid < hi - 1:
                step = 1e-3
        else:
            lo = mid + 1
            last = "none"
        hi = min(hi, int(np.searchsorted(cands, best[0])))
    return best, n_dp, (min(best[0], float(cands[lo])) if lo < hi else best[0])



def _solve(cluster, objective: str, workload: Workload, runtime: str, use_all_nodes: bool,
           order: Sequence[str] | None, name: str, max_keys: int | None = None) -> SplitResult:
    t0 = time.perf_counter()
    ids = sorted(cluster.ids) if order is None else list(order)
    metric = "prefill" if objective == "ttft" else "decode"
    cc = chain_costs(cluster, workload, runtime, metric, ids)
    keys = MAX_KEYS if max_keys is None else max_keys
    if cc.protocol.head_on_every_rank:
        return _solve_paced(cc, objective, use_all_nodes, order is not None, name, t0, keys)
    return _solve_cc(cc, objective, use_all_nodes, order is not None, name, t0, max_keys=keys)


_CACHE: dict = {}
_CACHE_SIZE = 16


def chain_costs(cluster, workload: Workload, runtime: str, metric: str,
                ids: Sequence[str]) -> ChainCosts:
    """ChainCosts of the cluster, cached: a repeated solve of the same cluster, workload and
    runtime skips the O(D L^2 + D^2 L) construction. The key holds every input the arrays
    are derived from (node tables by identity, usable memory, links, runtime measurements);
    cost tables are not modified in place anywhere in the project (derive_table copies)."""
    key = (tuple(ids), workload, runtime, metric,
           tuple((n.id, id(n.table), n.memory_bytes) for n in cluster.nodes),
           tuple(sorted(cluster.links.items())), cluster.default_link,
           repr(sorted((cluster.runtimes or {}).items())))
    hit = _CACHE.get(key)
    if hit is not None:
        return hit[0]
    cc = ChainCosts(cluster, workload, runtime, metric, ids=ids)
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (cc, [n.table for n in cluster.nodes])  # the tables stay alive: ids unique
    return cc


def _plan_pace(cc: ChainCosts, path) -> float:
    return max(cc.pace[d] for d, _, _ in path)


def _solve_paced(cc: ChainCosts, objective: str, use_all_nodes: bool, given_order: bool,
                 name: str, t0: float, max_keys: int = INF) -> SplitResult:
    """Exact minimum of sum of stage times + max over the plan's nodes of pace (the head that
    every rank runs: exo-current).

    Problem: the max term makes the objective non-additive. Method: enumerate its value. For
    each distinct pace H (ascending), the best plan using only nodes with pace <= H costs
    S(H) + H at most, and the optimum is min_H S(H) + H (its own max pace is one such H).
    S(H) >= S(max) (fewer nodes never help), so the scan stops once S(max) + H reaches the
    incumbent; every DP run is pruned at the incumbent minus H. At most D extra DP runs.
    Where the programs only bound S(H) (too many node types), the result is a bound:
    min over the scanned H of (bound on S(H)) + H, and the incumbent for the others.
    Throughput and Pareto reduce to latency: the all-gather is a barrier every step, so the
    bottleneck is the whole time per token (see graphsplit.costmodel).
    """
    metric_obj = "ttft" if objective == "ttft" else "latency"
    first = _solve_cc(cc, metric_obj, use_all_nodes, given_order, name, t0, max_keys=max_keys)
    if first.stages is None:
        return first
    idx = {n: i for i, n in enumerate(cc.ids)}

    def path_of(r):
        return [(idx[st.node], st.start_layer, st.end_layer) for st in r.stages]

    base = first.lower_bound
    best_p = path_of(first)
    best = sum(_stage_times(cc, best_p)) + _plan_pace(cc, best_p)
    work, lbs = first.nit, []
    for H in sorted(set(cc.pace.tolist())):
        if base + H >= best:
            break
        r = _solve_cc(cc.without_nodes_above(H), metric_obj, use_all_nodes, given_order, name,
                      t0, bound=(best - H) * (1 + 1e-9) + 1e-15, max_keys=max_keys)
        work += r.nit
        if r.proven == BOUND:
            lbs.append(r.lower_bound + H)
        if r.stages is None:
            continue
        p = path_of(r)
        v = sum(_stage_times(cc, p)) + _plan_pace(cc, p)
        if v < best:
            best, best_p = v, p
    stages = _to_stages(cc, best_p)
    lb = min(lbs + [best])
    proven = _label(given_order, best, lb)
    note = "" if objective in ("latency", "ttft") else \
        f" ({objective} = latency under {cc.runtime}: one step in flight)"
    extra = {}
    if objective == "pareto":
        extra = {"frontier": [{"tpot_s": best, "bottleneck_s": best,
                               "throughput_tps": 1 / best if best > 0 else INF,
                               "stages": stages}]}
    return SplitResult(stages, best, proven != BOUND, 0 if proven != BOUND else 1,
                       f"{metric_obj} {_where(proven)}, head pace enumerated{note}",
                       name, time.perf_counter() - t0, work, extra, proven=proven,
                       lower_bound=lb)


def _label(given_order: bool, fun: float, lower_bound: float) -> str:
    """What a value with this lower bound proves (equal up to rounding: optimal)."""
    if lower_bound >= fun * (1 - 1e-9) - 1e-15:
        return GIVEN_ORDER if given_order else ALL_ORDERS
    return BOUND


def _where(proven: str) -> str:
    return {ALL_ORDERS: "optimal over all node orders and subsets",
            GIVEN_ORDER: "optimal over the given node order",
            BOUND: "best found (a bound, not proven optimal)"}[proven]


def _fastest_first(cc: ChainCosts, nodes=None) -> list[int]:
    """Node indices (all, or `nodes`) by total block time, then id: a canonical order for seeds
    and plans."""
    return sorted(range(cc.D) if nodes is None else nodes, key=lambda d: (cc.prefix[d, -1], d))


def _solve_cc(cc: ChainCosts, objective: str, use_all_nodes: bool, given_order: bool,
              name: str, t0: float, bound: float = INF, max_keys: int = INF) -> SplitResult:
    """The DP solvers on prebuilt cost arrays (additive stage times); `bound`: only plans
    below it are looked for (latency / ttft). given_order: over subsequences of cc.ids (the
    order); else over every order and subset, exactly on the node types (solve_types) when
    the program has at most max_keys states x types, else a bound (_solve_bounded)."""
    if given_order:
        return _solve_on(cc, objective, use_all_nodes, list(range(cc.D)), name, t0, bound)
    tc = typed_costs(cc)
    if tc.n_keys * (tc.L + 1) <= max_keys:
        return _solve_on(tc, objective, use_all_nodes, None, name, t0, bound)
    return _solve_bounded(cc, tc, objective, use_all_nodes, name, t0, max_keys)


def _fastest_types(tc: TypedCosts, max_keys: int) -> TypedCosts | None:
    """The exact program over the fastest types (total block time of their first node, then
    id), as many as fit max_keys: its plans are plans of the cluster."""
    order = sorted(range(tc.D), key=lambda t: (tc.cc.prefix[tc.members[t][0], -1], tc.ids[t]))
    keep = []
    for t in order:
        if n_keys([len(tc.members[u]) for u in keep + [t]]) * (tc.L + 1) > max_keys:
            break
        keep.append(t)
    return TypedCosts(tc.cc, [tc.members[t] for t in sorted(keep)], exact=True) if keep else None


def _solve_bounded(cc: ChainCosts, tc: TypedCosts, objective: str, use_all_nodes: bool,
                   name: str, t0: float, max_keys: int) -> SplitResult:
    """More node types than the exact program can hold in max_keys: the better of the
    fixed-order optimum over the canonical order (fastest first) and, unless every node must
    be used, the exact optimum over the fastest types that fit, as the plan; a proven lower
    bound on the optimum of the coarsened relaxation (solve_types.coarsen: merged types,
    element-wise minimum costs), within RELAX_FLOOR of it for throughput, exact otherwise, as
    the lower bound. Deterministic (a size, no time limit); labelled "bound" unless
    the two meet. The exact program over the fastest types gets a quarter of max_keys, the
    relaxation half of it (merging fewer nodes per group tightens the bound)."""
    up = _solve_on(cc, objective, use_all_nodes, _fastest_first(cc), name, t0)
    work, limit, max_keys = up.nit, max_keys, max_keys // 4
    fast = None if use_all_nodes else _fastest_types(tc, max_keys)
    if fast is not None:
        sub = _solve_on(fast, objective, False, None, name, t0)
        work += sub.nit
        if sub.stages is not None and (up.stages is None or sub.fun < up.fun):
            up = sub
    if up.stages is None:  # no plan in this order: the relaxation still bounds
        up = SplitResult(None, INF, False, 1, "", name)
    rc = coarsen(tc, max(1, 2 * max_keys // (tc.L + 1)))  # (half of the limit)
    seed = None if up.stages is None else rc.type_path(
        [(cc.ids.index(s.node), s.start_layer, s.end_layer) for s in up.stages])
    low = _solve_on(rc, "latency" if objective == "pareto" else objective, use_all_nodes, None,
                    name, t0, seed_path=seed, floor_within=RELAX_FLOOR)
    # inf: the relaxation has no plan, so neither has the cluster
    lb = (low.fun if low.status == 2 else low.lower_bound) * (1 - 1e-9)
    if up.stages is None:
        if not np.isfinite(lb):
            return _infeasible(name, t0, work + low.nit)
        return SplitResult(None, INF, False, 1, f"no plan found over the canonical order; "
                           f"a plan may exist (lower bound {lb:.6g})", name,
                           time.perf_counter() - t0, work + low.nit, proven=BOUND,
                           lower_bound=lb)
    proven = _label(False, up.fun, lb)
    msg = (f"{objective} {_where(proven)}: {tc.D} node types exceed the exact program's size "
           f"limit ({limit}); plan = the best of the optimum for the nodes fastest first and "
           "the optimum over the fastest types, lower bound = "
           + (f"a proven floor within {RELAX_FLOOR:.0%} of the optimum" if objective ==
              "throughput" else "the exact optimum") + f" over {rc.D} merged groups")
    return SplitResult(up.stages, up.fun, proven != BOUND, 0 if proven != BOUND else 1, msg,
                       name, time.perf_counter() - t0, work + low.nit, up.extra,
                       proven=proven, lower_bound=lb)


def _solve_on(sc, objective: str, use_all_nodes: bool, order: list[int] | None, name: str,
              t0: float, bound: float = INF, seed_path=None,
              floor_within: float = 0.0) -> SplitResult:
    """One objective on one program: sc a ChainCosts with `order` (node indices: fixed-order
    DP over its subsequences) or a TypedCosts with order None (the count-vector program over
    every order and subset; exact types: optimal, merged groups: a lower bound)."""
    cc = sc.cc if isinstance(sc, TypedCosts) else sc
    fastest = _fastest_first(cc, sorted(d for g in sc.members for d in g)
                             if isinstance(sc, TypedCosts) else None)
    B = cc.workload.micro_batches  # M = ceil(B / batch) share the ring (graphsplit.batching)
    work_total = [0]
    proven = ALL_ORDERS if order is None else GIVEN_ORDER
    where = _where(proven)

    def dp(cap=INF, bound=INF, enough=None):
        """min sum s.t. every stage <= cap; only plans with sum < bound are looked for; any
        plan whose sum enough() accepts will do (see _bitmask_dp)."""
        if order is None:
            v, p, w = _bitmask_dp(sc, use_all_nodes, cap, bound, enough)
        else:
            v, p, w = _ring_dp(sc, order, use_all_nodes, cap, bound)
        work_total[0] += w
        return (v, p) if p is not None else (INF, None)

    def result(path, fun, msg, extra=None, floor=None):
        return SplitResult(_to_stages(sc, path) if isinstance(sc, ChainCosts) or sc.exact
                           else None, fun, True, 0, msg, name, time.perf_counter() - t0,
                           work_total[0], extra or {},
                           proven=proven if floor is None else _label(order is not None, fun,
                                                                      floor),
                           lower_bound=fun if floor is None else floor)

    if objective == "throughput" and order is None and len(fastest) > 2:
        # a fixed-order optimum (cheap, fastest nodes first) is the first incumbent; the search
        # needs no min-sum run (see _throughput_search)
        if seed_path is None:
            fo = _solve_on(cc, "throughput", use_all_nodes, fastest, "seed", t0)
            work_total[0] += fo.nit
            if fo.stages is not None:
                seed_path = sc.type_path([(cc.ids.index(st.node), st.start_layer,
                                           st.end_layer) for st in fo.stages])
        if seed_path is not None:
            best, n_dp, floor = _throughput_search(sc, dp, None, seed_path, B, len(fastest),
                                                   floor_within)
            return result(best[1], best[0], f"throughput for {B} stream(s) {where} "
                          f"({n_dp} capped DP runs after a fixed-order seed)", floor=floor)
    seed = INF
    if order is None and len(fastest) > 1 and sc.n_keys > SMALL_KEYS:
        # branch-and-bound seed: the fixed-order DP with the fastest nodes first (cheap)
        v, p, w = _ring_dp(cc, fastest, use_all_nodes)
        work_total[0] += w
        if p is not None:
            seed = v * (1 + 1e-9) + 1e-15
    val, path = dp(bound=min(seed, bound))
    if path is None:
        return _infeasible(name, t0, work_total[0], proven)
    if objective in ("latency", "ttft"):
        return result(path, val, f"{objective} {where}")
    if objective not in ("throughput", "pareto"):
        raise ValueError(objective)
    if objective == "throughput":
        best, n_dp, floor = _throughput_search(sc, dp, val, path, B, len(fastest),
                                               floor_within)
        return result(best[1], best[0],
                      f"throughput for {B} stream(s) {where} ({n_dp + 1} DP runs)", floor=floor)
    pts, complete = _pareto_walk(sc, dp, val, path)
    extra = {"frontier": [{"tpot_s": s_, "bottleneck_s": m,
                           "throughput_tps": min(B / s_, 1 / m) if s_ > 0 else INF,
                           "stages": _to_stages(sc, p)} for s_, m, p in pts]}
    s_, m, p = pts[0]  # the plan shown is the latency-optimal end of the frontier
    msg = (f"exact Pareto frontier of latency vs bottleneck, {where}: {len(pts)} points"
           + ("" if complete else f" (stopped at {MAX_PARETO_POINTS}; lower bottlenecks exist)"))
    return result(p, s_, msg, extra)


def _pareto_walk(sc, dp, val, path):
    """The (sum, max) frontier: walk the cap down from the min-sum plan's bottleneck; returns
    (points without dominated ones, complete)."""
    m0 = max(_stage_times(sc, path))
    frontier = [(val, m0, path)]
    cap = m0 * (1 - REL)  # "strictly lower" up to rounding of sums
    complete = True
    while True:
        if len(frontier) >= MAX_PARETO_POINTS:
            complete = False
            break
        v, p = dp(cap)
        if p is None:
            break
        m = max(_stage_times(sc, p))
        frontier.append((v, m, p))
        cap = m * (1 - REL)
    pts = []
    for s_, m, p in frontier:  # drop dominated points (equal sum up to rounding, larger max)
        if pts and s_ <= pts[-1][0] * (1 + REL):
            pts[-1] = (s_, m, p)
        else:
            pts.append((s_, m, p))
    return pts, complete


def _infeasible(name, t0, work, proven: str = ALL_ORDERS) -> SplitResult:
    return SplitResult(None, INF, True, 2, "infeasible: no split fits the nodes' memory", name,
                       time.perf_counter() - t0, work, proven=proven)


def solve_fixed_order(cluster, objective: str = "latency", workload: Workload = Workload(),
                      runtime: str = "exo-current", use_all_nodes: bool = False,
                      order: Sequence[str] | None = None) -> SplitResult:
    """Exact DP for a chain with the node order fixed (default: the cluster file's order):
    proven optimal for that order only (label "optimal-given-order").

    Nodes may be skipped unless use_all_nodes. O(D^3 L^2) time per DP run, O(D L) memory.
    """
    return _solve(cluster, objective, workload, runtime, use_all_nodes,
                  list(order) if order is not None else cluster.ids, "fixed-order-dp")


def solve_bitmask(cluster, objective: str = "latency", workload: Workload = Workload(),
                  runtime: str = "exo-current", use_all_nodes: bool = False,
                  max_keys: int | None = None) -> SplitResult:
    """Exact DP over node order AND subset, on node types (graphsplit.solve_types).

    Interchangeable nodes (twins: same cost arrays, symmetric links) form types; the program
    runs over count vectors of types (a bitmask over nodes sorted by id when every node is its
    own type): O(S T^3 L log L) work per DP run for S = prod_t (n_t + 1) states and T types,
    pruned by branch and bound; O(S T L) memory. Exact (label "optimal-all-orders-subsets")
    while S x T <= max_keys (default MAX_KEYS: about 16 distinct nodes, or many more in few
    types); beyond, the best plan found with a proven lower bound (label "bound", see
    _solve_bounded). The answer does not depend on the order of the cluster's nodes.
    """
    return _solve(cluster, objective, workload, runtime, use_all_nodes, None, "bitmask-dp",
                  max_keys)


def verify(cluster, result: SplitResult, objective: str, workload: Workload, runtime: str):
    """Recompute the objective of a result with the reference cost model (for tests)."""
    from graphsplit.costmodel import objective_value
    return objective_value(predict(cluster, result.stages, workload, runtime), objective, workload)
