"""Every solver equals the brute-force oracle on the scenarios; answers are deterministic."""

import random

import pytest

from costtables import GiB, MiB, make_table
from graphsplit.brute import brute_force
from graphsplit.cluster import cluster_from_tables
from graphsplit.costmodel import Workload, objective_value, predict
from graphsplit.plan import Stage
from graphsplit.solve_dp import solve_bitmask, solve_fixed_order

L = 6


def scenario(name):
    fast = dict(memory_usable=8 * GiB)
    links = {}
    if name == "homogeneous":
        t = {n: make_table(n, L, decode_s=0.01, **fast) for n in ("a", "b", "c")}
    elif name == "slow-node":
        t = {n: make_table(n, L, decode_s=0.01, memory_usable=1 * GiB) for n in ("a", "c")}
        t["b"] = make_table("b", L, decode_s=0.03, memory_usable=1 * GiB)
    elif name == "slow-link":
        t = {n: make_table(n, L, decode_s=0.01, memory_usable=1 * GiB) for n in ("a", "b", "c")}
        links = {(x, y): {"latency_ms": 0.1, "bandwidth_gbps": 40}
                 for x in t for y in t if x != y}
        links[("a", "b")] = {"latency_ms": 30, "bandwidth_gbps": 0.01}
        links[("b", "a")] = {"latency_ms": 30, "bandwidth_gbps": 0.01}
    elif name == "too-small":
        t = {n: make_table(n, L, decode_s=0.01, memory_usable=1 * GiB) for n in ("a", "b")}
        t["tiny"] = make_table("tiny", L, decode_s=0.001, memory_usable=300 * MiB)
    elif name == "big-fast":
        t = {n: make_table(n, L, decode_s=0.02, memory_usable=1 * GiB) for n in ("a", "b", "c")}
        t["big"] = make_table("big", L, decode_s=0.005, memory_usable=64 * GiB)
    elif name == "many":
        rnd = random.Random(7)
        wb = [rnd.randint(60, 140) * MiB for _ in range(L)]  # one model: the same bytes everywhere
        t = {f"n{i}": make_table(f"n{i}", L,
                                 decode_s=[rnd.uniform(0.005, 0.03) for _ in range(L)],
                                 weight_bytes=wb,
                                 memory_usable=rnd.randint(700, 1400) * MiB) for i in range(5)}
        links = {(x, y): {"latency_ms": rnd.uniform(0.1, 5), "bandwidth_gbps": rnd.uniform(0.5, 20)}
                 for x in t for y in t if x != y and rnd.random() < 0.6}
    else:
        raise KeyError(name)
    return cluster_from_tables(t, links=links, default_link={"latency_ms": 1.0,
                                                             "bandwidth_gbps": 10.0})


SCENARIOS = ["homogeneous", "slow-node", "slow-link", "too-small", "big-fast", "many"]
CASES = [("latency", 1), ("ttft", 1), ("throughput", 1), ("throughput", 8)]
RUNTIMES = ["exo-current", "exo-legacy", "mlx-pipeline"]


def same(a, b):
    assert (a.stages is None) == (b.stages is None), (a, b)
    if a.stages is not None:
        assert a.fun == pytest.approx(b.fun, rel=1e-9, abs=1e-15), (a.stages, b.stages)


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("use_all", [False, True])
def test_dp_solvers_equal_brute_force(name, use_all):
    c = scenario(name)
    for i, (obj, B) in enumerate(CASES):
        rt = RUNTIMES[i % 3]
        w = Workload(prompt_tokens=64, context_tokens=256, streams=B)
        ref = brute_force(c, obj, w, rt, use_all)
        res = solve_bitmask(c, obj, w, rt, use_all)
        same(res, ref)
        assert res.optimal
        if res.stages is not None:  # the solver's value is the reference model's value
            assert objective_value(predict(c, res.stages, w, rt), obj, w) == pytest.approx(res.fun)
        same(solve_fixed_order(c, obj, w, rt, use_all),
             brute_force(c, obj, w, rt, use_all, fixed_order=True))


@pytest.mark.parametrize("name", ["slow-node", "many"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_pareto_frontier_equals_brute_force(name, runtime):
    c = scenario(name)
    w = Workload(prompt_tokens=64, context_tokens=256, streams=4)
    a = solve_bitmask(c, "pareto", w, runtime)
    b = brute_force(c, "pareto", w, runtime)
    fa = [(p["tpot_s"], p["bottleneck_s"]) for p in a.extra["frontier"]]
    fb = [(p["tpot_s"], p["bottleneck_s"]) for p in b.extra["frontier"]]
    # exo-current: the all-gather makes the bottleneck the whole step, one point
    assert len(fa) == len(fb) and len(fa) >= (1 if runtime == "exo-current" else 2)
    for x, y in zip(fa, fb):
        assert x == pytest.approx(y, rel=1e-9)


def test_big_fast_node_takes_everything_for_latency():
    c = scenario("big-fast")
    r = solve_bitmask(c, "latency", Workload(context_tokens=256))
    assert r.stages == [Stage("big", 0, L)]
    r = solve_bitmask(c, "latency", Workload(context_tokens=256), use_all_nodes=True)
    assert len(r.stages) == 4


def test_too_small_node_is_skipped_and_infeasible_when_forced():
    c = scenario("too-small")
    r = solve_bitmask(c, "throughput", Workload(context_tokens=256, streams=8))
    assert "tiny" not in {s.node for s in r.stages}
    r = solve_bitmask(c, "latency", Workload(context_tokens=256), use_all_nodes=True)
    assert r.stages is None and r.status == 2


def test_slow_link_is_avoided():
    c = scenario("slow-link")
    r = solve_bitmask(c, "throughput", Workload(context_tokens=256, streams=8))
    nodes = [s.node for s in r.stages]
    ring = list(zip(nodes, nodes[1:] + nodes[:1]))
    assert ("a", "b") not in ring and ("b", "a") not in ring


def test_ties_broken_by_node_id():
    c = scenario("homogeneous")
    r = solve_bitmask(c, "latency", Workload(context_tokens=256))
    assert r.stages == [Stage("a", 0, L)]


def test_node_order_does_not_change_the_plan():
    c = scenario("many")
    w = Workload(context_tokens=256, streams=4)
    base = [solve_bitmask(c, o, w).stages for o in ("latency", "throughput")]
    for seed in range(3):
        nodes = list(c.nodes)
        random.Random(seed).shuffle(nodes)
        c2 = cluster_from_tables({n.id: n.table for n in nodes},
                                 links={k: v for k, v in c.links.items()},
                                 default_link=c.default_link)
        assert [solve_bitmask(c2, o, w).stages for o in ("latency", "throughput")] == base


def test_randomised_small_clusters_equal_brute_force():
    rnd = random.Random(3)
    for _ in range(12):
        n_layers, D = rnd.randint(2, 6), rnd.randint(1, 4)
        wb = [rnd.randint(50, 150) * MiB for _ in range(n_layers)]
        t = {f"n{i}": make_table(f"n{i}", n_layers,
                                 decode_s=[rnd.uniform(0.005, 0.05) for _ in range(n_layers)],
                                 weight_bytes=wb,
                                 memory_usable=rnd.randint(600, 1500) * MiB) for i in range(D)}
        links = {(a, b): {"latency_ms": rnd.uniform(0, 20), "bandwidth_gbps": rnd.uniform(0.1, 10)}
                 for a in t for b in t if a != b and rnd.random() < 0.5}
        c = cluster_from_tables(t, links=links)
        rt = rnd.choice(RUNTIMES)
        w = Workload(prompt_tokens=rnd.choice([16, 100]), context_tokens=256,
                     streams=rnd.choice([1, 2, 16]))
        for obj in ("latency", "ttft", "throughput"):
            same(solve_bitmask(c, obj, w, rt), brute_force(c, obj, w, rt))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_runtime_protocol_equals_brute_force(runtime):
    """Unequal LM-head times (exo-current's pace term binds on some plans) and a measured
    exo-legacy per-message overhead: both DP solvers equal brute force on every objective."""
    rnd = random.Random(11)
    for _ in range(5):
        n_layers, D = rnd.randint(3, 6), rnd.randint(2, 4)
        wb = [rnd.randint(50, 150) * MiB for _ in range(n_layers)]
        t = {f"n{i}": make_table(f"n{i}", n_layers,
                                 decode_s=[rnd.uniform(0.005, 0.05) for _ in range(n_layers)],
                                 head_decode_s=rnd.uniform(0.001, 0.08), weight_bytes=wb,
                                 memory_usable=rnd.randint(500, 1500) * MiB) for i in range(D)}
        links = {(a, b): {"latency_ms": rnd.uniform(0, 20), "bandwidth_gbps": rnd.uniform(0.1, 10)}
                 for a in t for b in t if a != b and rnd.random() < 0.7}
        c = cluster_from_tables(t, links=links)
        c.runtimes = {"exo-legacy": {"message_overhead_ms": rnd.uniform(0, 3)}}
        w = Workload(prompt_tokens=rnd.choice([16, 100]), context_tokens=256,
                     streams=rnd.choice([1, 4]))
        for obj in ("latency", "ttft", "throughput"):
            ref = brute_force(c, obj, w, runtime)
            res = solve_bitmask(c, obj, w, runtime)
            same(res, ref)
            if res.stages is not None:
                assert objective_value(predict(c, res.stages, w, runtime), obj, w) == \
                    pytest.approx(res.fun, rel=1e-9)
            same(solve_fixed_order(c, obj, w, runtime),
                 brute_force(c, obj, w, runtime, fixed_order=True))
