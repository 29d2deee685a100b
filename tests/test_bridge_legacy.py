"""Legacy exo strategy: fractions round-trip through exo's truncation rule, decisions on mismatch."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costtables import studio_mini_air_tables

from exo_bridge.exo_types import Partition, make_topology
from exo_bridge.exo_legacy.strategy import (
    MeasuredPartitioningStrategy,
    boundary_fraction,
    exo_map,
    exo_map_stages,
    memory_weighted_partitions,
    stages_to_partitions,
)
from graphsplit.plan import Plan, Stage


def random_stages(rng: random.Random, n: int, max_stages: int = 12) -> list[Stage]:
    k = rng.randint(1, min(n, max_stages))
    cuts = sorted(rng.sample(range(1, n), k - 1)) if k > 1 else []
    bounds = [0] + cuts + [n]
    return [Stage(f"node-{i:02d}", bounds[i], bounds[i + 1]) for i in range(k)]


def test_round_trip_every_layer_count_many_random_plans():
    rng = random.Random(20261122)
    for n in range(1, 257):
        for _ in range(40):
            stages = random_stages(rng, n)
            parts = stages_to_partitions(stages, n)
            assert exo_map_stages(parts, n) == stages, (n, stages)
            assert parts[0].start == 0.0 and parts[-1].end == 1.0
            # execution order kept, fractions increasing
            assert [p.node_id for p in parts] == [s.node for s in stages]


def test_round_trip_every_single_boundary():
    """Every boundary b of every n in 1..256, on both sides of the cut."""
    for n in range(1, 257):
        for b in range(1, n):
            stages = [Stage("a", 0, b), Stage("b", b, n)]
            assert exo_map_stages(stages_to_partitions(stages, n), n) == stages
        one_per_layer = [Stage(f"n{i}", i, i + 1) for i in range(n)]
        assert exo_map_stages(stages_to_partitions(one_per_layer, n), n) == one_per_layer


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=256), st.data())
def test_round_trip_hypothesis(n, data):
    k = data.draw(st.integers(min_value=1, max_value=min(n, 16)))
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1))) \
        if k > 1 else []
    bounds = [0] + cuts + [n]
    stages = [Stage(f"d{i}", bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    assert exo_map_stages(stages_to_partitions(stages, n), n) == stages


def test_naive_fractions_would_break():
    """Why the middle of the layer: k/n fractions truncate to k-1 for some n (float error)."""
    bad = []
    for n in range(1, 257):
        for k in range(1, n):
            if int((k / n) * n) != k:
                bad.append((k, n))
    assert bad, "expected float error on some k/n"
    for k, n in bad:
        assert int(boundary_fraction(k, n) * n) == k


def test_exo_map_rules():
    # last forced to n-1; empty dropped
    parts = [Partition("a", 0.0, 0.5), Partition("b", 0.5, 0.5), Partition("c", 0.5, 0.9)]
    assert exo_map(parts, 10) == [("a", 0, 4), ("c", 5, 9)]


def test_memory_weighted_fallback_is_exo_default():
    parts = memory_weighted_partitions([("b", 16384), ("a", 16384), ("c", 65536)])
    assert [p.node_id for p in parts] == ["c", "b", "a"]  # memory desc, then id desc
    assert parts[0].start == 0 and abs(parts[-1].end - 1.0) < 1e-4  # exo rounds to 5 places


def plan3(n=32) -> Plan:
    stages = [Stage("studio", 0, 20), Stage("mini", 20, 28), Stage("air", 28, n)]
    return Plan(model={"name": "llama-3-8b", "n_layers": n, "config_hash": "x"}, stages=stages,
                runtime="exo-legacy",
                nodes={s.node: {"memory_bytes": 16 << 30} for s in stages})


def test_strategy_uses_plan_in_execution_order():
    warnings: list[str] = []
    strat = MeasuredPartitioningStrategy(plan=plan3(), warn=warnings.append)
    topo = make_topology({"air": 8192, "mini": 16384, "studio": 65536})
    parts = strat.partition(topo)
    assert [p.node_id for p in parts] == ["studio", "mini", "air"]
    assert exo_map_stages(parts, 32) == plan3().stages
    assert strat.last_decision.source == "plan" and warnings == []


def test_strategy_node_map():
    strat = MeasuredPartitioningStrategy(plan=plan3(), node_map={"studio": "uuid-1",
                                                                 "mini": "uuid-2",
                                                                 "air": "uuid-3"})
    parts = strat.partition(make_topology({"uuid-3": 1, "uuid-1": 1, "uuid-2": 1}))
    assert [p.node_id for p in parts] == ["uuid-1", "uuid-2", "uuid-3"]


def test_strategy_mismatch_falls_back_with_warning_naming_nodes():
    warnings: list[str] = []
    strat = MeasuredPartitioningStrategy(plan=plan3(), warn=warnings.append)
    topo = make_topology({"studio": 65536, "mini": 16384, "laptop": 8192})
    parts = strat.partition(topo)
    assert strat.last_decision.source == "fallback"
    assert len(warnings) == 1 and "air" in warnings[0] and "laptop" in warnings[0]
    assert [p.node_id for p in parts] == ["studio", "mini", "laptop"]
    strat.partition(topo)  # cached: warned once
    assert len(warnings) == 1


def test_every_node_gets_the_same_answer():
    """Same inputs, any insertion order of the topology: identical partitions."""
    mem = {"studio": 65536, "mini": 16384, "laptop": 16384, "air": 8192}
    answers = set()
    rng = random.Random(1)
    for _ in range(10):
        items = list(mem.items())
        rng.shuffle(items)
        for plan in (plan3(), None):
            strat = MeasuredPartitioningStrategy(plan=plan or plan3(), warn=lambda m: None)
            answers.add(tuple((p.node_id, p.start, p.end)
                              for p in strat.partition(make_topology(dict(items)))))
    assert len(answers) == 1


def test_strategy_needs_input():
    from profiler.errors import UserError

    with pytest.raises(UserError):
        MeasuredPartitioningStrategy()


def test_missing_table_falls_back_naming_nodes():
    tables = studio_mini_air_tables()
    warnings: list[str] = []
    strat = MeasuredPartitioningStrategy(plan=plan3(), tables={"studio": tables["studio"]},
                                         warn=warnings.append)
    strat.partition(make_topology({"studio": 65536, "laptop": 8192}))
    assert strat.last_decision.source == "fallback"
    assert "laptop" in warnings[0] and "no cost table" in warnings[0]


def test_replan_from_tables_when_topology_differs():
    pytest.importorskip("graphsplit.api")
    from graphsplit.api import make_plan
    from graphsplit.cluster import cluster_from_tables
    from graphsplit.costmodel import Workload

    tables = studio_mini_air_tables()
    warnings: list[str] = []
    plan = Plan(model={"name": "toy", "n_layers": 32, "config_hash": "sha256:toy"},
                stages=[Stage("studio", 0, 20), Stage("mini", 20, 32)], runtime="exo-legacy",
                workload={"prompt_tokens": 64, "context_tokens": 128, "streams": 1})
    strat = MeasuredPartitioningStrategy(plan=plan, tables=tables, warn=warnings.append)
    topo = make_topology({"studio": 65536, "mini": 16384, "air": 8192})
    parts = strat.partition(topo)
    d = strat.last_decision
    assert d.source == "replan" and "air" in warnings[0]
    assert exo_map_stages(parts, 32) == d.stages
    # the same answer graphsplit gives directly, on every node
    again = MeasuredPartitioningStrategy(plan=plan, tables=dict(reversed(list(tables.items()))),
                                         warn=lambda m: None)
    assert [(p.node_id, p.start, p.end) for p in again.partition(topo)] == \
        [(p.node_id, p.start, p.end) for p in parts]
    direct = make_plan(cluster_from_tables({k: tables[k] for k in sorted(tables)},
                                           memory={"studio": 48 << 30, "mini": 12 << 30,
                                                   "air": 6 << 30}),
                       objective="latency", workload=Workload(64, 128, 1), runtime="exo-legacy",
                       use_all_nodes=False)
    assert d.stages == list(direct.stages)


def test_replan_from_the_plans_cluster_file_from_another_directory(tmp_path, monkeypatch):
    pytest.importorskip("graphsplit.api")
    from costtables import write_cluster
    from graphsplit.plan import write_plan

    (tmp_path / "made").mkdir()
    write_cluster(tmp_path / "made", studio_mini_air_tables())
    plan = Plan(model={"name": "toy", "n_layers": 32, "config_hash": "sha256:toy"},
                stages=[Stage("studio", 0, 20), Stage("air", 20, 32)], runtime="exo-legacy",
                cluster_file="cluster.json")  # relative, as split-model records it
    path = write_plan(plan, tmp_path / "made" / "plan.json")
    monkeypatch.chdir(tmp_path)
    warnings: list[str] = []
    strat = MeasuredPartitioningStrategy(plan=str(path), warn=warnings.append)
    strat.partition(make_topology({"studio": 65536, "mini": 16384}))
    assert strat.last_decision.source == "replan", warnings
    assert {s.node for s in strat.last_decision.stages} <= {"studio", "mini"}


# -- no partition may truncate to an empty shard -------------------------------------------------


def exo_shards(partitions, n_layers):
    """Oracle written from exo's map_partitions_to_shards (e4238f9), independently of the package:
    inclusive shards (node, start, end) by truncation, the last partition ending at n - 1, empty
    ones left out. exo then takes shards[i] for the i-th partition (Node.get_current_shard)."""
    shards = []
    for i, p in enumerate(partitions):
        first, last = int(p.start * n_layers), int(p.end * n_layers) - 1
        if i == len(partitions) - 1:
            last = n_layers - 1
        if first <= last:
            shards.append((p.node_id, first, last))
    if shards and shards[-1][2] < n_layers - 1:
        shards[-1] = (shards[-1][0], shards[-1][1], n_layers - 1)
    return shards


def assert_positional(parts, n):
    """exo's positional indexing is right only when every partition keeps its own shard."""
    shards = exo_shards(parts, n)
    assert [s[0] for s in shards] == [p.node_id for p in parts], (n, parts, shards)


def test_fallback_never_truncates_to_an_empty_shard():
    """A node with little memory got a fraction under 1/n from exo's own weighting: its shard was
    dropped and every later node took its neighbour's layers. The fallback gives whole layers."""
    strat = MeasuredPartitioningStrategy(plan=plan3(), warn=lambda m: None)
    topo = make_topology({"studio": 65536, "tiny": 512, "air": 256})
    # exo's own weighting drops tiny's shard at 32 layers: air would be handed shards[2]
    assert [s[0] for s in exo_shards(memory_weighted_partitions(
        [("studio", 65536), ("tiny", 512), ("air", 256)]), 32)] == ["studio", "air"]
    parts = strat.partition(topo)
    assert strat.last_decision.source == "fallback"
    assert [p.node_id for p in parts] == ["studio", "tiny", "air"]  # exo's order: memory desc
    for n in range(32, 32 * 8 + 1):
        assert_positional(parts, n)
    assert exo_map_stages(parts, 32) == [Stage("studio", 0, 30), Stage("tiny", 30, 31),
                                         Stage("air", 31, 32)]


def test_fallback_with_more_nodes_than_layers_idles_the_smallest():
    plan = Plan(model={"name": "toy", "n_layers": 3, "config_hash": "x"},
                stages=[Stage("a", 0, 3)], runtime="exo-legacy")
    warnings: list[str] = []
    strat = MeasuredPartitioningStrategy(plan=plan, warn=warnings.append)
    parts = strat.partition(make_topology({"b": 4, "c": 3, "d": 2, "e": 1}))
    assert [p.node_id for p in parts] == ["b", "c", "d"]
    assert_positional(parts, 3)
    assert "e run no layers" in warnings[0]


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=160), st.data())
def test_no_empty_shard_for_the_plans_layer_count_or_more(n, data):
    """Plan and fallback answers: one shard per partition for n and every larger layer count."""
    k = data.draw(st.integers(min_value=1, max_value=min(n, 12)))
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1))) \
        if k > 1 else []
    bounds = [0] + cuts + [n]
    stages = [Stage(f"d{i}", bounds[i], bounds[i + 1]) for i in range(k)]
    plan = Plan(model={"name": "toy", "n_layers": n, "config_hash": "x"}, stages=stages,
                runtime="exo-legacy")
    strat = MeasuredPartitioningStrategy(plan=plan, warn=lambda m: None)
    same = strat.partition(make_topology({s.node: 1024 for s in stages}))
    mems = data.draw(st.lists(st.integers(1, 2 ** 19), min_size=1, max_size=12))
    other = strat.partition(make_topology({f"x{i}": m for i, m in enumerate(mems)}))
    assert strat.last_decision.source == "fallback"
    assert exo_map_stages(same, n) == stages
    for m in sorted({n, n + 1, 2 * n + 1, 3 * n, 1024, data.draw(st.integers(n, 4 * n))}):
        assert_positional(same, m)
        assert_positional(other, m)


def test_smaller_models_cannot_be_promised():
    """Why the guarantee starts at the plan's layer count: [0,1) + [1,n) needs its boundary
    below 2/n, and n/2 layers need it at 2/n or above."""
    parts = stages_to_partitions([Stage("a", 0, 1), Stage("b", 1, 32)], 32)
    assert_positional(parts, 32)
    assert len(exo_shards(parts, 16)) == 1
