"""Replicas (graphsplit.replicas): k independent pipelines sharing the streams. The exact
search against brute force over every set partition, every stream share and every plan; a case
where replicas win and one where they cannot; the bound mode; the plan."""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest

from costtables import GiB, MiB, make_table
from graphsplit.api import make_throughput_plan
from graphsplit.batching import EXO_MAX_CONCURRENT_REQUESTS
from graphsplit.brute import all_plans
from graphsplit.cluster import cluster_from_tables
from graphsplit.costmodel import Workload, objective_value, predict
from graphsplit.plan import PlanError, plan_from_dict, read_plan, write_plan
from graphsplit.replicas import (_Bounds, node_classes, set_partitions, solve_replicas,
                                 subcluster)
from test_split_batching import GRID, batched

BELL = [1, 1, 2, 5, 15, 52, 203]


def test_set_partitions_are_the_bell_numbers():
    for n in range(1, 7):
        parts = list(set_partitions([str(i) for i in range(n)]))
        assert len(parts) == BELL[n]
        canon = {tuple(sorted(tuple(sorted(b)) for b in p)) for p in parts}
        assert len(canon) == BELL[n]  # all distinct
        assert all(sorted(x for b in p for x in b) == [str(i) for i in range(n)] for p in parts)


def _brute_one(cluster, ids, b, runtime):
    """Best throughput of one pipeline on nodes `ids` for b streams: every plan x batch."""
    sub = subcluster(cluster, ids)
    ms = range(1, b + 1) if runtime == "mlx-pipeline" else \
        [min(b, EXO_MAX_CONCURRENT_REQUESTS)] if runtime == "exo-current" else [1]
    best = 0.0
    for m in ms:
        wl = Workload(streams=b, batch=m)
        for st in all_plans(sub.ids, sub.n_layers):
            pr = predict(sub, st, wl, runtime)
            if pr.fits:
                best = max(best, 1 / objective_value(pr, "throughput", wl))
    return best


def brute_replicas(cluster, B, runtime, k=None, one=None):
    """Every set partition of the nodes x every share of the B streams x every plan (`one`:
    a memo of _brute_one by (block, b), filled in)."""
    best = 0.0
    ids = sorted(cluster.ids)
    one = {} if one is None else one
    for part in set_partitions(ids):
        if k is not None and len(part) != k:
            continue
        for shares in itertools.product(range(B + 1), repeat=len(part)):
            if sum(shares) != B or (k is not None and 0 in shares):
                continue
            tot = 0.0
            for blk, b in zip(part, shares):
                if b:
                    key = (tuple(blk), b)
                    if key not in one:
                        one[key] = _brute_one(cluster, blk, b, runtime)
                    if one[key] == 0.0:
                        tot = -math.inf
                    tot += one[key]
            best = max(best, tot)
    return best


def _three(mem_b=2 * GiB):
    tables = {"a": batched(make_table("a", 4, embed_decode_s=0.0), (10, 10.5, 11.5, 13.5),
                           (2, 2.2, 2.6, 3.4)),
              "b": batched(make_table("b", 4, embed_decode_s=0.0, memory_usable=mem_b),
                           (6, 9, 15, 27), (1, 1.5, 2.5, 4.5)),
              "c": batched(make_table("c", 4, embed_decode_s=0.0), (14, 14.2, 14.6, 15.4),
                           (3, 3.1, 3.3, 3.7))}
    return cluster_from_tables(tables, links={("a", "b"): {"latency_ms": 0.5,
                                                            "bandwidth_gbps": 1.0}},
                               default_link={"latency_ms": 2.0, "bandwidth_gbps": 0.1})


@pytest.mark.parametrize("runtime, B", [("mlx-pipeline", 4), ("exo-current", 4),
                                        ("exo-legacy", 3), ("exo-current", 10)])
def test_replica_search_equals_brute_force(runtime, B):
    c = _three()
    rr = solve_replicas(c, Workload(streams=B), runtime)
    assert rr.throughput_tps == pytest.approx(brute_replicas(c, B, runtime), rel=1e-9)
    assert rr.result.proven == "optimal-all-orders-subsets" and rr.result.gap == 0.0
    assert sum(r.streams for r in rr.replicas) == B
    nodes = [s.node for r in rr.replicas for s in r.stages]
    assert len(nodes) == len(set(nodes))  # every node in at most one replica
    for r in rr.replicas:  # each replica's prediction is the reference model's
        assert r.prediction.throughput_tps == pytest.approx(
            predict(c, r.stages, r.workload, runtime).throughput_tps)


def test_fixed_replica_count_equals_brute_force():
    c = _three()
    rr = solve_replicas(c, Workload(streams=4), "mlx-pipeline", replicas=2)
    assert len(rr.replicas) == 2
    assert rr.throughput_tps == pytest.approx(brute_replicas(c, 4, "mlx-pipeline", k=2),
                                              rel=1e-9)


def _pair(memory):
    """Two identical nodes; a batch of 8 costs little more than one stream (memory-bound)."""
    tables = {n: batched(make_table(n, 4, embed_decode_s=0.0, memory_usable=memory,
                                    weight_bytes=256 * MiB, embed_bytes=64 * MiB,
                                    head_bytes=64 * MiB, kv_bytes_per_token=1024),
                         (10, 10.2, 10.6, 11.4), (2, 2.1, 2.3, 2.7)) for n in ("a", "b")}
    return cluster_from_tables(tables, default_link={"latency_ms": 1.0, "bandwidth_gbps": 10})


def test_replicas_beat_one_pipeline_when_the_batch_cap_binds():
    """exo-current with 16 streams: one pipeline decodes 8 at a time (its cap); two replicas,
    each holding the whole model, decode 8 each: twice the throughput."""
    c = _pair(16 * GiB)
    one = make_throughput_plan(c, Workload(streams=16), "exo-current")
    two = make_throughput_plan(c, Workload(streams=16), "exo-current", replicas=None)
    assert len(two.replicas) == 2 and [r["streams"] for r in two.replicas] == [8, 8]
    assert two.predicted["throughput_tps"] == pytest.approx(2 * one.predicted["throughput_tps"])
    assert {s["node"] for r in two.replicas for s in r["stages"]} == {"a", "b"}
    assert two.stages == [type(two.stages[0])(**s) for s in two.replicas[0]["stages"]]
    assert "2 replica(s) serving 8, 8" in two.solver["message"]


def test_replicas_do_not_help_when_no_node_holds_the_model():
    """Each node holds about half the model: only a pipeline over both fits, k = 1."""
    c = _pair(1 * GiB)
    rr = solve_replicas(c, Workload(streams=16), "exo-current")
    assert len(rr.replicas) == 1 and len(rr.replicas[0].stages) == 2
    plan = make_throughput_plan(c, Workload(streams=16), "exo-current", replicas=None)
    assert plan.replicas is None and plan.serving["micro_batch"] == 8


def test_symmetric_nodes_share_a_class():
    c = _pair(16 * GiB)
    assert node_classes(c) == {"a": 0, "b": 0}  # the hosts' names differ, nothing else
    c3 = cluster_from_tables({n: make_table(n, 4) for n in "abc"},
                             links={("a", "c"): {"latency_ms": 5, "bandwidth_gbps": 1}})
    cls = node_classes(c3)
    assert cls["a"] != cls["b"] and cls["b"] != cls["c"]  # a and c see b differently


def test_bound_mode_states_a_valid_bound():
    """Past the exact search's size: the best speed-ordered partition with an upper bound on
    throughput that the exact optimum respects."""
    c = _three()
    wl = Workload(streams=4)
    exact = solve_replicas(c, wl, "mlx-pipeline")
    bound = solve_replicas(c, wl, "mlx-pipeline", max_work=1)
    r = bound.result
    assert r.proven == "bound" and not r.optimal and r.lower_bound is not None
    assert r.lower_bound <= exact.result.fun <= r.fun
    assert r.gap == pytest.approx((r.fun - r.lower_bound) / r.fun)
    assert "bound" in r.message


def test_replica_plan_round_trip_and_validation(tmp_path):
    c = _pair(16 * GiB)
    plan = make_throughput_plan(c, Workload(streams=16), "exo-current", replicas=2)
    path = write_plan(plan, tmp_path / "p.json")
    back = read_plan(path)
    assert back.replicas == plan.replicas and back.serving == plan.serving
    d = copy.deepcopy(plan.to_dict())
    d["replicas"][1]["stages"][0]["node"] = d["replicas"][0]["stages"][0]["node"]
    with pytest.raises(PlanError, match="also in replicas"):
        plan_from_dict(d, "p.json")
    d = copy.deepcopy(plan.to_dict())
    d["replicas"][1]["streams"] = 3
    with pytest.raises(PlanError, match="must add up"):
        plan_from_dict(d, "p.json")


def test_symmetry_reduction_keeps_brute_force_equality():
    """Two interchangeable nodes beside an unlike one: the search solves each node set up to
    symmetry and maps its plan onto the actual members; still the brute-force optimum."""
    pair = _pair(1 * GiB)
    odd = batched(make_table("c", 4, embed_decode_s=0.0, memory_usable=16 * GiB,
                             weight_bytes=256 * MiB, embed_bytes=64 * MiB, head_bytes=64 * MiB,
                             kv_bytes_per_token=1024), (7, 9, 13, 21), (1, 1.5, 2.5, 4.5))
    c = cluster_from_tables({"a": pair.node("a").table, "b": pair.node("b").table, "c": odd},
                            memory={"a": 1 * GiB, "b": 1 * GiB},
                            default_link={"latency_ms": 1.0, "bandwidth_gbps": 10})
    cls = node_classes(c)
    assert cls["a"] == cls["b"] != cls["c"]
    for runtime in ("mlx-pipeline", "exo-current"):
        rr = solve_replicas(c, Workload(streams=4), runtime)
        assert rr.throughput_tps == pytest.approx(brute_replicas(c, 4, runtime), rel=1e-9)
        for r in rr.replicas:
            assert predict(c, r.stages, r.workload, runtime).fits


def test_same_replicas_whatever_the_node_order():
    c = _three()
    rev = cluster_from_tables({n.id: n.table for n in reversed(c.nodes)},
                              links=c.links, default_link=c.default_link,
                              memory={n.id: n.memory_bytes for n in c.nodes})
    a = solve_replicas(c, Workload(streams=4), "exo-current")
    b = solve_replicas(rev, Workload(streams=4), "exo-current")
    assert [(r.stages, r.streams) for r in a.replicas] == [(r.stages, r.streams)
                                                          for r in b.replicas]


def _random_four(seed: int):
    """Four unlike nodes of a 4-block model (800 MiB of weights with embedding and head): random
    speeds, batch slopes and links; memory 0.45-1.3 x 1200 MiB, the KV of 32 streams (4 KiB
    per token per block at context 1024: 512 MiB) making memory bind as streams grow."""
    rng = random.Random(seed)
    tables = {}
    for n in "abcd":
        base, slope = rng.uniform(5, 20), rng.uniform(0.02, 0.5)
        grid = tuple(base * (1 + slope * (b - 1)) for b in GRID)
        tables[n] = batched(make_table(n, 4, embed_decode_s=0.0,
                                       memory_usable=int(rng.uniform(0.45, 1.3) * 1200 * MiB)),
                            grid, tuple(x / 5 for x in grid))
    links = {(u, v): {"latency_ms": rng.uniform(0.1, 3), "bandwidth_gbps": rng.uniform(0.5, 20)}
             for u in "abcd" for v in "abcd" if u != v}
    return cluster_from_tables(tables, links=links)


def _check_real(c, rr, runtime):
    """The plan is real: disjoint nodes, every replica fits, its prediction is the reference
    model's, and the reported objective is 1 / their sum."""
    nodes = [s.node for r in rr.replicas for s in r.stages]
    assert len(nodes) == len(set(nodes))
    total = 0.0
    for r in rr.replicas:
        p = predict(c, r.stages, r.workload, runtime)
        assert p.fits and p.throughput_tps == pytest.approx(r.prediction.throughput_tps)
        total += p.throughput_tps
    assert rr.result.fun == pytest.approx(1 / total, rel=1e-12)


@pytest.mark.parametrize("runtime, B, seed", [("exo-current", 32, 1), ("exo-legacy", 32, 2),
                                              ("mlx-pipeline", 14, 3)])
def test_four_nodes_many_streams_exact_and_equal_to_brute_force(runtime, B, seed):
    """4 unlike nodes (15 node sets) with B streams: 15 x B inner solves exceeded the old exact
    search's 200 and fell back to the bound mode; the best-first search solves only the
    (set, streams) it needs and proves the optimum, equal to every partition x share x plan
    (here 2-3 replicas of different sizes). Every per-set bound is checked against the brute
    force f(A, b) on the way."""
    c = _random_four(seed)
    rr = solve_replicas(c, Workload(streams=B), runtime)
    assert rr.result.proven == "optimal-all-orders-subsets" and rr.result.gap == 0.0
    one = {}
    assert rr.throughput_tps == pytest.approx(brute_replicas(c, B, runtime, one=one), rel=1e-9)
    _check_real(c, rr, runtime)
    assert len(rr.replicas) > 1
    assert rr.result.nit < 15 * B  # fewer inner solves than every (set, streams)
    bounds = _Bounds(c, Workload(streams=B), runtime, None)
    for (blk, b), f in one.items():
        assert max((x for _, x in bounds.per_batch(list(blk), b)), default=0.0) >= \
            f * (1 - 1e-9), (blk, b)


@pytest.mark.parametrize("seed", range(4))
def test_bound_mode_bound_holds_on_random_clusters(seed):
    """Stopped early (a work budget of 1), the plan is real and the stated bound is at least
    the exact optimum's throughput, on random 4-node clusters under each runtime."""
    c = _random_four(10 + seed)
    runtime = ("mlx-pipeline", "exo-current", "exo-legacy", "exo-current")[seed]
    wl = Workload(streams=(6, 12, 9, 20)[seed])
    exact = solve_replicas(c, wl, runtime)
    assert exact.result.proven == "optimal-all-orders-subsets"
    early = solve_replicas(c, wl, runtime, max_work=1)
    _check_real(c, early, runtime)
    r = early.result
    assert r.proven == "bound" and r.lower_bound <= exact.result.fun * (1 + 1e-9)
    assert early.throughput_tps <= exact.throughput_tps * (1 + 1e-9)
    assert r.gap == pytest.approx((r.fun - r.lower_bound) / r.fun)
