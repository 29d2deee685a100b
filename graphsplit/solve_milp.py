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

Reference: PiPPy graphsplit (pytorch/PiPPy, pippy/graphsplit.py): MILP with
scipy.optimize.milp, homogeneous stages, parameter/activation counts instead of times.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from typing import Sequence

import networkx as nx
import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from graphsplit.costmodel import Workload, check_runtime
from graphsplit.plan import Stage
from graphsplit.result import SplitResult


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


def evaluate_assignment(g: nx.DiGraph, cluster, devices: Sequence[str], stage_of: dict,
                        objective: str, workload: Workload, runtime: str = "exo-current"):
    """Reference cost of an assignment op -> stage index (None if invalid or over memory)."""
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


def solve_milp(g: nx.DiGraph, cluster, devices: Sequence[str], objective: str = "latency",
               workload: Workload = Workload(), runtime: str = "exo-current",
               time_limit: float = 60.0, presolve: bool = False) -> SplitResult:
    """Optimal assignment of the DAG's operations to the stages on `devices` (in order).

    presolve: HiGHS's presolve (off by default: on these models its probing costs more than it
    saves, about 2x on 1,000-operation graphs).

    Returns a SplitResult whose extra["assignment"] maps op -> device and, when the blocks land
    in contiguous ranges, whose stages are the block ranges. Optimal iff HiGHS proves it.
    """
    check_runtime(runtime)
    t0 = time.perf_counter()
    devices = list(devices)
    S = len(devices)
    if objective not in ("latency", "ttft", "throughput"):
        raise ValueError(f"the MILP handles latency, ttft and throughput, not {objective!r}")
    metric = "prefill_s" if objective == "ttft" else "decode_s"
    tokens = workload.prompt_tokens if objective == "ttft" else 1
    ops = sorted(g.nodes, key=lambda v: g.nodes[v]["order"])
    idx = {v: i for i, v in enumerate(ops)}
    V = len(ops)
    K = S - 1
    edges = [(idx[u], idx[v]) for u, v in g.edges]
    srcs = sorted({u for u, _ in edges})
    cidx = {u: j for j, u in enumerate(srcs)}
    # variable layout: w[v,k] (V*K) | c[u,k] (len(srcs)*K) | buf[s] (S) | z (1)
    nw, nc = V * K, len(srcs) * K
    ob, oz = nw + nc, nw + nc + S
    n = oz + 1

    def W(v, k):
        return v * K + k

    def Cv(u, k):
        return nw + cidx[u] * K + k

    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(terms, lb, ub):
        nonlocal r
        for col, val in terms:
            rows.append(r)
            cols.append(col)
            vals.append(val)
        lo.append(lb)
        hi.append(ub)
        r += 1

    def x_terms(v, s, coef):
        """coef * x_vs as terms over w (x_vs = w_vs - w_v,s-1; w_v,S-1 = 1 constant)."""
        terms, const = [], 0.0
        if s < K:
            terms.append((W(v, s), coef))
        else:
            const += coef
        if s > 0:
            terms.append((W(v, s - 1), -coef))
        return terms, const

    for v in range(V):
        for k in range(K - 1):
            add([(W(v, k), 1), (W(v, k + 1), -1)], -np.inf, 0)
    for u, v in edges:
        for k in range(K):
            add([(W(v, k), 1), (W(u, k), -1)], -np.inf, 0)
            add([(Cv(u, k), 1), (W(u, k), -1), (W(v, k), 1)], 0, np.inf)
    # stage times as linear expressions: T_s = sum terms + const
    T_terms, T_const = [], []
    op_names = ops
    for s, d in enumerate(devices):
        terms, const = [], 0.0
        for v in range(V):
            tt, cc = x_terms(v, s, g.nodes[op_names[v]][metric][d] * TS)
            terms += tt
            const += cc
        if s < K:
            lk = cluster.link(d, devices[s + 1])
            const += lk.latency_s * TS
            for u in srcs:
                terms.append((Cv(u, s), TS * tokens
                              * g.nodes[op_names[u]]["activation_bytes_per_token"]
                              / lk.bandwidth_Bps))
        elif S > 1:
            const += cluster.link(d, devices[0]).time(workload.token_bytes) * TS
        T_terms.append(terms)
        T_const.append(const)
        # every stage holds at least one block (or sub-block)
        ne, nconst = [], 0.0
        for v in range(V):
            if g.nodes[op_names[v]]["layer"] is None:
                continue
            tt, cc = x_terms(v, s, 1.0)
            ne += tt
            nconst += cc
        add(ne, 1 - nconst, np.inf)
        # buffers and memory
        for v in range(V):
            bv = g.nodes[op_names[v]]["buffer_bytes"] / MEM
            if bv > 0:
                tt, cc = x_terms(v, s, -bv)
                add([(ob + s, 1)] + tt, -cc, np.inf)  # buf_s - bv x_vs >= 0
        mem, mconst = [], _resident(cluster, d, runtime, s == 0, s == S - 1, g) / MEM
        for v in range(V):
            tt, cc = x_terms(v, s, _op_mem(g, op_names[v], runtime) / MEM)
            mem += tt
            mconst += cc
        add(mem + [(ob + s, 1)], -np.inf, cluster.node(d).memory_bytes / MEM - mconst)
    cobj = np.zeros(n)
    if objective in ("latency", "ttft"):
        for terms in T_terms:
            for col, val in terms:
                cobj[col] += val
        offset = sum(T_const)
    else:
        cobj[oz] = 1.0
        offset = 0.0
        for terms, const in zip(T_terms, T_const):  # z >= T_s
            add([(oz, 1)] + [(col, -val) for col, val in terms], const, np.inf)
        allt = [(col, -val / workload.streams) for terms in T_terms for col, val in terms]
        add([(oz, 1)] + allt, sum(T_const) / workload.streams, np.inf)  # z >= sum / B
    A = coo_matrix((vals, (rows, cols)), shape=(r, n)).tocsr()
    integrality = np.zeros(n)
    integrality[:nw] = 1
    lb = np.zeros(n)
    ub = np.ones(n)
    ub[ob:] = np.inf
    # the DAG's sources can sit in stage 0, sinks in the last: no fixing needed
    with _quiet_stdout():
        res = milp(cobj, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
                   bounds=Bounds(lb, ub),
                   options={"time_limit": time_limit, "mip_rel_gap": 0.0, "disp": False,
                            "presolve": presolve})
    solve_s = time.perf_counter() - t0
    if res.x is None:
        status = 2 if res.status == 2 else 1
        return SplitResult(None, np.inf, res.status == 2, status,
                           f"HiGHS: {res.message}", "milp", solve_s,
                           int(getattr(res, "mip_node_count", 0) or 0))
    w = np.round(res.x[:nw]).reshape(V, K) if K else np.zeros((V, 0))
    stage_of = {op_names[v]: int(K - w[v].sum()) for v in range(V)}
    fun = (float(res.fun + offset) if objective != "throughput" else float(res.fun)) / TS
    stages = _block_stages(g, stage_of, devices, cluster.n_layers)
    optimal = res.status == 0
    return SplitResult(stages, fun, optimal, 0 if optimal else 1,
                       f"HiGHS: {res.message}" + ("" if optimal else
                                                  f" (gap {getattr(res, 'mip_gap', None)})"),
                       "milp", solve_s, int(getattr(res, "mip_node_count", 0) or 0),
                       {"assignment": {v: devices[s] for v, s in stage_of.items()},
                        "stage_of": stage_of, "devices": devices, "binaries": nw})


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
                     runtime: str = "exo-current", use_all_nodes: bool = False,
                     order: Sequence[str] | None = None, time_limit: float = 60.0) -> SplitResult:
    """The MILP on the block chain, over every subsequence of the node order (the whole order
    with use_all_nodes): optimal over the given order, like solve_fixed_order."""
    from graphsplit.graph import build_graph
    t0 = time.perf_counter()
    g = build_graph(cluster, workload)
    order = list(order) if order is not None else cluster.ids
    seqs = [order] if use_all_nodes else [list(c) for k in range(1, len(order) + 1)
                                          for c in itertools.combinations(order, k)]
    best, all_opt, work = None, True, 0
    for seq in seqs:
        if len(seq) > cluster.n_layers:
            continue
        r = solve_milp(g, cluster, seq, objective, workload, runtime, time_limit)
        work += 1
        all_opt = all_opt and r.optimal
        if r.stages is not None and (best is None or r.fun < best.fun - 1e-15):
            best = r
    dt = time.perf_counter() - t0
    if best is None:
        return SplitResult(None, np.inf, all_opt, 2, "infeasible: no split fits", "milp", dt, work)
    best.solve_s = dt
    best.nit = work
    best.optimal = all_opt
    best.message = f"{len(seqs)} MILPs over subsequences of the node order; last: {best.message}"
    return best
