"""`exo-bridge run --calibrate`: the closed loop from a measured run back to the next plan.

After a run (exo_bridge.runner.streams), each stage's measured compute per pass, by phase and
batch, is divided by what the UNCALIBRATED cost tables predict for it and written beside each
node's table (graphsplit.calibration: format, how split-model applies it). Then, with the new
calibration loaded as split-model would load it:

* the measured split is predicted again ("after"), beside its prediction before ("before")
  and what was measured;
* the split is re-planned for the same objective, runtime and workload, and kept only when its
  calibrated prediction is better than the measured split's MEASURED value
  (graphsplit.calibration.keep_measured_split); otherwise the measured split stays, and the
  report says so.
"""

from __future__ import annotations

from typing import Any

from profiler.costtable import now_iso

KEYS = ("throughput_tps", "tpot_s", "ttft_s")


def _pick(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d.get(k) for k in KEYS}


def _stages(stages) -> list[dict[str, Any]]:
    return [{"node": s.node, "start_layer": s.start_layer, "end_layer": s.end_layer}
            for s in stages]


def run_batch(res) -> int:
    """Streams per decode step of a run: the micro-batch, or batch-through's whole batch."""
    return res.micro_batch if res.pattern == "micro-batch" else min(res.streams, res.max_batch)


def calibrate(cluster_file: str, res, runtime: str, objective: str) -> dict[str, Any]:
    """Write the calibration of run `res` (a ServeResult) and re-plan; returns the report."""
    from exo_bridge.runner.run import serve_prediction
    from graphsplit.api import make_plan, make_throughput_plan
    from graphsplit.calibration import keep_measured_split, measured_entries, write_for_run
    from graphsplit.cluster import load_cluster
    from graphsplit.costmodel import Workload

    P, N, B = res.prompt_tokens, res.max_tokens, res.streams
    ctx = P + N // 2
    now = now_iso()
    args = (P, N, B, runtime, res.pattern, res.micro_batch, res.max_batch)
    raw = load_cluster(cluster_file, calibration=False)
    before = serve_prediction(raw, res.stages, *args)
    m = res.measured()
    ms = {"stages": _stages(res.stages), "runtime": runtime, "pattern": res.pattern,
          "workload": {"prompt_tokens": P, "context_tokens": ctx, "streams": B,
                       "batch": run_batch(res)},
          "serving": {"pattern": res.pattern, "micro_batch": res.micro_batch,
                      "max_batch": res.max_batch},
          "measured": {k: m.get(k) for k in KEYS}, "predicted_before": _pick(before)}
    entries = measured_entries(raw, res.stages, res.ranks, res.protocol, P, ctx, now)
    paths = write_for_run(raw, res.stages, entries, ms, now)
    cal = load_cluster(cluster_file)  # as split-model loads it: the calibration applied
    after = serve_prediction(cal, res.stages, *args)
    wl = Workload(prompt_tokens=P, context_tokens=ctx, streams=B)
    if objective == "throughput":
        plan = make_throughput_plan(cal, wl, runtime, False, cluster_file=cluster_file)
    else:
        plan = make_plan(cal, objective, wl, runtime, False, cluster_file=cluster_file)
    plan, note = keep_measured_split(plan, cal, wl, runtime, objective)
    replan_pred = serve_prediction(cal, plan.stages, *args)
    return {"files": [str(p) for p in paths], "entries": entries, "objective": objective,
            "measured_split": ms, "before": _pick(before), "after": _pick(after),
            "measured": ms["measured"],
            "replan": {"stages": _stages(plan.stages), "predicted": _pick(replan_pred),
                       "kept_measured": bool(plan.solver.get("kept_measured")),
                       "note": note or ("calibrated re-plan: the measured split's measured "
                                        f"value is not comparable for objective {objective} "
                                        f"at {B} streams (no guard applied)")},
            "source": after.get("source")}


def print_calibration(cal: dict[str, Any]) -> None:
    """Predicted before / after the calibration and measured, for the measured split and the
    re-planned one; then the files and the ratios."""
    from rich.console import Console
    from rich.table import Table

    def row(name, d):
        return [name, "-" if not d.get("throughput_tps") else f"{d['throughput_tps']:.2f}",
                "-" if not d.get("tpot_s") else f"{1e3 * d['tpot_s']:.1f}",
                "-" if not d.get("ttft_s") else f"{1e3 * d['ttft_s']:.1f}"]

    st = " ".join(f"{s['node']}:{s['start_layer']}-{s['end_layer']}"
                  for s in cal["measured_split"]["stages"])
    rp = " ".join(f"{s['node']}:{s['start_layer']}-{s['end_layer']}"
                  for s in cal["replan"]["stages"])
    t = Table(title=f"calibration of {st} (objective {cal['objective']})")
    for i, h in enumerate(("", "tok/s", "tpot ms", "ttft ms")):
        t.add_column(h, justify="left" if i == 0 else "right")
    t.add_row(*row("predicted before (profiles)", cal["before"]))
    t.add_row(*row("predicted after (calibrated)", cal["after"]))
    t.add_row(*row("measured", cal["measured"]))
    t.add_row(*row(f"re-plan {rp} (calibrated)", cal["replan"]["predicted"]))
    c = Console(width=120)
    c.print(t)
    c.print(cal["replan"]["note"])
    for e in cal["entries"]:
        c.print(f"  {e['node']} layers {e['layers'][0]}-{e['layers'][1]} {e['phase']} batch "
                f"{e['batch']}: measured {1e3 * e['measured_s']:.2f} ms (median of "
                f"{e['repeats']}, spread {100 * e['spread']:.0f}%), predicted "
                f"{1e3 * e['predicted_s']:.2f} ms, ratio {e['ratio']:.3f}")
    for p in cal["files"]:
        c.print(f"calibration written: {p} (split-model uses it; --no-calibration ignores it)")
