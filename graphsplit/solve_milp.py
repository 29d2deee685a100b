"""MILP split of a general compute DAG over a heterogeneous device sequence (scipy / HiGHS).

Problem. Given a DAG G = (V, E) of operations with per-device times t_v(d), weight / KV / buffer
bytes, activation bytes on edges, and a sequence of S devices d_0..d_{S-1} (the pipeline order,
each with usable memory and directed links), assign every operation to a stage so that every
edge stays inside a stage or points forward, every stage is non-empty and fits its device, and
minimise

* latency / ttft: sum_s T_s,  T_s = sum_v t_v(d_s) x_vs + out_s
* throughput:     max(sum_s T_s / B, max_s T_s)      (a MILP via an epigraph variable z)

with out_s = alpha(d_s, d_s+1) + tokens x (bytes crossing boundary s) / beta(d_s, d_s+1) and
out_{S-1} = the ring closure (token id back to d_0). Costs are those of graphsplit.costmodel.

Formulation (in the spirit of PiPPy's graphsplit, but with measured times, devices, links):
cumulative binaries w_vk = [stage(v) <= k], k = 0..S-2 (x_vs = w_vs - w_v,s-1), monotone in k;
edge (u, v): w_vk <= w_uk (order); cut variables c_uk >= w_uk - w_vk for every edge (u, v)
(u's output crosses boundary k once, whatever the number of consumers); stage buffers
b_s >= buffer_v x_vs; memory sum_v (weights + KV)_v x_vs + b_s + resident_s <= capacity(d_s).
V (S-1) binaries. Optimality is HiGHS's: status 0 means proven optimal (mip_rel_gap 0).

Exact reductions before HiGHS (reduce=True, incumbent=True; each proven where it is built):
implied order and cut rows dropped (_needed_edges), buffer rows below the smallest block
buffer dropped, binaries fixed by memory (_memory_fixings) and, for throughput, by the
incumbent's value (_time_fixings), fixed binaries substituted out; the best contiguous split of
the topological order (_order_dp) is the incumbent, passed as HiGHS's objective_bound cutoff.

Runtimes: the MILP charges the ring protocol (activation to the next stage, token id back):
mlx-pipeline, and exo-legacy with its measured per-message overhead folded into every link's
latency (_ring_cluster). exo-current's all-gather and per-rank head are not in this formulation:
it is refused with a message pointing at the DP solvers, which carry it exactly.

Reference: PiPPy graphsplit (pytorch/PiPPy, pippy/graphsplit.py): MILP with
scipy.optimize.milp, homogeneous stages, parameter/activation counts instead of times.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import sys
import time
import warnings
from typing import Sequence

import networkx as nx
import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from graphsplit.cluster import Link
from graphsplit.costmodel import Workload, check_runtime, message_overhead_s
from profiler.errors import UserError
from graphsplit.plan import Stage
from graphsplit.result import BOUND, GIVEN_ORDER, SplitResult


MEM = float(1 << 30)  # memory rows in GiB and time in ms inside the MILP: well-scaled
TS = 1e3  # coefficients make HiGHS's presolve and cuts much faster


@contextlib.contextmanager
def _quiet_stdout():
    """HiGHS may print diagnostics straight to file descriptor 1: keep --json output clean."""
    try:
        sys.stdout.flush()
        fd = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(fd, 1)
        os.close(fd)


def _resident(cluster, device: str, runtime: str, first: bool, last: bool, g) -> float:
    """Bytes resident beyond the operations' own weights (embedding / head copies)."""
    t = cluster.node(device).table
    e, h = t.embed.weight_bytes, t.head.weight_bytes
    if runtime in ("exo-current", "mlx-pipeline"):
        # every rank keeps both; the ops' own weights are not counted again (see _op_mem)
        return float(e + h)
    if last and not first and t.model.tie_word_embeddings:
        return float(e)
    return 0.0


def _op_mem(g, v, runtime) -> float:
    a = g.nodes[v]
    if runtime in ("exo-current", "mlx-pipeline") and a["kind"] in ("embed", "head"):
        return float(a["kv_bytes"])
    return float(a["weight_bytes"] + a["kv_bytes"])


def _ring_cluster(cluster, runtime: str):
    """The cluster as the ring protocol of `runtime` sees it: exo-legacy's measured per-message
    overhead added to every link's latency (every message pays it once); exo-current refused."""
    if runtime == "exo-current":
        raise UserError("the MILP solver charges the ring protocol (mlx-pipeline, exo-legacy); "
                        "exo-current's all-gather and per-rank head are solved by --solver "
                        "bitmask or fixed-order")
    m = message_overhead_s(cluster, runtime) if runtime == "exo-legacy" else 0.0
    if m == 0.0:
        return cluster
    c = copy.copy(cluster)
    c.links = {k: Link(v.latency_s + m, v.bandwidth_Bps) for k, v in cluster.links.items()}
    c.default_link = Link(cluster.default_link.latency_s + m, cluster.default_link.bandwidth_Bps)
    return c


def evaluate_assignment(g: nx.DiGraph, cluster, devices: Sequence[str], stage_of: dict,
                        objective: str, workload: Workload, runtime: str = "mlx-pipeline"):
    """Reference cost of an assignment op -> stage index (None if invalid or over memory)."""
    cluster = _ring_cluster(cluster, runtime)
    S = len(devices)
    metric = "prefill_s" if objective == "ttft" else "decode_s"
    tokens = workload.prompt_tokens if objective == "ttft" else 1
    for u, v in g.edges:
        if stage_of[v] < stage_of[u]:
            return None
    if len({s for v, s in stage_of.items() if g.nodes[v]["layer"] is not None}) != S:
        return None
    T = []
    for s, d in enumerate(devices):
        ops = [v for v in g if stage_of[v] == s]
        mem = sum(_op_mem(g, v, runtime) for v in ops) + max(g.nodes[v]["buffer_bytes"]
                                                             for v in ops)
        mem += _resident(cluster, d, runtime, s == 0, s == S - 1, g)
        if mem > cluster.node(d).memory_bytes:
            return None
        t = sum(g.nodes[v][metric][d] for v in ops)
        if s < S - 1:
            lk = cluster.link(d, devices[s + 1])
            crossing = {u for u, v in g.edges if stage_of[u] <= s < stage_of[v]}
            t += lk.latency_s + tokens * sum(g.nodes[u]["activation_bytes_per_token"]
                                             for u in crossing) / lk.bandwidth_Bps
        elif S > 1:
            t += cluster.link(d, devices[0]).time(workload.token_bytes)
        T.append(t)
    if objective == "throughput":
        return max(sum(T) / workload.streams, max(T))
    return sum(T)


def _bool_dot(m, x, rows: int = 512):
    """m @ x for a boolean matrix m, in float64, a block of rows at a time (bounded memory)."""
    out = np.empty((m.shape[0],) + x.shape[1:])
    for i in range(0, m.shape[0], rows):
        out[i:i + rows] = m[i:i + rows].astype(float) @ x
    return out



def _memory_fixings(g, ops, cluster, devices, runtime, buf_floor):
    """Bounds on w_vk = [stage(v) <= k] implied by memory alone (exact: they hold in every
    feasible assignment, so fixing them changes no optimum).

    If v sits in a stage <= k, so do all its ancestors; their bytes then fit in the capacity of
    stages 0..k (each stage also holds resident bytes and a buffer >= buf_floor). So
    anc_mem(v) > sum_{s <= k} (cap_s - resident_s - buf_floor) forces w_vk = 0, and likewise
    desc_mem(v) > sum_{s > k} (...) forces w_vk = 1 (v and its descendants cannot all come
    after k). anc_mem / desc_mem count v itself; ancestor sets are numpy bit rows."""
    S, V = len(devices), len(ops)
    K = S - 1
    pos = {v: i for i, v in enumerate(ops)}
    mem = np.array([_op_mem(g, v, runtime) for v in ops])
    anc = np.zeros((V, V), dtype=bool)
    for i, v in enumerate(ops):
        anc[i, i] = True
        for u in g.predecessors(v):
            anc[i] |= anc[pos[u]]
    anc_mem = _bool_dot(anc, mem)
    desc_mem = _bool_dot(anc.T, mem)
    room = np.array([cluster.node(d).memory_bytes
                     - _resident(cluster, d, runtime, s == 0, s == S - 1, g) - buf_floor
                     for s, d in enumerate(devices)])
    pre = np.cumsum(room)  # pre[k]: stages 0..k
    post = pre[-1] - pre  # stages k+1..S-1
    tol = 1e-6 * max(1.0, float(np.abs(room).max()))  # keep borderline cases to the MILP
    lo_w = (desc_mem[:, None] > post[None, :K] + tol).astype(float)
    hi_w = 1.0 - (anc_mem[:, None] > pre[None, :K] + tol).astype(float)
    # both at once: no feasible assignment exists; lb = ub = 1 keeps it so (HiGHS proves it)
    hi_w = np.maximum(hi_w, lo_w)
    return lo_w, hi_w, anc



def _time_fixings(g, ops, cluster, devices, workload, anc, bound):
    """Throughput: bounds on w_vk that every assignment with objective <= `bound` satisfies.

    z >= T_s for every stage, so such an assignment has every stage's compute
    sum_{v in s} t_v(d_s) <= bound - (s's link latency or ring closure) =: room_s. If v sits in
    a stage <= k, its ancestors do too, and their compute is at least anc_t = sum over them of
    min_{s <= k} t_a(d_s); anc_t > sum_{s <= k} room_s forces w_vk = 0. Symmetrically with v's
    descendants and the stages after k (w_vk = 1). `bound` is a little above the incumbent's
    value (and the HiGHS cutoff), so the optimum and the incumbent satisfy every fixing."""
    S = len(devices)
    K = S - 1
    t = np.array([[g.nodes[v]["decode_s"][d] for d in devices] for v in ops])  # (V, S)
    link = np.array([cluster.link(d, devices[s + 1]).latency_s if s < K else
                     (cluster.link(d, devices[0]).time(workload.token_bytes) if S > 1 else 0.0)
                     for s, d in enumerate(devices)])
    room = bound - link
    pre = np.cumsum(room)
    post = pre[-1] - pre
    tmin_pre = np.minimum.accumulate(t, axis=1)[:, :K]  # min over s <= k
    tmin_post = np.minimum.accumulate(t[:, ::-1], axis=1)[:, ::-1][:, 1:]  # min over s > k
    anc_t = _bool_dot(anc, tmin_pre)  # (V, K)
    desc_t = _bool_dot(anc.T, tmin_post)
    tol = 1e-9 * max(1.0, float(bound))
    lo_w = (desc_t > post[None, :K] + tol).astype(float)
    hi_w = 1.0 - (anc_t > pre[None, :K] + tol).astype(float)
    return lo_w, hi_w



def _order_dp(g, cluster, devices, ops, objective, workload, runtime):
    """A feasible assignment for the primal bound: the operations in the given topological order
    `ops`, split into S contiguous non-empty ranges (one per device, in order). A contiguous split
    of a topological order keeps every edge inside a stage or pointing forward, so it is feasible
    for the MILP whenever it fits memory and every stage holds a block. Latency / ttft: the exact
    min-sum DP over such splits; throughput: the best of the min-sum and min-max splits.
    O(S V^2) numpy. Returns {op: stage} or None."""
    S, V = len(devices), len(ops)
    metric = "prefill_s" if objective == "ttft" else "decode_s"
    tokens = workload.prompt_tokens if objective == "ttft" else 1
    idx = {v: i for i, v in enumerate(ops)}
    last_use = np.arange(V)
    for u, v in g.edges:
        last_use[idx[u]] = max(last_use[idx[u]], idx[v])
    act = np.array([g.nodes[v]["activation_bytes_per_token"] for v in ops], dtype=float)
    # cross[j]: bytes per token of the outputs of ops < j consumed at or after j
    dc = np.zeros(V + 2)
    np.add.at(dc, np.arange(V) + 1, act * (last_use > np.arange(V)))
    np.add.at(dc, last_use + 1, -act * (last_use > np.arange(V)))
    cross = np.cumsum(dc)[:V + 1]
    is_layer = np.array([g.nodes[v]["layer"] is not None for v in ops], dtype=float)
    nl = np.concatenate([[0.0], np.cumsum(is_layer)])
    mem = np.array([_op_mem(g, v, runtime) for v in ops])
    mpre = np.concatenate([[0.0], np.cumsum(mem)])
    buf = np.array([float(g.nodes[v]["buffer_bytes"]) for v in ops])
    bm = np.full((V + 1, V + 1), -np.inf)
    for i in range(V):
        bm[i, i + 1:] = np.maximum.accumulate(buf[i:])
    ii, jj = np.meshgrid(np.arange(V + 1), np.arange(V + 1), indexing="ij")
    ok_base = (jj > ii) & (nl[None, :] - nl[:, None] >= 1)
    cost = []
    for s, d in enumerate(devices):
        t = np.array([g.nodes[v][metric][d] for v in ops])
        pre = np.concatenate([[0.0], np.cumsum(t)])
        c = pre[None, :] - pre[:, None]
        if s < S - 1:
            lk = cluster.link(d, devices[s + 1])
            c = c + (lk.latency_s + tokens * cross / lk.bandwidth_Bps)[None, :]
        elif S > 1:
            c = c + cluster.link(d, devices[0]).time(workload.token_bytes)
        m = (mpre[None, :] - mpre[:, None]) + bm \
            + _resident(cluster, d, runtime, s == 0, s == S - 1, g)
        ok = ok_base & (m <= cluster.node(d).memory_bytes)
        cost.append(np.where(ok, c, np.inf))

    def run(combine):
        F = np.full(V + 1, np.inf)
        F[0] = 0.0
        arg = []
        for s in range(S):
            tot = combine(F[:, None], cost[s])
            a = np.argmin(tot, axis=0)
            F = tot[a, np.arange(V + 1)]
            arg.append(a)
        if not np.isfinite(F[V]):
            return None
        cuts, j = [V], V
        for s in range(S - 1, -1, -1):
            j = int(arg[s][j])
            cuts.append(j)
        cuts = cuts[::-1]
        return {ops[i]: s for s in range(S) for i in range(cuts[s], cuts[s + 1])}

    cands = [run(np.add)]
    if objective == "throughput":
        cands.append(run(np.maximum))
    best, best_v = None, np.inf
    for a in cands:
        if a is None:
            continue
        v = evaluate_assignment(g, cluster, devices, a, objective, workload, runtime)
        if v is not None and v < best_v:
            best, best_v = a, v
    return best, best_v



def _reaches(g, a, b, pos) -> bool:
    """Is b reachable from a (a != b)? Search only operations placed before b in the topological
    order `pos` (nothing after b can lead to b)."""
    stack, seen, pb = [a], {a}, pos[b]
    while stack:
        x = stack.pop()
        for y in g.successors(x):
            if y == b:
                return True
            if y not in seen and pos[y] < pb:
                seen.add(y)
                stack.append(y)
    return False


def _needed_edges(g, ops, idx):
    """The edges whose rows the MILP needs (others are implied, so dropping them is exact).

    * Order rows w_vk <= w_uk: only for the edges of the transitive reduction. If (u, v) has
      another path u -> x -> ... -> v, chaining that path's rows gives w_vk <= w_uk.
    * Cut rows c_uk >= w_uk - w_vk: only for consumers v of u that reach no other consumer v'
      of u. If v reaches v', the order rows give w_v'k <= w_vk, so the row of v' is at least
      as strong as the row of v.
    Returned as index pairs (u, v)."""
    pos = {v: i for i, v in enumerate(ops)}
    order_e, cut_e = [], []
    for u in ops:
        succ = sorted(g.successors(u), key=pos.get)
        for v in succ:
            others = [x for x in succ if x != v]
            if not any(pos[x] < pos[v] and _reaches(g, x, v, pos) for x in others):
                order_e.append((idx[u], idx[v]))
            if not any(pos[x] > pos[v] and _reaches(g, v, x, pos) for x in others):
                cut_e.append((idx[u], idx[v]))
    return order_e, cut_e



class _Rows:
    """The MILP's variables and constraint rows, built incrementally (COO triplets).

    Variable layout: w[v, k] (V K) | c[u, k] (one per cut source and boundary) | buf[s] (S) | z.
    """

    def __init__(self, V: int, S: int, srcs: list):
        self.V, self.S, self.K = V, S, S - 1
        self.cidx = {u: j for j, u in enumerate(srcs)}
        self.nw, self.nc = V * self.K, len(srcs) * self.K
        self.ob, self.oz = self.nw + self.nc, self.nw + self.nc + S
        self.n = self.oz + 1
        self.rows, self.cols, self.vals, self.lo, self.hi = [], [], [], [], []
        self.r = 0

    def W(self, v, k):
        return v * self.K + k

    def Cv(self, u, k):
        return self.nw + self.cidx[u] * self.K + k

    def add(self, terms, lb, ub):
        for col, val in terms:
            self.rows.append(self.r)
            self.cols.append(col)
            self.vals.append(val)
        self.lo.append(lb)
        self.hi.append(ub)
        self.r += 1

    def x_terms(self, v, s, coef):
        """coef * x_vs as terms over w (x_vs = w_vs - w_v,s-1; w_v,S-1 = 1 constant)."""
        terms, const = [], 0.0
        if s < self.K:
            terms.append((self.W(v, s), coef))
        else:
            const += coef
        if s > 0:
            terms.append((self.W(v, s - 1), -coef))
        return terms, const

    def matrix(self):
        return coo_matrix((self.vals, (self.rows, self.cols)), shape=(self.r, self.n)).tocsr()


def _structure_rows(m: _Rows, g, ops, idx, edges, reduce: bool) -> None:
    """Monotone w per operation, edge order w_vk <= w_uk, cut variables c_uk >= w_uk - w_vk."""
    for v in range(m.V):
        for k in range(m.K - 1):
            m.add([(m.W(v, k), 1), (m.W(v, k + 1), -1)], -np.inf, 0)
    order_edges, cut_edges = _needed_edges(g, ops, idx) if reduce else (edges, edges)
    for u, v in order_edges:
        for k in range(m.K):
            m.add([(m.W(v, k), 1), (m.W(u, k), -1)], -np.inf, 0)
    for u, v in cut_edges:
        for k in range(m.K):
            m.add([(m.Cv(u, k), 1), (m.W(u, k), -1), (m.W(v, k), 1)], 0, np.inf)


def _stage_rows(m: _Rows, g, ops, srcs, cluster, devices, runtime: str, metric: str,
                tokens: int, workload: Workload, buf_floor: float):
    """Per stage: its time as a linear expression (returned: terms, constants), at least one
    block, its buffer rows and its memory row."""
    T_terms, T_const = [], []
    S, K, V = m.S, m.K, m.V
    for s, d in enumerate(devices):
        terms, const = [], 0.0
        for v in range(V):
            tt, cc = m.x_terms(v, s, g.nodes[ops[v]][metric][d] * TS)
            terms += tt
            const += cc
        if s < K:
            lk = cluster.link(d, devices[s + 1])
            const += lk.latency_s * TS
            for u in srcs:
                terms.append((m.Cv(u, s), TS * tokens
                              * g.nodes[ops[u]]["activation_bytes_per_token"]
                              / lk.bandwidth_Bps))
        elif S > 1:
            const += cluster.link(d, devices[0]).time(workload.token_bytes) * TS
        T_terms.append(terms)
        T_const.append(const)
        # every stage holds at least one block (or sub-block)
        ne, nconst = [], 0.0
        for v in range(V):
            if g.nodes[ops[v]]["layer"] is None:
                continue
            tt, cc = m.x_terms(v, s, 1.0)
            ne += tt
            nconst += cc
        m.add(ne, 1 - nconst, np.inf)
        # buffers and memory
        for v in range(V):
            bv = g.nodes[ops[v]]["buffer_bytes"] / MEM
            if bv > buf_floor:
                tt, cc = m.x_terms(v, s, -bv)
                m.add([(m.ob + s, 1)] + tt, -cc, np.inf)  # buf_s - bv x_vs >= 0
        mem, mconst = [], _resident(cluster, d, runtime, s == 0, s == S - 1, g) / MEM
        for v in range(V):
            tt, cc = m.x_terms(v, s, _op_mem(g, ops[v], runtime) / MEM)
            mem += tt
            mconst += cc
        m.add(mem + [(m.ob + s, 1)], -np.inf, cluster.node(d).memory_bytes / MEM - mconst)
    return T_terms, T_const


def _objective(m: _Rows, T_terms, T_const, objective: str, streams: int):
    """(cost vector, constant offset): sum of stage times, or z with z >= T_s, z >= sum / B."""
    cobj = np.zeros(m.n)
    if objective in ("latency", "ttft"):
        for terms in T_terms:
            for col, val in terms:
                cobj[col] += val
        return cobj, sum(T_const)
    cobj[m.oz] = 1.0
    for terms, const in zip(T_terms, T_const):  # z >= T_s
        m.add([(m.oz, 1)] + [(col, -val) for col, val in terms], const, np.inf)
    allt = [(col, -val / streams) for terms in T_terms for col, val in terms]
    m.add([(m.oz, 1)] + allt, sum(T_const) / streams, np.inf)  # z >= sum / B
    return cobj, 0.0


def _highs(A, cobj, lo_a, hi_a, integrality, nw: int, o: dict, lb_, ub_):
    """HiGHS on the model with the fixed binaries substituted out (exact: a fixed column's
    contribution moves into the row bounds and the objective constant; rows left without
    a free column are dropped after checking that they hold)."""
    n = len(cobj)
    fixed = np.zeros(n, dtype=bool)
    fixed[:nw] = lb_[:nw] == ub_[:nw]
    free = ~fixed
    xf = np.where(fixed, lb_, 0.0)
    shift = A @ xf
    Af = A[:, free]
    keep = np.diff(Af.tocsr().indptr) > 0
    l2, h2 = lo_a - shift, hi_a - shift
    tol = 1e-9
    if np.any((l2[~keep] > tol) | (h2[~keep] < -tol)):
        fixed[:] = False  # a fixed row is violated: leave the model whole (HiGHS proves it)
        free, xf, keep = ~fixed, np.zeros(n), np.ones(len(lo_a), dtype=bool)
        Af, l2, h2 = A, lo_a, hi_a
    const = float(cobj @ xf)
    o = dict(o)
    if "objective_bound" in o:
        o["objective_bound"] -= const
    with _quiet_stdout(), warnings.catch_warnings():
        # HiGHS options beyond scipy's five are passed through verbatim, with a warning
        warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
        r = milp(cobj[free], constraints=LinearConstraint(Af[keep], l2[keep], h2[keep]),
                 integrality=integrality[free], bounds=Bounds(lb_[free], ub_[free]),
                 options=o)
    if r.x is not None:
        x = xf.copy()
        x[free] = r.x
        r.x = x
        r.fun = r.fun + const
    if getattr(r, "mip_dual_bound", None) is not None:
        r.mip_dual_bound = r.mip_dual_bound + const
    return r


def solve_milp(g: nx.DiGraph, cluster, devices: Sequence[str], objective: str = "latency",
               workload: Workload = Workload(), runtime: str = "mlx-pipeline",
               time_limit: float = 60.0, presolve: bool = False, reduce: bool = True,
               incumbent: bool = True, highs_options: dict | None = None) -> SplitResult:
    """Optimal assignment of the DAG's operations to the stages on `devices` (in order).

    presolve: HiGHS's presolve (off by default: on these models its probing costs more than it
    saves, about 2x on 1,000-operation graphs).
    reduce: drop implied rows, fix binaries implied by memory (and, with an incumbent, by the
    throughput bound) and substitute fixed binaries out; incumbent: the topological-order DP's
    split as a cutoff. Neither changes the optimum (tests/test_split_speed.py checks against
    the plain model). highs_options: extra HiGHS options, passed through verbatim.

    Returns a SplitResult whose extra["assignment"] maps op -> device and, when the blocks land
    in contiguous ranges, whose stages are the block ranges. Optimal iff HiGHS proves it.
    """
    check_runtime(runtime)
    cluster = _ring_cluster(cluster, runtime)
    t0 = time.perf_counter()
    devices = list(devices)
    S = len(devices)
    if objective not in ("latency", "ttft", "throughput"):
        raise ValueError(f"the MILP handles latency, ttft and throughput, not {objective!r}")
    metric = "prefill_s" if objective == "ttft" else "decode_s"
    tokens = workload.prompt_tokens if objective == "ttft" else 1
    ops = sorted(g.nodes, key=lambda v: g.nodes[v]["order"])
    idx = {v: i for i, v in enumerate(ops)}
    edges = [(idx[u], idx[v]) for u, v in g.edges]
    srcs = sorted({u for u, _ in edges})
    m = _Rows(len(ops), S, srcs)
    nw, K = m.nw, m.K
    _structure_rows(m, g, ops, idx, edges, reduce)
    # Buffers: every stage holds at least one block operation (the row below), so its buffer is
    # at least buf_floor = the smallest buffer of any block operation. buf_s gets that as its
    # lower bound, and the rows buf_s >= b_v x_vs of operations with b_v <= buf_floor are implied
    # by it: only operations with larger buffers need rows (none when all blocks are alike).
    layer_bufs = [g.nodes[v]["buffer_bytes"] / MEM for v in ops if g.nodes[v]["layer"] is not None]
    buf_floor = min(layer_bufs) if (reduce and layer_bufs) else 0.0
    T_terms, T_const = _stage_rows(m, g, ops, srcs, cluster, devices, runtime, metric, tokens,
                                   workload, buf_floor)
    cobj, offset = _objective(m, T_terms, T_const, objective, workload.streams)
    A = m.matrix()
    integrality = np.zeros(m.n)
    integrality[:nw] = 1
    lb = np.zeros(m.n)
    ub = np.ones(m.n)
    ub[m.ob:] = np.inf
    lb[m.ob:m.ob + S] = buf_floor
    if reduce and K:
        lo_w, hi_w, anc = _memory_fixings(g, ops, cluster, devices, runtime, buf_floor * MEM)
    # the DAG's sources can sit in stage 0, sinks in the last: no fixing needed
    opts = {"time_limit": time_limit, "mip_rel_gap": 0.0, "disp": False, "presolve": presolve}
    # Primal bound: the best contiguous split of the topological order (a feasible assignment,
    # see _order_dp) caps the objective through HiGHS's objective_bound (a cutoff: nodes whose
    # LP bound exceeds it are pruned). The cutoff sits a relative 1e-7 above the incumbent's
    # value, so the incumbent itself (hence an optimum) stays inside it: the answer and HiGHS's
    # proof of optimality (mip_rel_gap 0) are unchanged, only the search is smaller.
    inc, inc_v, cutoff = None, None, None
    if incumbent:
        inc, inc_v = _order_dp(g, cluster, devices, ops, objective, workload, runtime)
        if inc is not None:
            cut = inc_v * TS - (offset if objective != "throughput" else 0.0)
            cutoff = cut + 1e-7 * max(1.0, abs(inc_v * TS))
            opts["objective_bound"] = cutoff
    lb_plain, ub_plain = lb.copy(), ub.copy()
    if reduce and K:
        lb_plain[:nw], ub_plain[:nw] = lo_w.ravel(), hi_w.ravel()
        if cutoff is not None and objective == "throughput":
            lo_t, hi_t = _time_fixings(g, ops, cluster, devices, workload, anc,
                                       inc_v * (1 + 1e-6))
            lo_w, hi_w = np.maximum(lo_w, lo_t), np.minimum(hi_w, hi_t)
        hi_w = np.maximum(hi_w, lo_w)  # contradictions: no (better) assignment; HiGHS proves it
        lb[:nw], ub[:nw] = lo_w.ravel(), hi_w.ravel()
    opts.update(highs_options or {})
    lo_a, hi_a = np.asarray(m.lo, dtype=float), np.asarray(m.hi, dtype=float)
    res = _highs(A, cobj, lo_a, hi_a, integrality, nw, opts, lb, ub)
    if res.x is None and cutoff is not None and res.status == 2:
        # "infeasible under the cutoff" can only come from the MILP's scaled memory rows
        # judging the incumbent differently from the exact bytes: solve again without the
        # cutoff and the fixings derived from it
        opts.pop("objective_bound")
        res = _highs(A, cobj, lo_a, hi_a, integrality, nw, opts, lb_plain, ub_plain)
    return _milp_result(res, g, ops, devices, cluster, objective, offset, inc, inc_v, nw, K,
                        int(np.sum(lb[:nw] != ub[:nw])), time.perf_counter() - t0)


def _milp_result(res, g, ops, devices, cluster, objective, offset, inc, inc_v, nw, K,
                 free_binaries, solve_s) -> SplitResult:
    """HiGHS's answer as a SplitResult (the incumbent when HiGHS ran out of time first).
    Optimal for the given device order ("optimal-given-order"), else a "bound" whose lower
    bound is HiGHS's dual bound."""
    nodes = int(getattr(res, "mip_node_count", 0) or 0)
    dual = getattr(res, "mip_dual_bound", None)
    lb = None if dual is None or not np.isfinite(dual) else \
        (float(dual + offset) if objective != "throughput" else float(dual)) / TS
    if res.x is None:
        if inc is not None and res.status != 2:
            # time limit before HiGHS found a solution: return the incumbent, not proven
            stages = _block_stages(g, inc, devices, cluster.n_layers)
            return SplitResult(stages, inc_v, False, 1,
                               f"HiGHS: {res.message}; best contiguous split of the "
                               "topological order returned (not proven optimal)", "milp",
                               solve_s, nodes,
                               {"assignment": {v: devices[s] for v, s in inc.items()},
                                "stage_of": dict(inc), "devices": devices, "binaries": nw},
                               proven=BOUND, lower_bound=None if lb is None else min(lb, inc_v))
        status = 2 if res.status == 2 else 1
        return SplitResult(None, np.inf, res.status == 2, status, f"HiGHS: {res.message}",
                           "milp", solve_s, nodes,
                           proven=GIVEN_ORDER if res.status == 2 else BOUND)
    V = len(ops)
    w = np.round(res.x[:nw]).reshape(V, K) if K else np.zeros((V, 0))
    stage_of = {ops[v]: int(K - w[v].sum()) for v in range(V)}
    fun = (float(res.fun + offset) if objective != "throughput" else float(res.fun)) / TS
    stages = _block_stages(g, stage_of, devices, cluster.n_layers)
    optimal = res.status == 0
    return SplitResult(stages, fun, optimal, 0 if optimal else 1,
                       f"HiGHS: {res.message}" + ("" if optimal else
                                                  f" (gap {getattr(res, 'mip_gap', None)})"),
                       "milp", solve_s, nodes,
                       {"assignment": {v: devices[s] for v, s in stage_of.items()},
                        "stage_of": stage_of, "devices": devices, "binaries": nw,
                        "free_binaries": free_binaries, "incumbent": inc_v},
                       proven=GIVEN_ORDER if optimal else BOUND,
                       lower_bound=None if optimal or lb is None else min(lb, fun))


def _block_stages(g, stage_of, devices, n_layers):
    """Block ranges per stage when every block (all its sub-blocks) sits in one stage."""
    per_layer = {}
    for v, s in stage_of.items():
        layer = g.nodes[v]["layer"]
        if layer is not None:
            per_layer.setdefault(layer, set()).add(s)
    if any(len(x) > 1 for x in per_layer.values()):
        return None  # a block is split between stages: no block-level plan
    out = []
    for s, d in enumerate(devices):
        layers = sorted(i for i, x in per_layer.items() if s in x)
        if layers:
            out.append(Stage(d, layers[0], layers[-1] + 1))
    return out


def solve_milp_chain(cluster, objective: str = "latency", workload: Workload = Workload(),
                     runtime: str = "mlx-pipeline", use_all_nodes: bool = False,
                     order: Sequence[str] | None = None, time_limit: float = 60.0) -> SplitResult:
    """The MILP on the block chain, over every subsequence of the node order (the whole order
    with use_all_nodes): optimal over the given order, like solve_fixed_order."""
    from graphsplit.graph import build_graph
    t0 = time.perf_counter()
    _ring_cluster(cluster, runtime)  # refuse exo-current before building anything
    g = build_graph(cluster, workload)
    order = list(order) if order is not None else cluster.ids
    seqs = [order] if use_all_nodes else [list(c) for k in range(1, len(order) + 1)
                                          for c in itertools.combinations(order, k)]
    best, all_opt, work, lbs = None, True, 0, []
    for seq in seqs:
        if len(seq) > cluster.n_layers:
            continue
        r = solve_milp(g, cluster, seq, objective, workload, runtime, time_limit)
        work += 1
        all_opt = all_opt and r.optimal
        lbs.append(r.lower_bound if r.optimal or r.lower_bound is not None else -np.inf)
        if r.stages is not None and (best is None or r.fun < best.fun - 1e-15):
            best = r
    dt = time.perf_counter() - t0
    if best is None:
        return SplitResult(None, np.inf, all_opt, 2 if all_opt else 1,
                           "infeasible: no split fits" if all_opt else
                           "no split found within the time limit", "milp", dt, work,
                           proven=GIVEN_ORDER if all_opt else BOUND)
    # a subsequence without a plan bounds nothing below; one with a plan bounds at its bound
    lb = min([x for x in lbs if x is not None] + [best.fun])
    msg = f"{len(seqs)} MILPs over subsequences of the node order; last: {best.message}"
    return SplitResult(best.stages, best.fun, all_opt, best.status if all_opt else 1, msg,
                       "milp", dt, work, best.extra, proven=GIVEN_ORDER if all_opt else BOUND,
                       lower_bound=None if not all_opt and lb == -np.inf else lb)
