"""Beyond 12 nodes: node types (twins) make the exact program small, plans do not depend on the
cluster file's node order at any size, and every result says what it proves ("bound" results
carry a lower bound below the true optimum)."""

import random

import numpy as np
import pytest

from costtables import GiB, MiB, make_table
from graphsplit.api import make_plan, solve
from graphsplit.brute import brute_force
from graphsplit.cluster import cluster_from_tables
from graphsplit.costmodel import Workload, objective_value, predict
from graphsplit.plan import read_plan, write_plan
from graphsplit.report import render
from graphsplit.result import ALL_ORDERS, BOUND, GIVEN_ORDER
from graphsplit.solve_dp import (_bitmask_dp_vec, _candidate_caps, _range_lo, chain_costs,
                                 solve_bitmask, solve_fixed_order)
from graphsplit.solve_types import as_typed, node_types, typed_costs
from test_split_solvers import RUNTIMES, same
from test_split_speed import random_cluster


def kinds_cluster(kinds, n_layers, link_ms=None, seed=None, extra_links=None):
    """Nodes of a few kinds (identical tables per kind) on links that depend only on the
    kinds at both ends (symmetric); `seed` shuffles the order the nodes are listed in."""
    tables, kind_of = {}, {}
    for kind, (count, decode_s, mem) in kinds.items():
        for i in range(count):
            nid = f"{kind}{i}"
            tables[nid] = make_table(nid, n_layers, decode_s=decode_s, memory_usable=mem,
                                     weight_bytes=100 * MiB)
            kind_of[nid] = kind
    link_ms = link_ms or {}
    links = {(a, b): {"latency_ms": link_ms.get(frozenset((kind_of[a], kind_of[b])), 1.0),
                      "bandwidth_gbps": 10}
             for a in tables for b in tables if a != b}
    links.update(extra_links or {})
    names = list(tables)
    if seed is not None:
        random.Random(seed).shuffle(names)
    return cluster_from_tables({n: tables[n] for n in names}, links=links)


def costs(c, w=Workload(prompt_tokens=32, context_tokens=128), rt="mlx-pipeline"):
    return chain_costs(c, w, rt, "decode", sorted(c.ids))


def test_twins_form_types_and_an_asymmetric_link_splits_one_off():
    kinds = {"f": (2, 0.01, 2 * GiB), "s": (2, 0.03, 2 * GiB)}
    c = kinds_cluster(kinds, 6, {frozenset("fs"): 3.0})
    assert [[costs(c).ids[d] for d in t] for t in node_types(costs(c))] == \
        [["f0", "f1"], ["s0", "s1"]]
    # f1 -> s0 slower than f0 -> s0: f0 and f1 are no longer interchangeable (s0, s1 neither)
    c = kinds_cluster(kinds, 6, {frozenset("fs"): 3.0},
                      extra_links={("f1", "s0"): {"latency_ms": 9.0, "bandwidth_gbps": 10}})
    assert [[costs(c).ids[d] for d in t] for t in node_types(costs(c))] == \
        [["f0"], ["f1"], ["s0"], ["s1"]]


TYPED = {
    "2 fast + 2 slow": ({"f": (2, 0.01, 700 * MiB), "s": (2, 0.03, 900 * MiB)},
                        {frozenset("fs"): 4.0, frozenset("f"): 0.1, frozenset("s"): 2.0}),
    "3 same + 1 big": ({"a": (3, 0.02, 600 * MiB), "b": (1, 0.012, 4 * GiB)},
                       {frozenset("ab"): 6.0, frozenset("a"): 0.5}),
}


@pytest.mark.parametrize("name", list(TYPED))
def test_typed_program_equals_brute_force_with_several_nodes_per_type(name):
    kinds, link_ms = TYPED[name]
    c = kinds_cluster(kinds, 7, link_ms)
    assert typed_costs(costs(c)).D == 2  # the program really runs on types
    for i, (obj, B) in enumerate([("latency", 1), ("ttft", 1), ("throughput", 1),
                                  ("throughput", 4)]):
        rt = RUNTIMES[i % 3]
        w = Workload(prompt_tokens=32, context_tokens=128, streams=B)
        for use_all in (False, True):
            res = solve_bitmask(c, obj, w, rt, use_all)
            same(res, brute_force(c, obj, w, rt, use_all))
            assert res.proven == ALL_ORDERS
            if res.stages is not None:  # the type path mapped to nodes is a real plan
                assert objective_value(predict(c, res.stages, w, rt), obj, w) == \
                    pytest.approx(res.fun, rel=1e-9)


def test_typed_program_equals_node_program_at_32_layers():
    """2 fast + 2 slow hosts, 32 layers (a case where mixing type and host indices when
    reading the plan back doubles the time): the count-vector program and the bitmask program
    over the four nodes find the same optimum, with and without a stage cap."""
    kinds, link_ms = TYPED["2 fast + 2 slow"]
    c = kinds_cluster({"f": (2, 0.004, 1200 * MiB), "s": (2, 0.008, 1500 * MiB)}, 32, link_ms)
    cc = costs(c)
    tc = typed_costs(cc)
    assert tc.D == 2
    for cap in (float("inf"), 0.08, 0.05):
        for use_all in (False, True):
            vt, pt, _ = _bitmask_dp_vec(tc, use_all, cap)
            vn, pn, _ = _bitmask_dp_vec(as_typed(cc), use_all, cap)
            assert (pt is None) == (pn is None)
            if pt is not None:
                assert vt == pytest.approx(vn, rel=1e-12)
    w = Workload(prompt_tokens=32, context_tokens=128, streams=4)
    res = solve(c, "throughput", w, "mlx-pipeline")
    assert len({s.node for s in res.stages}) == len(res.stages)  # distinct hosts
    assert objective_value(predict(c, res.stages, w, "mlx-pipeline"), "throughput", w) == \
        pytest.approx(res.fun, rel=1e-9)


def ring_cluster(n, n_layers, seed=None):
    """n identical nodes, fast links along one cycle n00 -> n01 -> ... -> n00, slow others
    (the issue's case: the fixed order of the file decided the plan)."""
    t = {f"n{i:02d}": make_table(f"n{i:02d}", n_layers, decode_s=0.01, memory_usable=650 * MiB,
                                 weight_bytes=100 * MiB) for i in range(n)}
    ring = {(f"n{i:02d}", f"n{(i + 1) % n:02d}") for i in range(n)}
    links = {(a, b): ({"latency_ms": 0.1, "bandwidth_gbps": 40} if (a, b) in ring
                      else {"latency_ms": 15.0, "bandwidth_gbps": 1}) for a in t for b in t if a != b}
    names = list(t)
    if seed is not None:
        random.Random(seed).shuffle(names)
    return cluster_from_tables({k: t[k] for k in names}, links=links)


def plan_of(r):
    return [(s.node, s.start_layer, s.end_layer) for s in r.stages]


def test_plans_do_not_depend_on_node_order_13_to_24_nodes():
    w = Workload(prompt_tokens=32, context_tokens=128, streams=4)
    clusters = {
        "13 on a ring": lambda s: ring_cluster(13, 12, s),
        "24 in 4 types": lambda s: kinds_cluster(
            {"a": (6, 0.01, 500 * MiB), "b": (6, 0.014, 900 * MiB), "c": (6, 0.02, 2 * GiB),
             "d": (6, 0.03, 3 * GiB)}, 24,
            {frozenset("ab"): 2.0, frozenset("cd"): 0.5, frozenset("a"): 0.2}, seed=s),
        "16 mixed": lambda s: kinds_cluster(
            {"a": (5, 0.01, 500 * MiB), "b": (4, 0.02, GiB), "c": (6, 0.015, 700 * MiB),
             "x": (1, 0.005, 300 * MiB)}, 20, {frozenset("ab"): 3.0, frozenset("cx"): 0.3},
            seed=s),
    }
    for name, make in clusters.items():
        for obj in ("latency", "throughput"):
            ref = None
            for seed in (None, 1, 2, 3):
                r = solve(make(seed), obj, w, "mlx-pipeline")
                assert r.proven == ALL_ORDERS, (name, r.message)
                if ref is None:
                    ref = r
                assert plan_of(r) == plan_of(ref) and r.fun == ref.fun, (name, obj, seed)
    # the ring: the optimum follows the fast cycle whatever the order, which a fixed order
    # only finds when the file lists the nodes along it
    c = ring_cluster(13, 12, seed=5)
    best = solve(c, "latency", w, "mlx-pipeline")
    along = solve_fixed_order(c, "latency", w, "mlx-pipeline", order=sorted(c.ids))
    shuffled = solve_fixed_order(c, "latency", w, "mlx-pipeline")
    assert along.proven == shuffled.proven == GIVEN_ORDER
    assert best.fun == pytest.approx(along.fun, rel=1e-12) and best.fun < shuffled.fun


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_bound_label_has_a_lower_bound_below_the_optimum(runtime):
    """A program too large for its budget (max_keys) answers "bound": its plan is real, its
    lower bound is at most the brute-force optimum, its gap is (fun - bound) / fun."""
    rnd = random.Random(3)
    n_bound = 0
    for _ in range(4):
        c = random_cluster(rnd, rnd.randint(4, 7), rnd.randint(4, 5))
        for obj, B in (("latency", 1), ("throughput", 4)):
            w = Workload(prompt_tokens=32, context_tokens=128, streams=B)
            opt = brute_force(c, obj, w, runtime)
            # no type fits the program / the fastest two or three types do
            r = solve_bitmask(c, obj, w, runtime, max_keys=rnd.choice([12, 80]))
            if opt.stages is None:
                assert r.stages is None
                continue
            assert r.lower_bound <= opt.fun * (1 + 1e-9)
            if r.stages is not None:
                assert r.fun >= opt.fun * (1 - 1e-9)
                assert objective_value(predict(c, r.stages, w, runtime), obj, w) == \
                    pytest.approx(r.fun, rel=1e-9)
            if r.proven == BOUND:
                n_bound += 1
                assert not r.optimal and r.status == 1
                if r.stages is not None:
                    assert r.gap == pytest.approx((r.fun - r.lower_bound) / r.fun)
            else:
                assert r.fun == pytest.approx(opt.fun, rel=1e-9)
    assert n_bound  # the budget really forced bounds


def test_bound_results_do_not_depend_on_node_order():
    """Beyond the size limit the plan, its value and its lower bound (the greedy coarsening,
    the canonical order, the fastest types) are the same whatever the file's order."""
    w = Workload(prompt_tokens=32, context_tokens=128, streams=4)
    kinds = {"a": (3, 0.01, 500 * MiB), "b": (2, 0.02, GiB), "c": (3, 0.015, 700 * MiB),
             "x": (1, 0.005, 300 * MiB)}
    for obj in ("latency", "throughput"):
        ref = None
        for seed in (None, 1, 2):
            c = kinds_cluster(kinds, 12, {frozenset("ab"): 3.0, frozenset("cx"): 0.3}, seed=seed)
            r = solve_bitmask(c, obj, w, "mlx-pipeline", max_keys=300)
            got = (plan_of(r), r.fun, r.lower_bound, r.proven)
            assert r.lower_bound <= r.fun * (1 + 1e-9)
            ref = ref or got
            assert got == ref, (obj, seed)


def test_range_bounds_by_binary_search_equal_the_definition():
    """_range_lo (a binary search over the first block) equals counting, for every stage end,
    the first blocks whose stage fits memory and the cap, at every candidate cap."""
    rnd = random.Random(5)
    for _ in range(3):
        c = random_cluster(rnd, rnd.randint(3, 9), rnd.randint(2, 4), mem=(150, 900))
        cc = costs(c)
        L = cc.L
        cands = _candidate_caps(cc, float("inf"))
        for cap in [float("inf"), cands[0] / 2] + list(cands[::max(1, len(cands) // 12)]):
            t = cc.comp[:, None, :, :] + cc.out[:, :, None, :]  # (d, q, b, c)
            ok = np.isfinite(t) & (t <= cap)
            below = np.arange(L + 1)[:, None] < np.arange(L + 1)[None, :]
            assert (_range_lo(cc, cap) == (below[None, None] & ~ok).sum(axis=2)).all()


def test_labels_reach_the_plan_file_and_the_report(tmp_path):
    c = kinds_cluster({"f": (2, 0.01, 700 * MiB), "s": (2, 0.03, 900 * MiB)}, 8)
    w = Workload(prompt_tokens=32, context_tokens=128)
    for solver, proven in (("auto", ALL_ORDERS), ("fixed-order", GIVEN_ORDER)):
        plan = make_plan(c, "latency", w, "mlx-pipeline", solver=solver)
        assert plan.solver["proven"] == proven and plan.solver["gap"] == 0.0
        assert f"[{proven}]" in render(plan)
        write_plan(plan, tmp_path / f"{solver}.json")
        assert read_plan(tmp_path / f"{solver}.json").solver["proven"] == proven


def test_throughput_floor_stops_within_its_tolerance_and_stays_below_the_optimum():
    """The relaxation's throughput search run for a lower bound only (floor_within > 0) returns
    a floor with optimum * (1 - floor_within) <= floor <= optimum, where the optimum is the
    same program's full search; with floor_within = 0 the floor is the optimum."""
    from graphsplit.solve_dp import _solve_on
    rnd = random.Random(11)
    stopped = 0
    for _ in range(4):
        c = random_cluster(rnd, rnd.randint(10, 16), rnd.randint(5, 6), mem=(2000, 4000))
        w = Workload(prompt_tokens=32, context_tokens=128, streams=8)
        tc = typed_costs(chain_costs(c, w, "mlx-pipeline", "decode", sorted(c.ids)))
        full = _solve_on(tc, "throughput", False, None, "t", 0.0)
        assert full.lower_bound == full.fun and full.proven == ALL_ORDERS
        for fw in (0.01, 0.05, 0.2):
            part = _solve_on(tc, "throughput", False, None, "t", 0.0, floor_within=fw)
            assert full.fun * (1 - fw) * (1 - 1e-12) <= part.lower_bound <= full.fun * (1 + 1e-12)
            assert part.fun >= full.fun * (1 - 1e-12)  # its plan is still a real plan
            stopped += part.nit < full.nit
            if part.lower_bound < part.fun * (1 - 1e-9):
                assert part.proven == BOUND
    assert stopped  # the tolerance really cut some searches short
