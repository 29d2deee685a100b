"""Hybrid plans (graphsplit.hybrid): tensor-parallel stages priced from constructed cost tables
with a `tensor_parallel` section (INTERFACES I2) and a cluster's measured collectives (I3);
the exact search against brute force; solver labels; plan validation; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from costtables import GiB, MiB, make_table, write_cluster
from graphsplit.api import solve
from graphsplit.baselines import exo_current_tensor_stages
from graphsplit.cluster import Collective, cluster_from_tables, load_cluster
from graphsplit.costmodel import Workload, objective_value, predict
from graphsplit.hybrid.brute import brute_force_hybrid
from graphsplit.hybrid.search import solve_hybrid
from graphsplit.hybrid.shares import compositions, mlp_columns, tensor_stage
from graphsplit.plan import PlanError, Stage, TensorSpec, plan_from_dict, read_plan
from profiler.errors import UserError

BASE = {"a": 0.01, "b": 0.02, "c": 0.04, "d": 0.03}  # whole-block decode seconds


def tp_section(table, n_kv: int = 4, grid=(1, 2, 4), fixed: float = 0.001) -> dict:
    """One rank at k KV heads: whole block time x k / n + `fixed` (measured at `grid`; other
    shares interpolate exactly, being linear in k); bytes in proportion to k / n."""
    rows = []
    for b in table.blocks():
        for k in grid:
            rows.append({"measured_from": b.name, "layers": [b.layer], "kv_heads": k,
                         "mlp_columns": 64 * k,
                         "weight_bytes": b.weight_bytes * k // n_kv,
                         "kv_bytes_per_token": b.kv_bytes_per_token * k // n_kv,
                         "prefill_s": [x * k / n_kv + fixed for x in b.prefill_s],
                         "prefill_spread": [0.0] * len(b.prefill_s),
                         "decode_s": [x * k / n_kv + fixed for x in b.decode_s],
                         "decode_spread": [0.0] * len(b.decode_s)})
    table.model.num_key_value_heads, table.model.intermediate_size = n_kv, 64 * n_kv
    table.tensor_parallel = {"version": 1, "unit": "kv_head", "n_kv_heads": n_kv, "q_per_kv": 2,
                             "grid_kv_heads": list(grid), "allreduces_per_block": 2,
                             "allreduce_bytes_per_token": 8192, "rows": rows}
    return table


def tables(speeds, L=2, mem=16 * GiB, n_kv=4):
    return {n: tp_section(make_table(n, L, decode_s=s, memory_usable=mem, context_slope=0.0),
                          n_kv) for n, s in speeds.items()}


def collective(group, t8k=0.0005, t64k=0.001):
    g = tuple(sorted(group))
    return Collective(g, "all_sum", (8192.0, 65536.0), (t8k, t64k), 0.0004, 1e9)


def cluster(speeds, groups=(("a", "b"),), L=2, mem=16 * GiB, links=None, n_kv=4, **kw):
    c = cluster_from_tables(tables(speeds, L, mem, n_kv), links=links or {},
                            default_link={"latency_ms": 0.5, "bandwidth_gbps": 10})
    for g in groups:
        c.collectives[(tuple(sorted(g)), "all_sum")] = collective(g, **kw)
    return c


W = Workload(prompt_tokens=64, context_tokens=128, streams=1)


# ------------------------------------------------------------------ the cost model, by hand


def test_unequal_shares_tpot_and_memory_by_hand():
    c = cluster({"a": 0.01, "b": 0.02})
    st = [tensor_stage(["a", "b"], [3, 1], 0, 2, 256)]
    p = predict(c, st, W, "mlx-pipeline")
    # per block the slowest member: a at 3 heads 0.01 * 3/4 + 0.001 = 0.0085 (interpolated
    # between the measured 2 and 4), b at 1 head 0.02 / 4 + 0.001 = 0.006
    blocks = 2 * 0.0085
    ar = 2 * 2 * 0.0005  # 2 all-reduces per block of 8192 bytes: the measured 0.5 ms
    link = lambda n: 0.0005 + n / 1.25e9  # the default link: 0.5 ms, 10 Gbit/s
    entry = link(8192)  # the activation forwarded a -> b
    embed, head = 0.001, 0.002  # a embeds, b (the last member) runs the head
    closure = link(4)  # b sends the token id back to a
    assert p.tpot_s == pytest.approx(blocks + ar + entry + embed + head + closure, rel=1e-12)
    assert p.tensor["a"]["allreduce_s"] == pytest.approx(ar)
    assert p.tensor["a"]["derived_shares"] is True
    assert p.derived_shares is True
    kv = W.kv_tokens * 4096 * 3 // 4 * 2  # a: 3 of 4 KV heads of 2 blocks
    assert p.stage_memory_bytes["a"] == 2 * (100 * MiB * 3 // 4) + kv + 8 * MiB + 400 * MiB
    assert p.stage_memory_bytes["b"] == 2 * (100 * MiB // 4) + kv // 3 + 8 * MiB + 400 * MiB


def test_exo_current_tensor_instance_by_hand():
    c = cluster({"a": 0.01, "b": 0.02})
    st = [tensor_stage(["a", "b"], [2, 2], 0, 2, 256)]
    p = predict(c, st, W, "exo-current")
    # every rank all layers: per block max(0.006, 0.011); every rank embeds and runs the head
    # (the slowest sets the pace); no chain, no hop, no closure
    assert p.tpot_s == pytest.approx(2 * 0.011 + 4 * 0.0005 + 0.001 + 0.002, rel=1e-12)
    assert p.head_pace_s == pytest.approx(0.002) and p.bottleneck_s == p.tpot_s
    assert p.tensor["a"]["derived_shares"] is False  # 2 heads is a measured share


def test_hybrid_two_stage_hop_goes_from_the_groups_last_member():
    links = {("b", "c"): {"latency_ms": 3.0, "bandwidth_gbps": 10},
             ("a", "c"): {"latency_ms": 0.1, "bandwidth_gbps": 10}}
    c = cluster({"a": 0.01, "b": 0.02, "c": 0.04}, links=links)
    ab = predict(c, [tensor_stage(["a", "b"], [2, 2], 0, 1, 256), Stage("c", 1, 2)], W,
                 "mlx-pipeline")
    ba = predict(c, [tensor_stage(["b", "a"], [2, 2], 0, 1, 256), Stage("c", 1, 2)], W,
                 "mlx-pipeline")
    assert ab.stage_link_s["a"] == pytest.approx(0.003 + 8192 / 1.25e9)  # b -> c
    assert ba.stage_link_s["b"] == pytest.approx(0.0001 + 8192 / 1.25e9)  # a -> c


def test_collective_time_piecewise_and_beyond():
    col = collective(("a", "b"))
    assert col.time(100) == 0.0005  # below the smallest size: its time
    assert col.time((8192 + 65536) / 2) == pytest.approx(0.00075)
    assert col.time(65536 + 1e9) == pytest.approx(0.001 + 1.0)  # + extra bytes / bandwidth


# ------------------------------------------------------------------ what a runtime can run


@pytest.mark.parametrize("runtime, stages, words", [
    ("exo-legacy", [tensor_stage(["a", "b"], [2, 2], 0, 2, 256)], "legacy exo has no tensor"),
    ("exo-current", [tensor_stage(["a", "b"], [3, 1], 0, 2, 256)], "unequal shares"),
    ("exo-current", [tensor_stage(["a", "b"], [2, 2], 0, 1, 256), Stage("c", 1, 2)],
     "inside a pipeline"),
    ("exo-current", [tensor_stage(["a", "b", "c"], [2, 1, 1], 0, 2, 256)], "unequal"),
])
def test_runtime_refuses_in_one_line_and_names_exo_bridge_run(runtime, stages, words):
    c = cluster({"a": 0.01, "b": 0.02, "c": 0.04}, groups=[("a", "b"), ("a", "b", "c")])
    with pytest.raises(UserError) as e:
        predict(c, stages, W, runtime)
    msg = str(e.value)
    assert words in msg and "exo-bridge run" in msg and "\n" not in msg


def test_three_equal_ranks_on_six_heads_but_odd_hidden_is_refused_for_exo():
    c = cluster({"a": 0.01, "b": 0.02, "c": 0.04}, groups=[("a", "b", "c")], n_kv=6)
    for t in c.nodes:
        t.table.model.hidden_size = 4096  # not divisible by 3
    with pytest.raises(UserError, match="hidden size 4096 does not divide by 3"):
        predict(c, [tensor_stage(["a", "b", "c"], [2, 2, 2], 0, 2, 384)], W, "exo-current")
    # ours runs it
    assert predict(c, [tensor_stage(["a", "b", "c"], [2, 2, 2], 0, 2, 384)], W,
                   "mlx-pipeline").tpot_s > 0


def test_unmeasured_group_names_the_group_and_the_command():
    c = cluster({"a": 0.01, "b": 0.02, "c": 0.04})
    with pytest.raises(UserError) as e:
        predict(c, [tensor_stage(["a", "c"], [2, 2], 0, 2, 256)], W, "mlx-pipeline")
    assert "group a+c" in str(e.value) and "`profile-link collective --nodes a,c" in str(e.value)


def test_table_without_tensor_section_says_reprofile():
    c = cluster({"a": 0.01, "b": 0.02})
    del c.node("b").table.tensor_parallel
    with pytest.raises(UserError, match="node b: .*no tensor_parallel section.*profile-model"):
        predict(c, [tensor_stage(["a", "b"], [2, 2], 0, 2, 256)], W, "mlx-pipeline")


# ------------------------------------------------------------------ shares and plans


def test_compositions_and_columns():
    assert sorted(compositions(4, 2)) == [(1, 3), (2, 2), (3, 1)]
    assert len(list(compositions(8, 3))) == 21  # C(7, 2)
    assert mlp_columns(14336, [6, 2]) == (10752, 3584)
    assert sum(mlp_columns(14336, [1, 1, 1])) == 14336


def _plan(tensor, kv=4, stages=None):
    return {"format": "mlx-split/plan", "version": 1,
            "model": {"name": "toy", "n_layers": 2, "n_kv_heads": kv, "intermediate_size": 256},
            "stages": stages or [{"node": "a", "start_layer": 0, "end_layer": 2,
                                  "tensor": tensor}]}


@pytest.mark.parametrize("tensor, words", [
    ({"nodes": ["a", "b"], "kv_heads": [3, 2], "mlp_columns": [128, 128]}, "sums to 5"),
    ({"nodes": ["a", "b"], "kv_heads": [4, 0], "mlp_columns": [128, 128]}, ">= 1"),
    ({"nodes": ["a", "a"], "kv_heads": [2, 2], "mlp_columns": [128, 128]}, "twice"),
    ({"nodes": ["b", "a"], "kv_heads": [2, 2], "mlp_columns": [128, 128]}, "first member"),
    ({"nodes": ["a", "b", "c", "d", "e"], "kv_heads": [1, 1, 1, 1, 1],
      "mlp_columns": [50, 50, 50, 50, 56]}, "5 ranks cannot share 4 heads"),
    ({"nodes": ["a", "b"], "kv_heads": [2, 2], "mlp_columns": [100, 100]}, "MLP columns"),
    ({"nodes": ["a", "b"], "kv_heads": [2, 2]}, "mlp_columns"),
])
def test_plan_validation_of_tensor_stages(tensor, words):
    with pytest.raises(PlanError) as e:
        plan_from_dict(_plan(tensor), "plan p.json")
    assert words in str(e.value) and str(e.value).startswith("plan p.json")


def test_plan_tensor_member_in_two_stages_and_missing_kv():
    st = [{"node": "a", "start_layer": 0, "end_layer": 1,
           "tensor": {"nodes": ["a", "b"], "kv_heads": [2, 2], "mlp_columns": [128, 128]}},
          {"node": "b", "start_layer": 1, "end_layer": 2}]
    with pytest.raises(PlanError, match="'b' appears in two stages"):
        plan_from_dict(_plan(None, stages=st), "p")
    d = _plan({"nodes": ["a", "b"], "kv_heads": [2, 2], "mlp_columns": [128, 128]})
    del d["model"]["n_kv_heads"]
    with pytest.raises(PlanError, match="model.n_kv_heads: missing"):
        plan_from_dict(d, "p")
    ok = plan_from_dict(_plan({"nodes": ["a", "b"], "kv_heads": [3, 1],
                               "mlp_columns": [192, 64]}), "p")
    assert ok.stages[0].tensor == TensorSpec(("a", "b"), (3, 1), (192, 64))
    assert ok.to_dict()["stages"][0]["tensor"]["kv_heads"] == [3, 1]


# ------------------------------------------------------------------ exact search = brute force


CASES = [  # (speeds, groups, layers, memory, streams, tp_shares, use_all)
    ({"a": 0.01, "b": 0.012, "c": 0.03}, [("a", "b"), ("a", "b", "c")], 3, 16 * GiB, 1, "any",
     False),
    ({"a": 0.01, "b": 0.02, "c": 0.04}, [("b", "c"), ("a", "c")], 3, 460 * MiB, 3, "any",
     False),
    ({"a": 0.02, "b": 0.02, "c": 0.01, "d": 0.04}, [("a", "b"), ("c", "d"), ("a", "b", "c")],
     3, 16 * GiB, 2, "any", False),
    ({"a": 0.01, "b": 0.03, "c": 0.02, "d": 0.02}, [("a", "d"), ("b", "c", "d")], 2, 16 * GiB,
     1, "equal", True),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("objective", ["latency", "ttft", "throughput"])
def test_exact_search_equals_brute_force(case, objective):
    speeds, groups, L, mem, B, shares, use_all = CASES[case]
    links = {(x, y): {"latency_ms": 0.05 if {x, y} <= {"a", "b"} else 2.0,
                      "bandwidth_gbps": 40} for x in speeds for y in speeds if x != y}
    c = cluster(speeds, groups, L, mem, links, t8k=0.0002, t64k=0.0004)
    w = Workload(prompt_tokens=64, context_tokens=128, streams=B)
    r = solve_hybrid(c, objective, w, use_all, shares)
    b = brute_force_hybrid(c, objective, w, shares, use_all)
    assert (r.stages is None) == (b.stages is None)
    if b.stages is None:
        return
    assert r.fun == pytest.approx(b.fun, rel=1e-9)
    p = predict(c, r.stages, w, "mlx-pipeline")  # the plan it returns costs what it says
    assert p.fits and objective_value(p, objective, w) == pytest.approx(r.fun, rel=1e-9)
    assert r.optimal and r.proven == "optimal-all-orders-subsets" and r.gap == 0.0
    if shares == "equal":
        assert all(s.tensor is None or s.tensor.equal for s in r.stages)
    seeded = solve_hybrid(c, objective, w, use_all, shares,  # pruned by the pipeline optimum
                          seed=solve(c, objective, w, "mlx-pipeline", use_all))
    assert seeded.fun == pytest.approx(b.fun, rel=1e-9) and seeded.optimal


def test_hybrid_wins_where_tensor_pays_and_pipeline_where_it_does_not():
    fast = cluster({"a": 0.02, "b": 0.02, "c": 0.04}, L=4, t8k=0.0001, t64k=0.0002)
    r = solve_hybrid(fast, "latency", W)
    assert any(s.tensor is not None for s in r.stages)
    slow = cluster({"a": 0.02, "b": 0.02, "c": 0.04}, L=4, t8k=0.05, t64k=0.06)
    r2 = solve_hybrid(slow, "latency", W)
    assert all(s.tensor is None for s in r2.stages)
    pipe = solve(slow, "latency", W, "mlx-pipeline")  # pure pipeline: the special case
    assert r2.fun == pytest.approx(pipe.fun, rel=1e-12) and r2.stages == pipe.stages


def test_use_all_nodes_with_more_nodes_than_layers_needs_a_group():
    from graphsplit.hybrid.make import make_hybrid_plan

    c = cluster({"a": 0.01, "b": 0.02, "c": 0.04}, L=2)
    plan = make_hybrid_plan(c, "latency", W, "mlx-pipeline", use_all_nodes=True)
    assert sorted(m for s in plan.stages for m in s.members) == ["a", "b", "c"]
    assert "error" in plan.baselines["pipeline"]


def test_restricted_search_is_labelled_a_bound_with_its_gap():
    c = cluster({"a": 0.02, "b": 0.02, "c": 0.04}, L=4, t8k=0.0001, t64k=0.0002)
    r = solve_hybrid(c, "latency", W, max_group=1)
    assert not r.optimal and r.proven == "bound" and r.status == 1
    assert r.lower_bound <= r.fun and r.gap == pytest.approx((r.fun - r.lower_bound) / r.fun)
    exact = solve_hybrid(c, "latency", W)
    assert r.lower_bound <= exact.fun <= r.fun
    d = r.to_dict()
    assert d["proven"] == "bound" and d["optimal"] is False and d["gap"] == r.gap


def test_cluster_beyond_the_exact_limits_is_a_bound_seeded_by_the_pipeline(monkeypatch):
    from graphsplit.hybrid import search

    c = cluster({"a": 0.02, "b": 0.02, "c": 0.04}, L=4, t8k=0.0001, t64k=0.0002)
    exact = solve_hybrid(c, "throughput", W)
    pipe = solve(c, "throughput", W, "mlx-pipeline")
    monkeypatch.setattr(search, "MAX_EXACT_NODES", 2)
    monkeypatch.setattr(search, "MAX_RESTRICTED_NODES", 2)  # single nodes only: the seed
    r = solve_hybrid(c, "throughput", W, seed=pipe)
    assert r.proven == "bound" and not r.optimal and r.stages == pipe.stages
    assert r.lower_bound <= exact.fun < r.fun and "beyond the exact program" in r.message


def test_same_plan_whatever_the_order_of_nodes_and_collectives():
    sp = {"a": 0.02, "b": 0.02, "c": 0.04, "d": 0.02}
    g = [("a", "b"), ("c", "d"), ("b", "d")]
    c1 = cluster(sp, g, L=3, t8k=0.0001, t64k=0.0002)
    c2 = cluster(dict(reversed(list(sp.items()))), [tuple(reversed(x)) for x in reversed(g)],
                 L=3, t8k=0.0001, t64k=0.0002)
    r1, r2 = solve_hybrid(c1, "latency", W), solve_hybrid(c2, "latency", W)
    assert r1.stages == r2.stages


# ------------------------------------------------------------------ exo's Tensor placement


def test_exo_current_tensor_baseline_is_the_smallest_divisible_set():
    # the model (8 x 100 MiB blocks + 400 MiB embedding and head) needs more than any one or
    # two nodes have available
    t = tables({"a": 0.01, "b": 0.02, "c": 0.04, "d": 0.03}, L=8, n_kv=4)
    c = cluster_from_tables(t, memory={n: 400 * MiB for n in t})
    for n in c.nodes:
        n.available_bytes = 400 * MiB
    st = exo_current_tensor_stages(c)  # 3 nodes hold it but 3 does not divide 4 KV heads
    assert len(st) == 1 and st[0].tensor.nodes == ("a", "b", "c", "d")
    assert st[0].tensor.kv_heads == (1, 1, 1, 1) and (st[0].start_layer, st[0].end_layer) == (0, 8)
    for n in c.nodes:
        n.available_bytes = 1300 * MiB  # one node holds it: exo forces a one-node Pipeline
    assert exo_current_tensor_stages(c) == [Stage("a", 0, 8)]


# ------------------------------------------------------------------ the command line


def _write(tmp_path, collectives=True):
    p = write_cluster(tmp_path, tables({"a": 0.01, "b": 0.012, "c": 0.03}, L=4))
    assert "tensor_parallel" in json.loads((tmp_path / "profiles" / "a.json").read_text())
    d = json.loads(p.read_text())
    if collectives:
        d["collectives"] = [{"nodes": ["b", "a"], "op": "all_sum", "backend": "ring",
                             "sizes_bytes": [8192, 65536], "seconds": [0.0002, 0.0004],
                             "spread": [0.1, 0.1], "latency_s": 0.0002, "bandwidth_Bps": 1e9,
                             "measured": "2026-12-02T02:00:00Z"}]
    p.write_text(json.dumps(d))
    return p


def run(*args):
    return subprocess.run([sys.executable, "-m", "graphsplit.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_hybrid_plan_round_trips(tmp_path):
    p = _write(tmp_path)
    assert load_cluster(p).collective(["a", "b"]).time(8192) == 0.0002
    out = tmp_path / "plan.json"
    r = run(p, "--hybrid", "--runtime", "mlx-pipeline", "--prompt-tokens", "64",
            "--context-tokens", "128", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "tensor-parallel over a+b" in r.stdout
    assert "proven: optimal-all-orders-subsets" in r.stdout
    plan = read_plan(out)
    assert plan.stages[0].tensor is not None and plan.model["n_kv_heads"] == 4
    assert plan.solver["proven"] == "optimal-all-orders-subsets"
    assert {"pipeline", "exo-current-tensor"} <= set(plan.baselines)
    r = run(p, "--hybrid", "--max-group", "1", "--runtime", "mlx-pipeline", "--json")
    d = json.loads(r.stdout)
    assert d["solver"]["proven"] == "bound" and d["solver"]["optimal"] is False
    r = run(p, "--hybrid", "--max-group", "1", "--runtime", "mlx-pipeline")
    assert "NOT proven optimal" in r.stdout and "proven: bound" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["--hybrid", "--runtime", "exo-legacy"], "legacy exo has no tensor parallelism"),
    (["--hybrid", "--objective", "pareto"], "pareto"),
    (["--tp-shares", "equal", "--layers", "a:4"], "--layers works on pipeline plans only"),
    (["--hybrid", "--objective", "throughput", "--streams", "4", "--replicas", "2"],
     "--replicas works on pipeline plans only"),
    (["--hybrid", "--runtime", "mlx-pipeline", "--objective", "throughput", "--streams", "4",
      "--micro-batch", "2"],
     "--micro-batch works on pipeline plans only"),
])
def test_cli_refusals_are_one_line_exit_2(tmp_path, args, words):
    r = run(_write(tmp_path), *args)
    assert r.returncode == 2 and words in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_exo_current_pays_mlx_all_sum_where_the_entry_keeps_it(tmp_path):
    """On the ring backend profile-link's entry is the runner's neighbour chain (`seconds`)
    with MLX's own all_sum beside it (`mlx_all_sum`): exo runs MLX's, ours the chain."""
    p = _write(tmp_path)
    d = json.loads(p.read_text())
    d["collectives"][0].update(algorithm="neighbour-chain", mlx_all_sum={
        "seconds": [0.003, 0.005], "spread": [0.1, 0.1], "latency_s": 0.003,
        "bandwidth_Bps": 1e8})
    p.write_text(json.dumps(d))
    c = load_cluster(p)
    st = [tensor_stage(["a", "b"], [2, 2], 0, 4, 256)]
    ours = predict(c, st, W, "mlx-pipeline").tensor["a"]["allreduce_s"]
    exo = predict(c, st, W, "exo-current").tensor["a"]["allreduce_s"]
    assert ours == pytest.approx(2 * 4 * 0.0002)  # one decode pass, 8192 bytes
    assert exo == pytest.approx(2 * 4 * 0.003)


def test_roofline_derived_node_derives_its_tensor_profile_from_the_chip(tmp_path):
    from graphsplit.hybrid import tables as tp

    p = _write(tmp_path)
    d = json.loads(p.read_text())
    d["nodes"].append({"id": "m", "derive_from": "a", "chip": {
        "memory_bandwidth_gbs": 200, "fp16_tflops": 40, "memory_bytes": 64 * GiB}})
    p.write_text(json.dumps(d))
    c = load_cluster(p)
    n = tp.n_kv_heads(c.node("m"))
    whole = c.node("m").table.row("layers.0")
    ctx = c.node("m").table.decode_context.index(128)
    full, derived = tp.tp_seconds(c.node("m"), 0, n, "decode", 128)
    # the chip's whole share is its own block row (the same roofline), not the base's time
    assert full == pytest.approx(whole.decode_s[ctx]) and not derived
    assert full != pytest.approx(tp.tp_seconds(c.node("a"), 0, n, "decode", 128)[0])
    assert tp.tp_seconds(c.node("m"), 0, 1, "decode", 128)[0] < full
    assert tp.tp_bytes(c.node("m"), 0, 1)[0] < tp.tp_bytes(c.node("m"), 0, n)[0]


def test_cluster_collective_fields_checked(tmp_path):
    p = _write(tmp_path)
    d = json.loads(p.read_text())
    d["collectives"][0]["nodes"] = ["a", "zz"]
    p.write_text(json.dumps(d))
    r = run(p, "--hybrid")
    assert r.returncode == 2 and "collectives[0].nodes" in r.stderr and "zz" in r.stderr
    d["collectives"][0].update(nodes=["a", "b"], seconds=[0.1])
    p.write_text(json.dumps(d))
    r = run(p, "--hybrid")
    assert r.returncode == 2 and "collectives[0]" in r.stderr


def test_pipeline_split_unchanged_by_collectives(tmp_path):
    """Without --hybrid the measured collectives change nothing (pure pipeline, same solver)."""
    a = json.loads(run(_write(tmp_path / "x"), "--json").stdout)
    b = json.loads(run(_write(tmp_path / "y", collectives=False), "--json").stdout)
    assert a["stages"] == b["stages"] and a["solver"]["name"] == b["solver"]["name"]
    assert all("tensor" not in s for s in a["stages"])
