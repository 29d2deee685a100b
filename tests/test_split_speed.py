"""The speed-ups of the exact solvers change no answer: throughput search, set lower bounds,
MILP row reduction and incumbent cutoff, all checked against brute force or the plain forms."""

import random

import numpy as np
import pytest

from costtables import MiB, make_table
from graphsplit.brute import brute_force
from graphsplit.cluster import cluster_from_tables
from graphsplit.costmodel import ChainCosts, Workload
from graphsplit.graph import build_graph
from graphsplit.solve_dp import (_bitmask_dp, _bitmask_dp_vec, _reverse_lower_bound,
                                 _set_lower_bound, _stage_times, solve_bitmask,
                                 solve_fixed_order)
from graphsplit.solve_milp import _needed_edges, _order_dp, evaluate_assignment, solve_milp
from test_split_milp import dag_cluster
from test_split_solvers import RUNTIMES, same


def random_cluster(rnd, n_layers, D, mem=(400, 1200)):
    wb = [rnd.randint(50, 150) * MiB for _ in range(n_layers)]
    t = {f"n{i}": make_table(f"n{i}", n_layers,
                             decode_s=[rnd.uniform(0.005, 0.05) for _ in range(n_layers)],
                             weight_bytes=wb, memory_usable=rnd.randint(*mem) * MiB)
         for i in range(D)}
    links = {(a, b): {"latency_ms": rnd.uniform(0, 20), "bandwidth_gbps": rnd.uniform(0.1, 10)}
             for a in t for b in t if a != b and rnd.random() < 0.7}
    return cluster_from_tables(t, links=links)


def test_throughput_search_equals_brute_force_for_many_stream_counts():
    rnd = random.Random(11)
    for _ in range(10):
        c = random_cluster(rnd, rnd.randint(3, 7), rnd.randint(2, 4))
        rt = rnd.choice(RUNTIMES)
        for B in (1, 2, 3, 5, 8, 64):
            w = Workload(prompt_tokens=32, context_tokens=128, streams=B)
            same(solve_bitmask(c, "throughput", w, rt), brute_force(c, "throughput", w, rt))
            same(solve_fixed_order(c, "throughput", w, rt),
                 brute_force(c, "throughput", w, rt, fixed_order=True))


def test_set_lower_bound_never_exceeds_a_real_completion():
    """lbt[A, b] <= the sum of the stage times of blocks b.. of any plan whose stages from b on
    use only nodes of A (checked on every suffix of brute-force-optimal plans, with caps)."""
    rnd = random.Random(4)
    for _ in range(8):
        c = random_cluster(rnd, rnd.randint(3, 7), rnd.randint(2, 4))
        w = Workload(prompt_tokens=32, context_tokens=128, streams=rnd.choice([1, 4]))
        cc = ChainCosts(c, w, "exo-current", "decode", ids=sorted(c.ids))
        for B in (1, 4, 16):
            r = brute_force(c, "throughput", Workload(prompt_tokens=32, context_tokens=128,
                                                      streams=B), "exo-current")
            if r.stages is None:
                continue
            path = [(cc.ids.index(s.node), s.start_layer, s.end_layer) for s in r.stages]
            ts = _stage_times(cc, path)
            for cap in (np.inf, max(ts)):
                lbt = _set_lower_bound(cc, cap)
                for i in range(len(path)):
                    A = sum(1 << d for d, _, _ in path[i:])
                    assert lbt[A, path[i][1]] <= sum(ts[i:]) * (1 + 1e-12)


def test_milp_reduction_and_cutoff_change_no_answer():
    c = dag_cluster()
    for objective, B in (("latency", 1), ("ttft", 1), ("throughput", 4)):
        w = Workload(prompt_tokens=32, context_tokens=128, streams=B)
        g = build_graph(c, w, sub_blocks=True)
        for devices in (["a", "b"], ["b", "a", "c"], ["c", "b"]):
            plain = solve_milp(g, c, devices, objective, w, reduce=False, incumbent=False)
            fast = solve_milp(g, c, devices, objective, w)
            assert (plain.stages is None) == (fast.stages is None)
            assert plain.status == fast.status
            if plain.extra.get("stage_of") is not None:
                assert fast.optimal and fast.fun == pytest.approx(plain.fun, rel=1e-7)
                assert evaluate_assignment(g, c, devices, fast.extra["stage_of"], objective,
                                           w) == pytest.approx(plain.fun, rel=1e-7)


def test_needed_edges_drop_only_implied_rows():
    c = dag_cluster()
    g = build_graph(c, Workload(), sub_blocks=True)
    ops = sorted(g.nodes, key=lambda v: g.nodes[v]["order"])
    idx = {v: i for i, v in enumerate(ops)}
    order_e, cut_e = _needed_edges(g, ops, idx)
    # x -> attn -> mlp with the residual x -> mlp: the residual's order row is implied by the
    # path, and x's cut row for attn is implied by its row for mlp
    assert (idx["embed"], idx["layers.0.mlp"]) not in order_e
    assert (idx["embed"], idx["layers.0.attn"]) in order_e
    assert (idx["embed"], idx["layers.0.attn"]) not in cut_e
    assert (idx["embed"], idx["layers.0.mlp"]) in cut_e
    assert len(order_e) == len(cut_e) == g.number_of_nodes() - 1


def test_order_dp_gives_a_feasible_assignment():
    c = dag_cluster()
    w = Workload(prompt_tokens=32, context_tokens=128, streams=2)
    g = build_graph(c, w, sub_blocks=True)
    ops = sorted(g.nodes, key=lambda v: g.nodes[v]["order"])
    for objective in ("latency", "throughput"):
        a, v = _order_dp(g, c, ["b", "a", "c"], ops, objective, w, "mlx-pipeline")
        if a is not None:
            assert evaluate_assignment(g, c, ["b", "a", "c"], a, objective, w) == v


def test_reverse_lower_bound_never_exceeds_a_real_completion():
    """H[A, d, b] <= the sum of the stage times of blocks b.. of any plan whose stage at b runs
    on d and whose later stages use only nodes of A (exactly A with use_all), stage cap
    included; checked on every suffix of brute-force-optimal plans."""
    rnd = random.Random(5)
    for _ in range(8):
        c = random_cluster(rnd, rnd.randint(3, 7), rnd.randint(2, 4))
        cc = ChainCosts(c, Workload(prompt_tokens=32, context_tokens=128, streams=1),
                        "exo-current", "decode", ids=sorted(c.ids))
        for B in (1, 4, 16):
            for use_all in (False, True):
                r = brute_force(c, "throughput", Workload(prompt_tokens=32, context_tokens=128,
                                                          streams=B), "exo-current", use_all)
                if r.stages is None:
                    continue
                path = [(cc.ids.index(s.node), s.start_layer, s.end_layer) for s in r.stages]
                ts = _stage_times(cc, path)
                for cap in (np.inf, max(ts)):
                    H = _reverse_lower_bound(cc, use_all, cap)
                    for i in range(len(path)):
                        A = sum(1 << d for d, _, _ in path[i:])
                        assert H[A, path[i][0], path[i][1]] <= sum(ts[i:]) * (1 + 1e-12)
                        if not use_all:  # more allowed nodes: still a lower bound
                            full = (1 << cc.D) - 1
                            mask = sum(1 << d for d, _, _ in path[:i + 1])
                            A2 = (full ^ mask) | (1 << path[i][0])
                            assert H[A2, path[i][0], path[i][1]] <= sum(ts[i:]) * (1 + 1e-12)


def test_relaxed_first_node_and_reverse_bound_change_no_dp_answer():
    """_bitmask_dp (first-node relaxation, then the exact program pruned by the reverse bound)
    returns the same min sum as the plain exact program, for caps, incumbents and use_all."""
    rnd = random.Random(9)
    for _ in range(12):
        c = random_cluster(rnd, rnd.randint(3, 9), rnd.randint(2, 5))
        w = Workload(prompt_tokens=32, context_tokens=128, streams=rnd.choice([1, 4]))
        cc = ChainCosts(c, w, rnd.choice(RUNTIMES), "decode", ids=sorted(c.ids))
        for use_all in (False, True):
            v0, p0, _ = _bitmask_dp_vec(cc, use_all)
            caps = [np.inf] if p0 is None else [np.inf] + sorted(
                set(_stage_times(cc, p0)), reverse=True)[:3] + [max(_stage_times(cc, p0)) * 0.9]
            for cap in caps:
                for inc in (np.inf, v0 * 1.01 if p0 is not None else np.inf):
                    va, pa, _ = _bitmask_dp_vec(cc, use_all, cap, inc)
                    vb, pb, _ = _bitmask_dp(cc, use_all, cap, inc)
                    assert (pa is None) == (pb is None), (cap, inc)
                    if pa is not None:
                        assert vb == pytest.approx(va, rel=1e-9, abs=1e-15)
                        assert sum(_stage_times(cc, pb)) == pytest.approx(vb, rel=1e-9)
                        assert max(_stage_times(cc, pb)) <= cap
