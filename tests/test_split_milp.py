"""The MILP equals brute force on chains (fixed node order) and on a non-chain DAG."""

import itertools
import random

import pytest

from costtables import GiB, MiB, make_table
from graphsplit.brute import brute_force
from graphsplit.cluster import cluster_from_tables
from graphsplit.costmodel import Workload
from graphsplit.graph import build_graph, is_chain
from graphsplit.solve_milp import evaluate_assignment, solve_milp, solve_milp_chain
from profiler.errors import UserError
from test_split_solvers import CASES, SCENARIOS, same, scenario

RING_RUNTIMES = ["mlx-pipeline", "exo-legacy"]


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("use_all", [False, True])
def test_milp_chain_equals_brute_force(name, use_all):
    c = scenario(name)
    for i, (obj, B) in enumerate(CASES):
        rt = RING_RUNTIMES[i % 2]
        w = Workload(prompt_tokens=64, context_tokens=256, streams=B)
        if i == 1:  # exo-legacy with a measured per-message overhead
            c.runtimes = {"exo-legacy": {"message_overhead_ms": 0.7}}
        r = solve_milp_chain(c, obj, w, rt, use_all)
        same(r, brute_force(c, obj, w, rt, use_all, fixed_order=True))
        assert r.optimal


def test_milp_refuses_exo_current_in_one_line():
    c = scenario("slow-node")
    with pytest.raises(UserError, match="bitmask or fixed-order"):
        solve_milp_chain(c, "latency", Workload(prompt_tokens=64, context_tokens=256),
                         "exo-current")


def dag_cluster():
    rnd = random.Random(5)
    t = {n: make_table(n, 3, decode_s=[rnd.uniform(0.005, 0.03) for _ in range(3)],
                       weight_bytes=300 * MiB, memory_usable=m)
         for n, m in (("a", 1200 * MiB), ("b", 900 * MiB), ("c", 4 * GiB))}
    links = {("a", "b"): {"latency_ms": 0.5, "bandwidth_gbps": 0.05},
             ("b", "c"): {"latency_ms": 5, "bandwidth_gbps": 10}}
    return cluster_from_tables(t, links=links)


@pytest.mark.parametrize("objective,streams", [("latency", 1), ("ttft", 1), ("throughput", 4)])
def test_milp_on_a_dag_equals_brute_force(objective, streams):
    c = dag_cluster()
    w = Workload(prompt_tokens=32, context_tokens=128, streams=streams)
    g = build_graph(c, w, sub_blocks=True)
    assert not is_chain(g) and g.number_of_nodes() == 8
    ops = list(g.nodes)
    for devices in (["a", "b"], ["b", "a", "c"]):
        best = float("inf")
        for combo in itertools.product(range(len(devices)), repeat=len(ops)):
            v = evaluate_assignment(g, c, devices, dict(zip(ops, combo)), objective, w)
            if v is not None:
                best = min(best, v)
        r = solve_milp(g, c, devices, objective, w)
        if best == float("inf"):
            assert r.stages is None and r.extra.get("assignment") is None
            continue
        assert r.optimal
        assert r.fun == pytest.approx(best, rel=1e-7)
        assert evaluate_assignment(g, c, devices, r.extra["stage_of"], objective, w) == \
            pytest.approx(best, rel=1e-7)


def test_graph_attributes_and_chain_shape():
    c = dag_cluster()
    w = Workload(prompt_tokens=32, context_tokens=128, streams=2)
    g = build_graph(c, w)
    assert is_chain(g) and list(g.nodes) == ["embed", "layers.0", "layers.1", "layers.2", "head"]
    a = g.nodes["layers.1"]
    t = c.node("b").table
    assert a["decode_s"]["b"] == pytest.approx(t.decode_time(t.row("layers.1"), 128))
    assert a["kv_bytes"] == 128 * 2 * 4096
    assert g.edges["layers.0", "layers.1"]["bytes_per_token"] == 8192
    sg = build_graph(c, w, sub_blocks=True)
    at, ml = sg.nodes["layers.1.attn"], sg.nodes["layers.1.mlp"]
    assert at["estimated"] and at["weight_bytes"] + ml["weight_bytes"] == pytest.approx(300 * MiB)
    assert sg.has_edge("layers.0.mlp", "layers.1.mlp")  # the residual edge


def test_milp_reports_infeasible():
    c = dag_cluster()
    w = Workload(prompt_tokens=32, context_tokens=128)
    g = build_graph(c, w)
    r = solve_milp(g, c, ["b"], "latency", w)  # 3 blocks do not fit 900 MiB
    assert r.stages is None and r.status == 2 and r.optimal
