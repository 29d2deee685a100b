"""Each runtime's batching in the cost model (graphsplit.batching): the formulas on constructed
tables with a batch grid (INTERFACES I1), checked against numbers computed by hand from the
module's formulas; the micro-batch search against brute force; the CLI options; the plan."""

from __future__ import annotations

import itertools
import json

import pytest

from costtables import GiB, make_table, write_cluster
from graphsplit.api import make_throughput_plan
from graphsplit.batching import (EXO_MAX_CONCURRENT_REQUESTS, batch_notes, decode_seconds,
                                 solve_serving)
from graphsplit.brute import all_plans
from graphsplit.cli import main as split_main
from graphsplit.cluster import cluster_from_tables, load_cluster
from graphsplit.costmodel import Workload, extrapolation_notes, objective_value, predict
from graphsplit.plan import PlanError, Stage, plan_from_dict, read_plan, write_plan
from profiler.errors import UserError

GRID = [1, 2, 4, 8]
MS = 1e-3
BW = 8192 * 1000 * 8 / 1e9  # Gbit/s at which one token's 8192 activation bytes take 1 ms


def batched(table, block_ms=(10, 11, 13, 17), head_ms=(2, 2.5, 3.5, 5.5)):
    """`table` with a batch grid (a version-2 table, INTERFACES I1): every block decodes a step
    of b streams in block_ms[b] and the head in head_ms[b] (the same at every context); the
    embedding costs nothing."""
    table.decode_batch = list(GRID)
    for r in table.rows:
        ms = block_ms if r.kind == "block" else head_ms if r.kind == "head" else [0] * 4
        r.decode_s = [ms[0] * MS] * len(table.decode_context)
        r.decode_batch_s = [[x * MS for x in ms] for _ in table.decode_context]
        r.decode_batch_spread = [[0.01] * len(GRID) for _ in table.decode_context]
    return table


def two_nodes(memory=16 * GiB, **kw):
    tables = {n: batched(make_table(n, 4, embed_decode_s=0.0, memory_usable=memory, **kw))
              for n in ("a", "b")}
    return cluster_from_tables(tables, default_link={"latency_ms": 1.0, "bandwidth_gbps": BW})


def test_decode_seconds_reads_the_batch_grid():
    t = batched(make_table("a", 4))
    r = t.row("layers.0")
    assert [decode_seconds(t, r, 512, b) for b in (1, 2, 3, 4, 6, 8)] == pytest.approx(
        [x * MS for x in (10, 11, 12, 13, 15, 17)])  # piecewise-linear between grid points
    assert decode_seconds(t, r, 512, 16) == pytest.approx(25 * MS)  # last two points' slope


def test_micro_batch_pipeline_formula_by_hand():
    """B = 8 in micro-batches of 4 over a[0:2], b[2:4]: stage a = 2 x 13 + (1 + 4 x 1) =
    31 ms, stage b = 2 x 13 + head 3.5 + closure (1 ms + 16 token bytes) = 30.50195 ms;
    M = 2: cycle = max(61.50195, 2 x 31) = 62 ms, throughput = 8 / 0.062."""
    c = two_nodes()
    st = [Stage("a", 0, 2), Stage("b", 2, 4)]
    p = predict(c, st, Workload(streams=8, batch=4), "mlx-pipeline")
    closure = 1 + 16 / (BW * 1e9 / 8) * 1e3
    assert p.stage_compute_s == pytest.approx({"a": 26 * MS, "b": 29.5 * MS})
    assert p.stage_link_s == pytest.approx({"a": 5 * MS, "b": closure * MS})
    assert p.tpot_s == pytest.approx((31 + 29.5 + closure) * MS)
    assert p.micro_batches == 2 and p.decode_batch == 4
    assert p.cycle_s == pytest.approx(62 * MS)
    assert p.throughput_tps == pytest.approx(8 / 0.062)
    # micro-batches of 2 (M = 4): stages 25 and 25.50098 ms, cycle = 4 x 25.50098
    p2 = predict(c, st, Workload(streams=8, batch=2), "mlx-pipeline")
    assert p2.cycle_s == pytest.approx(4 * (22 + 2.5 + 1 + 8 / (BW * 1e9 / 8) * 1e3) * MS)
    # batch 1 is the model before batching: min(B / tpot, 1 / bottleneck)
    p1 = predict(c, st, Workload(streams=8), "mlx-pipeline")
    assert p1.throughput_tps == pytest.approx(min(8 / p1.tpot_s, 1 / p1.bottleneck_s))


def test_solver_chooses_micro_batch_and_split():
    """Over every split and m = 1..8 the best is a[0:2] b[2:4] (or its mirror) at m = 4,
    62 ms per cycle (the hand computation above); m = 8 on one node is 108.8 tok/s."""
    c = two_nodes()
    res, wl = solve_serving(c, Workload(streams=8), "mlx-pipeline")
    assert wl.batch == 4 and res.extra["serving"].micro_batch == 4
    assert [s.end_layer - s.start_layer for s in res.stages] == [2, 2]
    assert 1 / res.fun == pytest.approx(8 / 0.062)
    assert res.proven == "optimal-all-orders-subsets" and res.lower_bound == res.fun
    fixed, wl2 = solve_serving(c, Workload(streams=8), "mlx-pipeline", micro_batch=8)
    assert wl2.batch == 8 and 1 / fixed.fun == pytest.approx(8 / (4 * 17 + 5.5) / MS)


def test_exo_current_caps_the_batch_at_its_concurrency_limit():
    """exo-current with 16 streams decodes one batch of 8 (EXO_MAX_CONCURRENT_REQUESTS), the
    others queued: on one node tpot(8) = 4 x 17 + head 5.5 = 73.5 ms, 8 / 0.0735 tok/s;
    KV held for the 8 active streams only."""
    assert EXO_MAX_CONCURRENT_REQUESTS == 8
    c = two_nodes()
    res, wl = solve_serving(c, Workload(streams=16), "exo-current")
    assert wl.batch == 8 and res.extra["serving"].pattern == "batch-through"
    assert len(res.stages) == 1 and 1 / res.fun == pytest.approx(8 / 0.0735)
    st = [Stage("a", 0, 4)]
    m16 = predict(c, st, Workload(streams=16, batch=8), "exo-current").stage_memory_bytes
    m8 = predict(c, st, Workload(streams=8, batch=8), "exo-current").stage_memory_bytes
    assert m16 == m8
    r16 = predict(c, st, Workload(streams=16, batch=8), "mlx-pipeline").stage_memory_bytes
    assert r16["a"] > m8["a"]  # ours holds every stream's KV
    # two stages: + activation and the all-gather's hop back (1 + 8 ms each way), no closure
    p = predict(c, [Stage("a", 0, 2), Stage("b", 2, 4)], Workload(streams=8, batch=8),
                "exo-current")
    assert p.tpot_s == pytest.approx((34 + 34 + 9 + 9 + 5.5) * MS)
    assert p.throughput_tps == pytest.approx(8 / p.tpot_s)


def test_exo_legacy_never_batches():
    c = two_nodes()
    res, wl = solve_serving(c, Workload(streams=8), "exo-legacy")
    assert wl.batch == 1 and res.extra["serving"].micro_batch == 1
    assert "evicts another's cache" in res.extra["serving"].why  # 8 streams > its 3 caches
    assert "evicts" not in solve_serving(c, Workload(streams=3), "exo-legacy")[0].extra[
        "serving"].why
    p = predict(c, res.stages, wl, "exo-legacy")
    assert 1 / res.fun == pytest.approx(min(8 / p.tpot_s, 1 / p.bottleneck_s))
    with pytest.raises(UserError, match="--micro-batch 2: runtime exo-legacy fixes"):
        solve_serving(c, Workload(streams=8), "exo-legacy", micro_batch=2)


def _hetero():
    """Three unlike nodes, five layers, links of different speed: no tie decides the answer."""
    tables = {"a": batched(make_table("a", 5, embed_decode_s=0.0),
                           (10, 10.5, 11.5, 13.5), (2, 2.2, 2.6, 3.4)),
              "b": batched(make_table("b", 5, embed_decode_s=0.0, memory_usable=2 * GiB),
                           (6, 9, 15, 27), (1, 1.5, 2.5, 4.5)),
              "c": batched(make_table("c", 5, embed_decode_s=0.0),
                           (14, 14.2, 14.6, 15.4), (3, 3.1, 3.3, 3.7))}
    links = {("a", "b"): {"latency_ms": 0.5, "bandwidth_gbps": 1.0},
             ("b", "c"): {"latency_ms": 3.0, "bandwidth_gbps": 0.05}}
    return cluster_from_tables(tables, links=links,
                               default_link={"latency_ms": 1.5, "bandwidth_gbps": 0.2})


@pytest.mark.parametrize("runtime", ["mlx-pipeline", "exo-current", "exo-legacy"])
@pytest.mark.parametrize("B", [3, 6])
def test_serving_search_equals_brute_force(runtime, B):
    """Brute force: every plan (order, subset, cuts) x every batch the runtime allows,
    evaluated with predict; the search's optimum must equal it."""
    c = _hetero()
    ms = range(1, B + 1) if runtime == "mlx-pipeline" else \
        [min(B, EXO_MAX_CONCURRENT_REQUESTS)] if runtime == "exo-current" else [1]
    best = min(objective_value(pr, "throughput", wl)
               for m in ms for wl in [Workload(streams=B, batch=m)]
               for st in all_plans(c.ids, c.n_layers)
               for pr in [predict(c, st, wl, runtime)] if pr.fits)
    res, wl = solve_serving(c, Workload(streams=B), runtime)
    assert res.fun == pytest.approx(best, rel=1e-9)
    assert objective_value(predict(c, res.stages, wl, runtime), "throughput", wl) == \
        pytest.approx(res.fun, rel=1e-12)


def test_version_1_tables_are_extrapolated_linearly_and_said_so():
    c = cluster_from_tables({"a": make_table("a", 4), "b": batched(make_table("b", 4))})
    wl = Workload(streams=16, batch=16)
    t = c.node("a").table
    r = t.row("layers.0")
    assert decode_seconds(t, r, 1024, 16) == pytest.approx(16 * t.decode_time(r, 1024))
    notes = batch_notes(c, wl)
    assert len(notes) == 2 and all("extrapolated" in n for n in notes)
    assert "no batch grid" in notes[0] and notes[0].startswith("a:")
    assert "beyond the measured batch grid 1..8" in notes[1]
    assert notes[1] in extrapolation_notes(c, wl)
    assert batch_notes(c, Workload(streams=16, batch=8))[0].startswith("a:")
    assert len(batch_notes(c, Workload(streams=16, batch=8))) == 1


def test_plan_round_trip_with_serving(tmp_path):
    c = two_nodes()
    plan = make_throughput_plan(c, Workload(streams=8), "mlx-pipeline")
    assert plan.serving == {"pattern": "micro-batch", "micro_batch": 4,
                            "why": plan.serving["why"]} and "exo-bridge run" in plan.serving["why"]
    assert plan.workload["batch"] == 4 and plan.workload["streams"] == 8
    assert plan.solver["proven"] == "optimal-all-orders-subsets"
    base = plan.baselines["exo-current"]["predicted"]  # exo's split served at its best batch
    assert base["decode_batch"] in range(1, 9)
    path = write_plan(plan, tmp_path / "p.json")
    back = read_plan(path)
    assert back.to_dict() == json.loads(path.read_text())
    assert back.serving == plan.serving and back.replicas is None
    cur = make_throughput_plan(c, Workload(streams=12), "exo-current")
    assert cur.serving["pattern"] == "batch-through" and cur.serving["max_batch"] == 8
    assert cur.serving["micro_batch"] == 8 and "ExoBatchGenerator" in cur.serving["why"]


def test_plan_validator_refuses_bad_serving():
    c = two_nodes()
    d = make_throughput_plan(c, Workload(streams=8), "mlx-pipeline").to_dict()
    d["serving"]["pattern"] = "zigzag"
    with pytest.raises(PlanError, match="serving.pattern"):
        plan_from_dict(d, "p.json")


def _cli_cluster(tmp_path):
    tables = {n: batched(make_table(n, 4, embed_decode_s=0.0)) for n in ("a", "b")}
    return str(write_cluster(tmp_path, tables,
                             default_link={"latency_ms": 1.0, "bandwidth_gbps": BW}))


def test_cli_prints_pattern_micro_batch_and_replicas(tmp_path, capsys):
    cf = _cli_cluster(tmp_path)
    assert split_main([cf, "--objective", "throughput", "--streams", "8", "--runtime",
                       "mlx-pipeline", "--micro-batch", "2", "--out",
                       str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "serving: micro-batch: micro-batches of 2 stream(s), 4 in the ring" in out
    assert "replicas 1" in out
    plan = read_plan(tmp_path / "p.json")
    assert load_cluster(cf).node("a").table.decode_batch == GRID  # the grid went to disk
    assert plan.workload["batch"] == 2
    assert not [n for n in plan.predicted["extrapolated"] if "batch" in n]  # 2 is measured
    assert split_main([cf, "--objective", "throughput", "--streams", "8", "--runtime",
                       "exo-current", "--replicas", "auto"]) == 0
    out = capsys.readouterr().out
    assert "serving: batch-through" in out and "runtime cap 8" in out


@pytest.mark.parametrize("argv, says", [
    (["--objective", "latency", "--replicas", "2"], "--replicas applies to --objective throughput"),
    (["--objective", "throughput", "--micro-batch", "2"], "runtime exo-current fixes"),
    (["--objective", "throughput", "--runtime", "mlx-pipeline", "--streams", "4",
      "--micro-batch", "8"], "--micro-batch 8 is larger than --streams 4"),
    (["--objective", "throughput", "--streams", "2", "--replicas", "3"],
     "--replicas 3 is more than --streams 2"),
    (["--objective", "throughput", "--replicas", "two"], "--replicas"),
])
def test_cli_bad_serving_options_are_one_line(tmp_path, capsys, argv, says):
    cf = _cli_cluster(tmp_path)
    assert split_main([cf, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err, err


def test_brute_helper_is_complete():
    """The brute force above sees every ordered subset with every cut (sanity of the oracle)."""
    n = sum(1 for _ in all_plans(["a", "b", "c"], 5))
    assert n == sum(len(list(itertools.permutations("abc", k))) * len(list(
        itertools.combinations(range(1, 5), k - 1))) for k in (1, 2, 3))
