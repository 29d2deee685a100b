"""The closed loop: measured stage times written beside the cost tables, applied by the next
split, and never a re-plan worse than what was measured.

Real files, real loaders (graphsplit.cluster, split-model's main); one real run on a tiny model
(real mx.distributed processes) writes the calibration. No timing is asserted: the checks are
that what was measured comes back out of the calibrated tables exactly.
"""

from __future__ import annotations

import json

import pytest

from graphsplit import calibration as C
from graphsplit.cli import main as split_main
from graphsplit.cluster import load_cluster
from tests.costtables import make_table, write_cluster

STAMP = "2026-12-02T00:00:00Z"
TABLE_STAMP = "2026-11-22T00:00:00Z"  # tests.costtables.make_table's created


def tiny_cluster(tmp_path, n_layers: int = 4):
    """Two synthetic nodes (a fast, b slow) of a 4-layer model named like the runner's tiny."""
    t = {"a": make_table("a", n_layers, decode_s=0.001, model="tiny-llama",
                         decode_context=(8, 64), prefill_tokens=(4, 16, 64)),
         "b": make_table("b", n_layers, decode_s=0.004, model="tiny-llama",
                         decode_context=(8, 64), prefill_tokens=(4, 16, 64))}
    return write_cluster(tmp_path, t, default_link={"latency_ms": 0.1, "bandwidth_gbps": 10})


def doc(entries, measured_split=None, config_hash="sha256:toy", created=TABLE_STAMP):
    d = {"format": C.FORMAT, "version": C.VERSION, "created": STAMP,
         "table": {"path": "x.json", "config_hash": config_hash, "created": created},
         "note": C.NOTE, "entries": entries}
    if measured_split:
        d["measured_split"] = measured_split
    return d


def entry(node, phase, batch, ratio, pred=0.01):
    return {"node": node, "layers": [0, 4], "phase": phase, "context": 8, "tokens": 1,
            "batch": batch, "measured_s": pred * ratio, "predicted_s": pred, "ratio": ratio,
            "repeats": 5, "spread": 0.0, "measured": STAMP}


def test_apply_scales_every_row_in_the_measured_phase_only():
    t = make_table("a", 4, decode_s=0.001)
    c = C.apply(t, doc([entry("a", "decode", 1, 2.0), entry("a", "prefill", 1, 0.5)]), "f")
    for r0, r1 in zip(t.rows, c.rows):
        assert r1.decode_s == pytest.approx([2 * x for x in r0.decode_s])
        assert r1.prefill_s == pytest.approx([0.5 * x for x in r0.prefill_s])
    assert t.rows[1].decode_s != c.rows[1].decode_s  # a copy: the loaded table is untouched
    assert c.method["calibration"]["kind"] == "measured"


def test_a_table_without_batch_grid_takes_any_batch_on_its_one_level():
    """Version 1 (no batch grid, read as decode_batch = [1]): the cost model charges batch b
    as b x decode_s, so a batch-4 measurement scales decode_s itself."""
    t = make_table("a", 2, decode_s=0.001)
    t.decode_batch = [1]
    c = C.apply(t, doc([entry("a", "decode", 4, 3.0)]), "f")
    assert c.rows[1].decode_s == pytest.approx([3 * x for x in t.rows[1].decode_s])


def test_batch_grid_scales_the_columns_the_batch_interpolates_between():
    """A version-2 table (decode_batch grid, rows' decode_batch_s): a batch-3 measurement
    scales the batch-2 and batch-4 columns (so the value at 3 is the measured one), batch 1
    scales decode_s and the batch-1 column, the other columns stay."""
    t = make_table("a", 2, decode_s=0.001, decode_context=(8, 64))
    t.decode_batch = [1, 2, 4, 8]
    for r in t.rows:
        r.decode_batch_s = [[x * b for b in (1, 1.5, 2.5, 4)] for x in r.decode_s]
    c = C.apply(t, doc([entry("a", "decode", 3, 2.0)]), "f")
    r0, r1 = t.rows[1], c.rows[1]
    assert [col[1] for col in r1.decode_batch_s] == pytest.approx(
        [2 * col[1] for col in r0.decode_batch_s])
    assert [col[2] for col in r1.decode_batch_s] == pytest.approx(
        [2 * col[2] for col in r0.decode_batch_s])
    assert [col[0] for col in r1.decode_batch_s] == [col[0] for col in r0.decode_batch_s]
    assert [col[3] for col in r1.decode_batch_s] == [col[3] for col in r0.decode_batch_s]
    assert r1.decode_s == r0.decode_s
    assert C._batch_columns([1, 2, 4, 8], 16) == [2, 3]  # beyond: the last two (extrapolated)


def test_cluster_hook_applies_it_and_no_calibration_opts_out(tmp_path, capsys):
    cf = tiny_cluster(tmp_path)
    C.write_calibration(C.calibration_path(tmp_path / "profiles" / "b.json"),
                        doc([entry("b", "decode", 1, 0.1)]))
    raw, cal = load_cluster(cf, calibration=False), load_cluster(cf)
    rb, cb = raw.node("b").table.row("layers.0"), cal.node("b").table.row("layers.0")
    assert cb.decode_s == pytest.approx([0.1 * x for x in rb.decode_s])
    assert cal.node("a").table.rows[1].decode_s == raw.node("a").table.rows[1].decode_s
    assert len(cal.calibrations) == 1 and raw.calibrations == []
    common = [str(cf), "--runtime", "mlx-pipeline", "--prompt-tokens", "8",
              "--context-tokens", "8", "--json"]
    assert split_main(common) == 0
    with_cal = json.loads(capsys.readouterr().out)
    assert split_main(common + ["--no-calibration"]) == 0
    without = json.loads(capsys.readouterr().out)
    # b is 10x faster once calibrated: the split changes, and the prediction with it
    assert with_cal["predicted"]["tpot_s"] < without["predicted"]["tpot_s"]
    assert split_main([str(cf), "--runtime", "mlx-pipeline"]) == 0
    assert "calibrated: node b" in capsys.readouterr().out


@pytest.mark.parametrize("mutate, says", [
    (lambda d: d["entries"][0].update(ratio=-1), "entries[0].ratio"),
    (lambda d: d["entries"][0].update(phase="warmup"), "entries[0].phase"),
    (lambda d: d.update(version=7), "version 7"),
    (lambda d: d["table"].update(config_hash="sha256:other"), "config_hash"),
    (lambda d: d["table"].update(created="2020-01-01T00:00:00Z"), "profiled again"),
])
def test_bad_or_stale_calibration_is_one_line(tmp_path, capsys, mutate, says):
    cf = tiny_cluster(tmp_path)
    d = doc([entry("a", "decode", 1, 1.5)])
    mutate(d)
    p = C.calibration_path(tmp_path / "profiles" / "a.json")
    p.write_text(json.dumps(d))
    assert split_main([str(cf)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(p) in err and says in err, err
    assert split_main([str(cf), "--no-calibration"]) == 0  # the way out it names


def _measured(stages, tpot):
    return {"stages": [{"node": n, "start_layer": a, "end_layer": b} for n, a, b in stages],
            "runtime": "mlx-pipeline", "pattern": "micro-batch",
            "workload": {"prompt_tokens": 8, "context_tokens": 8, "streams": 1},
            "measured": {"tpot_s": tpot, "ttft_s": None, "throughput_tps": 1 / tpot}}


@pytest.mark.parametrize("measured_tpot, kept", [(1e-9, True), (10.0, False)])
def test_replan_never_worse_than_measured(tmp_path, capsys, measured_tpot, kept):
    """A measured split that did better than any calibrated prediction is kept (and the plan
    says so); one that did worse is replaced by the re-plan."""
    cf = tiny_cluster(tmp_path)
    slow = [("b", 0, 4)]
    C.write_calibration(C.calibration_path(tmp_path / "profiles" / "b.json"),
                        doc([entry("b", "decode", 1, 1.0)], _measured(slow, measured_tpot),
                            created="2026-11-22T00:00:00Z"))
    out = tmp_path / "plan.json"
    assert split_main([str(cf), "--runtime", "mlx-pipeline", "--prompt-tokens", "8",
                       "--context-tokens", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    plan = json.loads(out.read_text())
    got = [(s["node"], s["start_layer"], s["end_layer"]) for s in plan["stages"]]
    if kept:
        assert got == slow and plan["solver"]["kept_measured"] is True
        assert "kept the measured split" in text
    else:
        assert got != slow and not plan["solver"].get("kept_measured")
        assert plan["predicted"]["tpot_s"] < measured_tpot
    # another workload: the measured value is not comparable, nothing is kept
    assert split_main([str(cf), "--runtime", "mlx-pipeline", "--prompt-tokens", "9",
                       "--context-tokens", "8", "--json"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert not other["solver"].get("kept_measured")


@pytest.mark.slow
def test_real_run_calibrates_and_the_calibrated_tables_predict_what_was_measured(tmp_path,
                                                                                capsys):
    """`exo-bridge run --calibrate` on a tiny model over two real ranks: the calibration files
    land beside both tables; loaded back, each stage's predicted compute in the measured phase
    and batch equals the measured median; the report has before / after / measured; the
    re-plan is the measured split or predicted better than it measured."""
    pytest.importorskip("mlx.core")
    from exo_bridge.runner.run import main as run_main
    from graphsplit.plan import Plan, Stage, write_plan
    from tests.test_runner import make_tiny_dir

    tiny = make_tiny_dir(tmp_path / "tiny-llama")
    cf = tiny_cluster(tmp_path)
    plan = Plan(model={"name": "tiny-llama", "n_layers": 4, "config_hash": "sha256:toy"},
                stages=[Stage("a", 0, 3), Stage("b", 3, 4)], runtime="mlx-pipeline",
                objective="throughput", workload={"prompt_tokens": 8, "streams": 2},
                cluster_file=str(cf))
    pp = write_plan(plan, tmp_path / "plan.json")
    rc = run_main([str(pp), "--model", str(tiny), "--max-tokens", "4", "--streams", "2",
                   "--micro-batch", "1", "--calibrate", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    cal = out["calibration"]
    assert sorted(cal["files"]) == sorted(str(C.calibration_path(tmp_path / "profiles" / n))
                                          for n in ("a.json", "b.json"))
    assert {"before", "after", "measured"} <= set(cal)
    stages = [Stage("a", 0, 3), Stage("b", 3, 4)]
    calibrated = load_cluster(cf)
    for e in cal["entries"]:
        s = [st.node for st in stages].index(e["node"])
        x = e["context"] if e["phase"] == "decode" else e["tokens"]
        got = C.stage_seconds(calibrated, stages, s, e["phase"], x, e["batch"], "ring")
        assert got == pytest.approx(e["measured_s"], rel=1e-9)
    assert {(e["phase"], e["batch"]) for e in cal["entries"]} == {("decode", 1),
                                                                   ("prefill", 1)}
    rp = cal["replan"]
    assert rp["kept_measured"] or rp["stages"] == cal["measured_split"]["stages"] or \
        1 / rp["predicted"]["throughput_tps"] < 1 / cal["measured"]["throughput_tps"]
