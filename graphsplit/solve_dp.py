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
  starts from the fixed-order optimum (fastest nodes first, cheap) and needs no min-sum run.
  About 6-8 capped runs at 80 x 8 and 126 x 12.
* pareto: min sum, then min sum with every stage strictly below the last plan's bottleneck,
  until infeasible: the exact (sum, max) frontier (at most MAX_PARETO_POINTS points).

Complexity: fixed order O(D^3 L^2) per run (per key, numpy L x L min-plus products). Bitmask:
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
from graphsplit.result import SplitResult

INF = np.inf
MAX_PARETO_POINTS = 200
REL = 1e-9  # relative tolerance: sums of the same times in another order differ by rounding


def _ring_dp(cc: ChainCosts, order: Sequence[int] | None, use_all: bool, cap: float = INF,
             incumbent: float = INF):
    """Min sum of stage times subject to every stage time <= cap.

    order=None: bitmask mode (any order, any subset); else nodes are used in this order (a
    subsequence of it; the whole of it when use_all). Returns (value, [(node_index, b, c)], work).
    """
    D, L = cc.D, cc.L
    comp, out, close = cc.comp, cc.out, cc.close
    lb = cc.lower_bound  # lb[b]: lower bound on the sum of stage times for blocks b..L-1
    capped = np.isfinite(cap)
    best_val, best_path = incumbent, None
    work = 0
    if order is None:
        K = D
        node_of = list(range(D))
        n_keys = (1 << D) * D
    else:
        K = len(order)
        node_of = list(order)
        n_keys = K
    firsts = [0] if (order is not None and use_all) else range(K)
    full = (1 << K) - 1
    for f in firsts:
        V = np.full((n_keys, L + 1), INF)
        BPK = np.full((n_keys, L + 1), -1, dtype=np.int64)
        BPB = np.full((n_keys, L + 1), -1, dtype=np.int64)
        fn = node_of[f]
        start = ((1 << f) * D + f) if order is None else f
        V[start, 0] = 0.0
        found = None
        if order is None:
            keys = ((m, p) for m in range(1, full + 1) if m >> f & 1
                    for p in range(K) if m >> p & 1)
        else:
            keys = ((0, p) for p in range(f, K))
        for mask, p in keys:
            key = mask * D + p if order is None else p
            v = V[key]
            vb = v + lb
            alive = vb < best_val
            if not alive.any():
                continue
            work += 1
            v = np.where(alive, v, INF)
            d = node_of[p]
            # close the ring here: the stage [b, L) on d is the last one
            final_ok = (mask == full) if (order is None and use_all) else \
                (p == K - 1 if use_all else True)
            if final_ok:
                tl = comp[d, :, L] + (close[d, fn] if d != fn else 0.0)
                if capped:
                    tl = np.where(tl <= cap, tl, INF)
                tot = v + tl
                b = int(np.argmin(tot))
                if tot[b] < best_val:
                    best_val, found = float(tot[b]), (key, b, d)
            # open the next node q at cut c
            if order is None:
                qs = [q for q in range(K) if not mask >> q & 1]
            else:
                qs = [p + 1] if use_all else list(range(p + 1, K))
                qs = [q for q in qs if q < K]
            if not qs:
                continue
            qn = [node_of[q] for q in qs]
            if not capped:
                tot = v[:, None] + comp[d]  # (b, c)
                bb = np.argmin(tot, axis=0)
                g = tot[bb, np.arange(L + 1)]
                cand = g[None, :] + out[d, qn]  # (nq, c)
                bsel = np.broadcast_to(bb, cand.shape)
            else:
                M = comp[d][None, :, :] + out[d, qn][:, None, :]  # (nq, b, c)
                M = np.where(M <= cap, M, INF)
                tot = v[None, :, None] + M
                bsel = np.argmin(tot, axis=1)
                cand = np.take_along_axis(tot, bsel[:, None, :], axis=1)[:, 0, :]
            if order is None:
                nk = np.array([((mask | 1 << q) * D + q) for q in qs])
            else:
                nk = np.array(qs)
            cur = V[nk]
            better = cand < cur
            if better.any():
                V[nk] = np.where(better, cand, cur)
                BPK[nk] = np.where(better, key, BPK[nk])
                BPB[nk] = np.where(better, bsel, BPB[nk])
        if found is not None:
            key, b, d = found
            path = [(d, b, L)]
            c = b
            while True:
                pk, pb = int(BPK[key, c]), int(BPB[key, c])
                if pk < 0:
                    break
                pd = node_of[pk % D] if order is None else node_of[pk]
                path.append((pd, pb, c))
                key, c = pk, pb
            best_path = list(reversed(path))
    return best_val, best_path, work


def _range_lo(cc: ChainCosts, cap: float) -> np.ndarray:
    """lo[d, q, c]: the first block b such that the stage [b, c) on d followed by q fits memory
    and has T = comp + out <= cap. comp[d, :, c] is non-increasing in b, so the admissible b form
    the suffix [lo, c); lo = c when none (c = 0 or L, q = d: empty)."""
    D, L = cc.D, cc.L
    lo = np.empty((D, D, L + 1), dtype=np.int64)
    below = np.arange(L + 1)[:, None] < np.arange(L + 1)[None, :]  # b < c
    for d in range(D):
        t = cc.comp[d][None, :, :] + cc.out[d][:, None, :]  # (q, b, c)
        ok = np.isfinite(t) & (t <= cap)
        bad = below[None] & ~ok
        lo[d] = bad.sum(axis=1)
    return lo


def _set_lower_bound(cc: ChainCosts, cap: float) -> np.ndarray:
    """lbt[A, b]: a lower bound on the sum of the stage times of blocks b..L-1 when only the
    nodes of the set A (a bitmask) may run them (a state (mask, d, b) can use d and the nodes
    outside mask).

    Valid because every completion puts the blocks b..L-1 on distinct nodes of A in contiguous
    ranges: node n runs at most cap_n blocks (the longest range that fits its memory and, with a
    stage cap, has compute <= cap: links are >= 0), each block costs at least mn_n (n's fastest
    block), and the last stage pays at least min_{n in A} head_n. The cheapest fractional filling
    of L - b blocks (fastest nodes first, up to their caps) is therefore a lower bound; inf when
    the caps of A cannot hold L - b blocks. The classical per-block bound (fastest node per block,
    cc.lower_bound) is also valid; the larger of the two is used, shrunk by a relative 1e-9 so
    rounding never prunes an optimal plan."""
    D, L = cc.D, cc.L
    bi, ci = np.arange(L + 1)[:, None], np.arange(L + 1)[None, :]
    span = np.broadcast_to(ci - bi, (L + 1, L + 1))
    capn = np.zeros(D)
    for d in range(D):
        ok = np.isfinite(cc.comp[d]) & (cc.comp[d] <= cap)
        capn[d] = span[ok].max() if ok.any() else 0
    mn = np.diff(cc.prefix, axis=1).min(axis=1) if L else np.zeros(D)
    order = np.argsort(mn, kind="stable")
    n_sets = 1 << D
    sets = np.arange(n_sets)
    inset = ((sets[:, None] >> order[None, :]) & 1).astype(float)  # (A, i) in speed order
    caps = inset * capn[order][None, :]
    cumcap = np.concatenate([np.zeros((n_sets, 1)), np.cumsum(caps, axis=1)], axis=1)
    cumt = np.concatenate([np.zeros((n_sets, 1)), np.cumsum(caps * mn[order][None, :], axis=1)],
                          axis=1)
    r = (L - np.arange(L + 1)).astype(float)  # blocks left at b
    j = (cumcap[:, None, 1:] < r[None, :, None]).sum(axis=2)  # (A, b): the node that fills r
    jj = np.minimum(j, D - 1)
    rows = sets[:, None]
    val = cumt[rows, j] + (r[None, :] - cumcap[rows, j]) * mn[order][jj]
    val = np.where(j >= D, INF, val)
    inmask = ((sets[:, None] >> np.arange(D)[None, :]) & 1).astype(bool)
    head = np.where(inmask, cc.t_head[None, :], INF).min(axis=1)  # (A,)
    val = val + head[:, None]
    val[:, L] = 0.0
    per_block = cc.lower_bound[None, :]
    return np.maximum(val * (1 - 1e-9), per_block)


def _reverse_lower_bound(cc: ChainCosts, use_all: bool, cap: float) -> np.ndarray:
    """H[A, d, b]: a lower bound on the sum of the stage times of blocks b..L-1 when d runs the
    stage that starts at b and the later stages use distinct nodes of A \\ {d} (d in A), every
    stage <= cap; with use_all, exactly the nodes of A. A reverse bitmask DP over the allowed
    set, O(2^D D^2 L log L), of a relaxation of the exact program:
      * a transition d -> q at cut c (c < L) costs comp[d, b, c] + out[d, q, c] =
        P_d[c] - P_d[b] (+ embedding at b = 0) + out[d, q, c] for every c in (b, hi_d(b)],
        hi_d(b) the LARGEST c < L with comp[d, b, c] finite and <= cap - min_q,c out[d, q, c]:
        a superset of the admissible cuts (memory and cap are checked only through hi);
      * the last stage pays the cheapest closure to a node outside A (the first node is outside
        A when b > 0); H[., ., 0] = 0 (no bound for the first stage).
    Fewer options never lower a minimum, so H <= the real cost-to-go of every state (A = the
    nodes outside the forward mask, plus d); it is shrunk by a relative 1e-9 for rounding."""
    D, L = cc.D, cc.L
    full = (1 << D) - 1
    H = np.full((full + 1, D, L + 1), INF)
    if L == 0:
        return np.zeros((full + 1, D, L + 1))
    cs = np.arange(L + 1)
    out = cc.out
    omin = np.where(np.isfinite(out), out, INF).min(axis=(1, 2))  # (d,)
    omin = np.where(np.isfinite(omin), omin, 0.0)
    ok = np.isfinite(cc.comp) & (cc.comp + omin[:, None, None] <= cap)  # (d, b, c)
    ok[:, :, L] = False
    ok &= cs[None, None, :] > cs[None, :, None]
    has = ok.any(axis=2)
    hi = np.where(has, L - np.argmax(ok[:, :, ::-1], axis=2), 0)  # (d, b): last ok c
    # window [b + 1, hi]: sparse-table query parameters per (d, b)
    st = cs[None, :] + 1
    ln = np.where(has, hi - st + 1, 0)
    kk = np.zeros_like(ln)
    kk[ln > 0] = np.floor(np.log2(ln[ln > 0])).astype(np.int64)
    st_c = np.where(ln > 0, st, 0)
    rs = np.where(ln > 0, hi + 1 - (1 << kk), 0)
    J = int(kk.max()) + 1
    emb = np.where(cs == 0, cc.t_embed[:, None], 0.0)  # (d, b)
    base_b = emb - cc.prefix  # (d, b)
    close_nd = np.where(np.eye(D, dtype=bool), INF, cc.close)
    sets = np.arange(full + 1)
    popc = np.array([bin(m).count("1") for m in sets])
    dbit = ((sets[:, None] >> np.arange(D)[None, :]) & 1).astype(bool)
    tlast = cc.comp[:, :, L]  # (d, b)
    for k in range(1, D + 1):
        Ak = np.nonzero(popc == k)[0]
        mem = np.nonzero(dbit[Ak])[1].reshape(len(Ak), k)  # (n, k)
        n = len(Ak)
        # final stage on d: closure to the cheapest node outside A
        if use_all and k > 1:
            fin = np.full((n, k, L + 1), INF)
        else:
            clo = np.where(~dbit[Ak][:, None, :], close_nd[mem], INF).min(axis=2)  # (n, k)
            fin = tlast[mem] + clo[:, :, None]
            fin = np.where(fin <= cap, fin, INF)
        if k > 1:
            prev = Ak[:, None] ^ (1 << mem)  # (n, k): A \ {d}
            Hs = H[prev]  # (n, k, q, c)
            Y = (out[mem] + Hs).min(axis=2)  # (n, k, c)
            Z = cc.prefix[mem] + Y
            Z[..., L] = INF
            mn, _ = _sparse_table(Z, J)
            mnf = mn.ravel()
            slab = n * k * (L + 1)
            rowoff = (np.arange(n * k).reshape(n, k) * (L + 1))[:, :, None]
            kg = kk[mem]
            left = mnf.take(kg * slab + rowoff + st_c[mem])
            right = mnf.take(kg * slab + rowoff + rs[mem])
            rmq = np.where(ln[mem] > 0, np.minimum(left, right), INF)
            fin = np.minimum(fin, base_b[mem] + rmq)
        H[Ak[:, None], mem] = fin
    H = H * (1 - 1e-9)
    H[:, :, 0] = 0.0
    return H


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


def _subset_levels(D: int):
    """dbit[mask, d] and, per subset size k, (masks, their members (n, k), non-members)."""
    full = (1 << D) - 1
    popc = np.array([bin(m).count("1") for m in range(full + 1)])
    dbit = ((np.arange(full + 1)[:, None] >> np.arange(D)[None, :]) & 1).astype(bool)
    levels = {}
    for k in range(1, D + 1):
        Mk = np.nonzero(popc == k)[0]
        bits = dbit[Mk]
        levels[k] = (Mk, np.nonzero(bits)[1].reshape(len(Mk), k),
                     np.nonzero(~bits)[1].reshape(len(Mk), D - k))
    return dbit, levels


def _extend(rq: _RangeQueries, U: np.ndarray, mem: np.ndarray, non: np.ndarray, D: int, L: int):
    """One transition for a batch of states: close the stage of d (a member, value U[n, k, b])
    at c and open q (a non-member) there. Returns, per (state n, q, c), the best value, the
    first block b of the closed stage and the node d that closed it."""
    n, k = mem.shape
    Q = D - k
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


def _last_stage_times(cc: ChainCosts, fs, fi, Ms, mem, dbit, cap: float, relax_first: bool):
    """(n, k, b): the time of d's stage [b, L) as the last one, with its ring closure (to the
    first node; relax_first: the cheapest closure to another node of the mask, none at k = 1)."""
    D, L = cc.D, cc.L
    k = mem.shape[1]
    close_nd = np.where(np.eye(D, dtype=bool), INF, cc.close)  # (d, f), f != d
    if relax_first:
        if k == 1:
            clo = np.zeros(mem.shape)
        else:
            clo = np.where(dbit[Ms][:, None, :], close_nd[mem], INF).min(axis=2)
        tl = cc.comp[mem, :, L] + clo[:, :, None]
    else:
        f = fs[fi][:, None]  # (n, 1): the first node of each state
        clo = np.where(mem == f, 0.0, cc.close[mem, f])
        tl = cc.comp[mem, :, L] + clo[:, :, None]
    return np.where(tl <= cap, tl, INF) if np.isfinite(cap) else tl


def _backtrack(found, BPd, BPb, L: int):
    j, mask, d, b = found
    path = [(d, b, L)]
    while not (mask == 1 << d and b == 0):
        pd, pb = int(BPd[j, mask, d, b]), int(BPb[j, mask, d, b])
        mask ^= 1 << d
        path.append((pd, pb, b))
        d, b = pd, pb
    return list(reversed(path))


def _bitmask_dp_vec(cc: ChainCosts, use_all: bool, cap: float = INF, incumbent: float = INF,
                    max_bytes: int = 400 << 20, relax_first: bool = False, hrev=None):
    """The bitmask program, vectorised over all states of one subset size (same answers as
    _ring_dp(order=None)). States (f, mask, d, b): first node f, used nodes mask, node d in mask
    whose stage starts at block b. A stage [b, c) on d costs P_d[c] - P_d[b] (+ embedding at
    b = 0), so min_b (V[b] + cost) over the admissible suffix b in [lo, c) is a range-minimum
    query, answered for a whole batch of (mask, d in mask, q not in mask, c) from sparse tables
    (_range_queries, _extend): O(2^D D^3 L log L) work in O(D) numpy passes per subset size
    (first nodes batched while the state arrays stay under max_bytes).

    relax_first: drop f from the state (a D / 2 times smaller program) and charge the last stage
    the cheapest ring closure to any node of the mask other than d (the first node is one of
    them; none for a single-stage plan). Every plan keeps its stages and pays at most its real
    closure, so the value is a lower bound on the exact one and "no plan below the incumbent" is
    exact; the plan returned is a real plan (its first node is read from the back-pointers)
    whose real sum may be larger (see _bitmask_dp)."""
    D, L = cc.D, cc.L
    full = (1 << D) - 1
    rq = _range_queries(cc, cap)
    dbit, levels = _subset_levels(D)
    lbt = _set_lower_bound(cc, cap)  # (available-node set, b)
    best_val, best_path, work = incumbent, None, 0
    per_f = (full + 1) * D * (L + 1) * 12
    G = max(1, min(D, max_bytes // max(per_f, 1)))
    groups = [np.arange(D)] if relax_first else \
        [np.arange(g0, min(D, g0 + G)) for g0 in range(0, D, G)]
    for fs in groups:
        nf = 1 if relax_first else len(fs)
        V = np.full((nf, full + 1, D, L + 1), INF)
        BPd = np.full((nf, full + 1, D, L + 1), -1, dtype=np.int8)
        BPb = np.full((nf, full + 1, D, L + 1), -1, dtype=np.int16)
        V[0 if relax_first else np.arange(nf), 1 << fs, fs, 0] = 0.0
        found = None
        for k in range(1, D + 1):
            Mk, memk, nonk = levels[k]
            if relax_first:
                mi, fi = np.arange(Mk.size), np.zeros(Mk.size, dtype=np.int64)
            else:
                mi, fi = np.nonzero(dbit[Mk][:, fs])
            if mi.size == 0:
                continue
            Ms, mem, non = Mk[mi], memk[mi], nonk[mi]
            U = V[fi[:, None], Ms[:, None], mem]  # (n, k, b)
            # prune: blocks b.. still go to d and the nodes outside the mask
            avail = (full ^ Ms)[:, None] | (1 << mem)  # (n, k)
            lbk = lbt[avail] if hrev is None else np.maximum(lbt[avail], hrev[avail, mem])
            U = np.where(U + lbk < best_val, U, INF)
            alive = np.isfinite(U).any(axis=(1, 2))
            if not alive.any():
                break
            fi, Ms, mem, non, U = fi[alive], Ms[alive], mem[alive], non[alive], U[alive]
            work += Ms.size
            if not use_all or k == D:
                tot = U + _last_stage_times(cc, fs, fi, Ms, mem, dbit, cap, relax_first)
                i = int(np.argmin(tot))
                v = float(tot.flat[i])
                if v < best_val:
                    n_, dp_, b = np.unravel_index(i, tot.shape)
                    best_val = v
                    found = (int(fi[n_]), int(Ms[n_]), int(mem[n_, dp_]), int(b))
            if k == D:
                break
            vbest, bbest, dbest = _extend(rq, U, mem, non, D, L)
            tgt = Ms[:, None] | (1 << non)  # (n, Q)
            fI = fi[:, None]
            V[fI, tgt, non] = vbest
            BPd[fI, tgt, non] = dbest
            BPb[fI, tgt, non] = bbest
        if found is not None:
            best_path = _backtrack(found, BPd, BPb, L)
    return best_val, best_path, work


def _bitmask_dp(cc: ChainCosts, use_all: bool, cap: float = INF, incumbent: float = INF):
    """The exact bitmask program, first run without the first node in the state.

    The relaxed run (_bitmask_dp_vec(relax_first=True)) charges every plan at most its real cost,
    so (a) no relaxed plan below the incumbent means no real one either, and (b) when the relaxed
    optimum's closure is the one it was charged (its last node's cheapest closure in the mask is
    to its actual first node, or it has one stage) its relaxed value is its real value computed
    with the same floating-point operations as the exact program, and no plan is cheaper: it is
    returned as is. Otherwise the exact program (first node in the state) runs, with the relaxed
    plan's real sum as incumbent when that plan satisfies the cap (the exact program then finds
    it or a cheaper plan). In the throughput search most capped runs end in (a) or (b), which
    removes the ~D / 2 factor that the first node adds to the state space."""
    hrev = _reverse_lower_bound(cc, use_all, cap)
    v, p, w = _bitmask_dp_vec(cc, use_all, cap, incumbent, relax_first=True, hrev=hrev)
    if p is None:
        return v, p, w
    f, dl = p[0][0], p[-1][0]
    if len(p) == 1:
        return v, p, w
    mask = 0
    for d, _, _ in p:
        mask |= 1 << d
    cl = min(cc.close[dl, g] for g in range(cc.D) if mask >> g & 1 and g != dl)
    if cc.close[dl, f] == cl:
        return v, p, w
    ts = _stage_times(cc, p)
    if max(ts) <= cap:
        incumbent = min(incumbent, sum(ts) * (1 + 1e-9) + 1e-15)
    v2, p2, w2 = _bitmask_dp_vec(cc, use_all, cap, incumbent, hrev=hrev)
    return v2, p2, w + w2


def _to_stages(cc: ChainCosts, path) -> list[Stage]:
    return [Stage(cc.ids[d], b, c) for d, b, c in path]


def _stage_times(cc: ChainCosts, path) -> list[float]:
    S = len(path)
    ts = []
    for s, (d, b, c) in enumerate(path):
        if s < S - 1:
            ts.append(cc.comp[d, b, c] + cc.out[d, path[s + 1][0], c])
        else:
            f = path[0][0]
            ts.append(cc.comp[d, b, c] + (cc.close[d, f] if d != f else 0.0))
    return ts


def _candidate_caps(cc: ChainCosts, upto: float) -> np.ndarray:
    """Every stage time a plan can have (sorted, unique, <= upto): the bottleneck is one."""
    L = cc.L
    vals = [(cc.comp[:, None, :, 1:L] + cc.out[:, :, None, 1:L]).ravel(),
            (cc.comp[:, None, :, L] + cc.close[:, :, None]).ravel(),
            cc.comp[:, :, L].ravel()]  # single stage: no closure
    v = np.concatenate(vals)
    v = v[np.isfinite(v) & (v <= upto)]
    return np.unique(v)


def _throughput_search(cc, dp, val, path, B, D):
    """min over plans of f = max(S / B, M) (S: sum, M: bottleneck), from a first plan `path`
    (the min-sum plan, of sum val, or any plan with val None); D nodes.

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
    the incumbent (0.1 %, 0.2 %, 0.4 % ... below it); after a run with no plan, bisection."""
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
        return best, n_dp  # the min-sum plan is latency bound: S / B is a lower bound on all
    cands = _candidate_caps(cc, best[0])
    lo = 0 if val is None else int(np.searchsorted(cands, val / D * (1 - 1e-12)))
    hi = int(np.searchsorted(cands, best[0]))
    last = None
    step = 1e-3
    while lo < hi:
        if last in (None, "false"):
            mid = hi - 1  # S(T') <= S(T) = B best for T' > T: try just below the incumbent
        elif last == "true":
            # the incumbent is usually close to the optimum: gallop down from it
            mid = int(np.searchsorted(cands, best[0] * (1 - step)))
            step *= 2
        else:
            mid = (lo + hi) // 2
        mid = min(max(mid, lo), hi - 1)
        T = cands[mid]
        v, p = dp(T, bound=B * best[0] * (1 + 1e-9) + 1e-15)
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
    return best, n_dp



def _solve(cluster, objective: str, workload: Workload, runtime: str, use_all_nodes: bool,
           order: Sequence[str] | None, name: str) -> SplitResult:
    t0 = time.perf_counter()
    ids = sorted(cluster.ids) if order is None else list(order)
    metric = "prefill" if objective == "ttft" else "decode"
    cc = ChainCosts(cluster, workload, runtime, metric, ids=ids)
    if cc.protocol.head_on_every_rank:
        return _solve_paced(cc, objective, use_all_nodes, order, name, t0)
    return _solve_cc(cc, objective, use_all_nodes, order, name, t0)


def _plan_pace(cc: ChainCosts, path) -> float:
    return max(cc.pace[d] for d, _, _ in path)


def _solve_paced(cc: ChainCosts, objective: str, use_all_nodes: bool,
                 order: Sequence[str] | None, name: str, t0: float) -> SplitResult:
    """Exact minimum of sum of stage times + max over the plan's nodes of pace (the head that
    every rank runs: exo-current).

    Problem: the max term makes the objective non-additive. Method: enumerate its value. For
    each distinct pace H (ascending), the best plan using only nodes with pace <= H costs
    S(H) + H at most, and the optimum is min_H S(H) + H (its own max pace is one such H).
    S(H) >= S(max) (fewer nodes never help), so the scan stops once S(max) + H reaches the
    incumbent; every DP run is pruned at the incumbent minus H. At most D extra DP runs.
    Throughput and Pareto reduce to latency: the all-gather is a barrier every step, so the
    bottleneck is the whole time per token (see graphsplit.costmodel).
    """
    metric_obj = "ttft" if objective == "ttft" else "latency"
    first = _solve_cc(cc, metric_obj, use_all_nodes, order, name, t0)
    if first.stages is None:
        return first
    idx = {n: i for i, n in enumerate(cc.ids)}

    def path_of(r):
        return [(idx[st.node], st.start_layer, st.end_layer) for st in r.stages]

    base = first.fun
    best_p = path_of(first)
    best = sum(_stage_times(cc, best_p)) + _plan_pace(cc, best_p)
    work = first.nit
    for H in sorted(set(cc.pace.tolist())):
        if base + H >= best:
            break
        r = _solve_cc(cc.without_nodes_above(H), metric_obj, use_all_nodes, order, name, t0,
                      bound=(best - H) * (1 + 1e-9) + 1e-15)
        work += r.nit
        if r.stages is None:
            continue
        p = path_of(r)
        v = sum(_stage_times(cc, p)) + _plan_pace(cc, p)
        if v < best:
            best, best_p = v, p
    stages = _to_stages(cc, best_p)
    where = "all node orders and subsets" if order is None else "the given node order"
    note = "" if objective in ("latency", "ttft") else \
        f" ({objective} = latency under {cc.runtime}: one step in flight)"
    extra = {}
    if objective == "pareto":
        extra = {"frontier": [{"tpot_s": best, "bottleneck_s": best,
                               "throughput_tps": 1 / best if best > 0 else INF,
                               "stages": stages}]}
    return SplitResult(stages, best, True, 0,
                       f"optimal {metric_obj} over {where}, head pace enumerated{note}",
                       name, time.perf_counter() - t0, work, extra)


def _solve_cc(cc: ChainCosts, objective: str, use_all_nodes: bool, order: Sequence[str] | None,
              name: str, t0: float, bound: float = INF) -> SplitResult:
    """The DP solvers on prebuilt cost arrays (additive stage times); `bound`: only plans
    below it are looked for (latency / ttft)."""
    cluster, workload, runtime = cc.cluster, cc.workload, cc.runtime
    ids = cc.ids
    idx_order = None if order is None else list(range(len(ids)))
    B = workload.micro_batches  # M = ceil(B / batch) batches share the ring (graphsplit.batching)
    work_total = [0]

    def dp(cap=INF, bound=INF):
        """min sum s.t. every stage <= cap; only plans with sum < bound are looked for."""
        if order is None:
            v, p, w = _bitmask_dp(cc, use_all_nodes, cap, bound)
        else:
            v, p, w = _ring_dp(cc, idx_order, use_all_nodes, cap, bound)
        work_total[0] += w
        return (v, p) if p is not None else (INF, None)

    seed = INF
    if order is None and len(ids) > 1:
        # branch-and-bound seed: the fixed-order DP with the fastest nodes first (cheap)
        speed = cc.prefix[:, -1]
        ordr = sorted(range(len(ids)), key=lambda d: (speed[d], d))
        v, p, w = _ring_dp(cc, ordr, use_all_nodes)
        work_total[0] += w
        if p is not None:
            seed = v * (1 + 1e-9) + 1e-15

    where = "all node orders and subsets" if order is None else "the given node order"
    if objective == "throughput" and order is None and len(ids) > 2:
        # a fixed-order optimum (cheap, fastest nodes first) is the first incumbent; the search
        # needs no min-sum run (see _throughput_search)
        fo = _solve(cluster, "throughput", workload, runtime, use_all_nodes,
                    [ids[d] for d in sorted(range(len(ids)), key=lambda d: (cc.prefix[d, -1], d))],
                    "seed")
        if fo.stages is not None:
            fpath = [(ids.index(st.node), st.start_layer, st.end_layer) for st in fo.stages]
            best, n_dp = _throughput_search(cc, dp, None, fpath, B, len(ids))
            return SplitResult(_to_stages(cc, best[1]), best[0], True, 0,
                               f"optimal throughput for {B} stream(s) over {where} "
                               f"({n_dp} capped DP runs after a fixed-order seed)",
                               name, time.perf_counter() - t0, work_total[0] + fo.nit)
    val, path = dp(bound=min(seed, bound))
    if path is None:
        return _infeasible(name, t0, work_total[0])
    if objective in ("latency", "ttft"):
        return SplitResult(_to_stages(cc, path), val, True, 0, f"optimal {objective} over {where}",
                           name, time.perf_counter() - t0, work_total[0])
    if objective not in ("throughput", "pareto"):
        raise ValueError(objective)
    m0 = max(_stage_times(cc, path))
    if objective == "throughput":
        best, n_dp = _throughput_search(cc, dp, val, path, B, len(ids))
        return SplitResult(_to_stages(cc, best[1]), best[0], True, 0,
                           f"optimal throughput for {B} stream(s) over {where} ({n_dp + 1} DP runs)",
                           name, time.perf_counter() - t0, work_total[0])
    # pareto: walk the cap down from the min-sum plan's bottleneck
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
        m = max(_stage_times(cc, p))
        frontier.append((v, m, p))
        cap = m * (1 - REL)
    pts = []
    for s_, m, p in frontier:  # drop dominated points (equal sum up to rounding, larger max)
        if pts and s_ <= pts[-1][0] * (1 + REL):
            pts[-1] = (s_, m, p)
        else:
            pts.append((s_, m, p))
    extra = {"frontier": [{"tpot_s": s_, "bottleneck_s": m,
                           "throughput_tps": min(B / s_, 1 / m) if s_ > 0 else INF,
                           "stages": _to_stages(cc, p)} for s_, m, p in pts]}
    s_, m, p = pts[0]  # the plan shown is the latency-optimal end of the frontier
    msg = (f"exact Pareto frontier of latency vs bottleneck over {where}: {len(pts)} points"
           + ("" if complete else f" (stopped at {MAX_PARETO_POINTS}; lower bottlenecks exist)"))
    return SplitResult(_to_stages(cc, p), s_, True, 0, msg, name, time.perf_counter() - t0,
                       work_total[0], extra)


def _infeasible(name, t0, work) -> SplitResult:
    return SplitResult(None, INF, True, 2, "infeasible: no split fits the nodes' memory", name,
                       time.perf_counter() - t0, work)


def solve_fixed_order(cluster, objective: str = "latency", workload: Workload = Workload(),
                      runtime: str = "exo-current", use_all_nodes: bool = False,
                      order: Sequence[str] | None = None) -> SplitResult:
    """Exact DP for a chain with the node order fixed (default: the cluster file's order).

    Nodes may be skipped unless use_all_nodes. O(D^3 L^2) time per DP run, O(D L) memory.
    """
    return _solve(cluster, objective, workload, runtime, use_all_nodes,
                  list(order) if order is not None else cluster.ids, "fixed-order-dp")


def solve_bitmask(cluster, objective: str = "latency", workload: Workload = Workload(),
                  runtime: str = "exo-current", use_all_nodes: bool = False) -> SplitResult:
    """Exact DP over node order AND subset (bitmask over nodes sorted by id).

    O(2^D D^3 L log L) work per DP run (vectorised range-minimum queries), pruned by branch
    and bound; O(2^D D L) memory per batch of first nodes.
    Practical up to about 12 nodes.
    """
    return _solve(cluster, objective, workload, runtime, use_all_nodes, None, "bitmask-dp")


def verify(cluster, result: SplitResult, objective: str, workload: Workload, runtime: str):
    """Recompute the objective of a result with the reference cost model (for tests)."""
    from graphsplit.costmodel import objective_value
    return objective_value(predict(cluster, result.stages, workload, runtime), objective, workload)
