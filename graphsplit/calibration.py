"""Measured calibration: stage times from a real run fed back into the cost tables.

`exo-bridge run --calibrate` measures, for every stage of the split it ran, the compute of
each pass (input available -> output evaluated, waiting on the network excluded) by phase
(decode, prefill) and batch size, and writes, beside each node's cost table
``<table path stem>.calibration.json``::

    {"format": "mlx-split/calibration", "version": 1, "created": "2026-12-02T02:00:00Z",
     "table": {"path": "fast.json", "config_hash": "sha256:...", "created": "<table's created>"},
     "note": "measured calibration ...",
     "entries": [{"node": "fast", "layers": [0, 8], "phase": "decode", "context": 22,
                  "tokens": 1, "batch": 2, "measured_s": 0.051, "spread": 0.04, "repeats": 22,
                  "predicted_s": 0.047, "ratio": 1.085, "measured": "2026-12-02T02:00:00Z"}],
     "measured_split": {"stages": [...], "runtime": "mlx-pipeline", "pattern": "micro-batch",
                        "workload": {"prompt_tokens": 16, "context_tokens": 22, "streams": 4},
                        "measured": {"tpot_s": ..., "ttft_s": ..., "throughput_tps": ...}}}

`ratio` = measured / predicted, the prediction taken from the UNCALIBRATED table (so a second
calibration never compounds the first). When a cluster file loads the table (graphsplit.cluster,
unless `split-model --no-calibration`), every row of that node's table (blocks, embedding and
head) is scaled by the ratio in the phase and batch it was measured in: decode rows' `decode_s`
for batch 1, or, in a table with a batch grid (cost table version 2, `decode_batch_s`), the grid
columns the batch interpolates between (so the calibrated time at that batch is exactly the
measured one); prefill rows' `prefill_s`. Several entries for one (phase, batch) use the median
ratio. The ratio measured at one context / prompt length is applied at every grid point: a
calibration is a measured correction of the table's level, not a new profile. It is a
MEASUREMENT of the split that ran, and is marked as such: the table's `method.calibration`
names the file, and `split-model` prints that the tables were calibrated.

The closed loop never plans worse than it measured (:func:`keep_measured_split`): when the
re-planned split's calibrated prediction is not better than what the measured split actually
did (same runtime and workload), the measured split is kept and the plan says so.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from graphsplit.plan import RUNTIMES, stages_from_json
from profiler import fields as F
from profiler.errors import UserError
from profiler.files import atomic_write_json, read_json

FORMAT = "mlx-split/calibration"
VERSION = 1
PHASES = ("decode", "prefill")
NOTE = ("measured calibration: stage times of a real run divided by the table's prediction; "
        "applied by split-model to this node's rows in the measured phase and batch "
        "(opt out: split-model --no-calibration)")


class CalibrationError(UserError):
    """A calibration file that cannot be used; one line naming the file and the field."""


_STAGE = F.Obj({"node": F.Str(nonempty=True), "start_layer": F.Int(ge=0),
                "end_layer": F.Int(gt=0)}, required=("node", "start_layer", "end_layer"))
ENTRY = F.Obj({"node": F.Str(nonempty=True), "layers": F.List(F.Int(ge=0)),
               "phase": F.Str(choices=PHASES), "context": F.Int(gt=0), "tokens": F.Int(gt=0),
               "batch": F.Int(gt=0), "measured_s": F.Num(gt=0), "spread": F.Num(ge=0),
               "repeats": F.Int(gt=0), "predicted_s": F.Num(gt=0), "ratio": F.Num(gt=0),
               "measured": F.Str()},
              required=("node", "phase", "batch", "measured_s", "predicted_s", "ratio"),
              name="an object {node, phase, batch, measured_s, predicted_s, ratio}")
MEASURED_SPLIT = F.Obj({"stages": F.List(_STAGE, nonempty=True),
                        "runtime": F.Str(choices=RUNTIMES), "pattern": F.Str(),
                        "workload": F.Obj({"prompt_tokens": F.Int(gt=0),
                                           "context_tokens": F.Int(gt=0),
                                           "streams": F.Int(gt=0), "batch": F.Int(gt=0)}),
                        "measured": F.Obj({"tpot_s": F.Opt(F.Num(gt=0)),
                                           "ttft_s": F.Opt(F.Num(gt=0)),
                                           "throughput_tps": F.Opt(F.Num(gt=0))}),
                        "serving": F.Obj({"pattern": F.Str(), "micro_batch": F.Int(gt=0),
                                          "max_batch": F.Int(gt=0)}),
                        "predicted_before": F.ANY},
                       required=("stages", "runtime", "workload", "measured"))
DOC = F.Obj({"format": F.Str(), "version": F.Int(), "created": F.Str(),
             "table": F.Obj({"path": F.Str(), "config_hash": F.Str(nonempty=True),
                             "created": F.Str()}, required=("config_hash",)),
             "note": F.Str(), "entries": F.List(ENTRY, nonempty=True),
             "measured_split": MEASURED_SPLIT},
            required=("format", "version", "table", "entries"))


def calibration_path(table_path: str | Path) -> Path:
    """`<table path stem>.calibration.json` beside the table."""
    p = Path(table_path)
    return p.with_name(p.stem + ".calibration.json")


def read_calibration(path: str | Path) -> dict[str, Any]:
    """Read and validate a calibration file (CalibrationError: one line naming the field)."""
    p = Path(path)
    what = f"calibration {p}"
    data = read_json(p, what, error=CalibrationError)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CalibrationError(f"{what}: not a calibration (format must be {FORMAT!r}); delete "
                               "it or write it again with `exo-bridge run --calibrate`")
    if data.get("version") != VERSION or isinstance(data.get("version"), bool):
        raise CalibrationError(f"{what}: version {F.shown(data.get('version'))} is not "
                               f"supported (this release reads {VERSION}); re-run "
                               "`exo-bridge run --calibrate`")
    try:
        F.check(data, DOC)
    except F.FieldError as e:
        raise CalibrationError(f"{what}: {e.path}: {e.problem}; fix that field, delete the file "
                               "or pass split-model --no-calibration") from None
    return data


def write_calibration(path: str | Path, doc: dict[str, Any]) -> Path:
    """Validate and write atomically (profiler.files: the old file or the new, never half)."""
    try:
        F.check(doc, DOC)
    except F.FieldError as e:  # our own writer produced it: a bug, say where
        raise ValueError(f"refusing to write calibration {path}: {e}") from None
    return atomic_write_json(path, doc, what=f"calibration {path}")


# ----------------------------------------------------------------------- applying it


def _ratios(entries: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """Median ratio per (phase, batch)."""
    by: dict[tuple[str, int], list[float]] = {}
    for e in entries:
        by.setdefault((e["phase"], int(e["batch"])), []).append(float(e["ratio"]))
    return {k: statistics.median(v) for k, v in by.items()}


def _batch_columns(grid: list[int], batch: int) -> list[int]:
    """Indices of the batch-grid points the time at `batch` is interpolated from (the two
    bracketing points, the point itself, or the last two beyond the grid)."""
    if batch in grid:
        return [grid.index(batch)]
    if len(grid) == 1:
        return [0]
    for i in range(len(grid) - 1):
        if grid[i] < batch < grid[i + 1]:
            return [i, i + 1]
    return [len(grid) - 2, len(grid) - 1] if batch > grid[-1] else [0, 1]


def apply(table, doc: dict[str, Any], source: str):
    """A copy of `table` with its rows scaled by the calibration's ratios (module docstring).
    Every scaled quantity is scaled once, by the median of the ratios that touch it (a batch
    grid column: the entries whose batch it interpolates; a table without a batch grid, or a
    row measured at batch 1 only: every decode entry; prefill: every prefill entry)."""
    t = copy.deepcopy(table)
    ratios = _ratios(doc["entries"])
    grid = list(getattr(t, "decode_batch", None) or [1])
    dec = {b: r for (ph, b), r in ratios.items() if ph == "decode"}
    pre = [r for (ph, _), r in ratios.items() if ph == "prefill"]
    per_col: dict[int, list[float]] = {}
    for b, r in dec.items():
        for j in _batch_columns(grid, b):
            per_col.setdefault(j, []).append(r)
    col_f = {j: statistics.median(v) for j, v in per_col.items()}
    level = statistics.median(dec.values()) if dec else None
    for row in t.rows:
        if pre:
            f = statistics.median(pre)
            row.prefill_s = [x * f for x in row.prefill_s]
        if level is None:
            continue
        cols = getattr(row, "decode_batch_s", None)
        if len(grid) > 1 and cols and len(cols[0]) == len(grid):
            row.decode_batch_s = [[x * col_f.get(j, 1.0) for j, x in enumerate(c)]
                                  for c in cols]
            if grid[0] == 1 and 0 in col_f:  # the batch-1 column is decode_s
                row.decode_s = [x * col_f[0] for x in row.decode_s]
        else:  # one decode level (version 1, or a row measured at batch 1 only)
            row.decode_s = [x * level for x in row.decode_s]
            if cols:
                row.decode_batch_s = [[x * level for x in c] for c in cols]
    t.method = dict(t.method, calibration={
        "file": source, "kind": "measured",
        "ratios": {f"{ph}@batch{b}": round(r, 6) for (ph, b), r in sorted(ratios.items())}})
    return t


def calibrated(table, table_path: str | Path) -> tuple[Any, dict[str, Any] | None]:
    """The hook graphsplit.cluster calls for every table it loads: (table calibrated by the
    file beside it, the calibration) or (table, None) when there is none. A calibration of
    another model or of an earlier profile of this table is refused in one line."""
    cp = calibration_path(table_path)
    if not cp.exists():
        return table, None
    doc = read_calibration(cp)
    want = doc["table"]
    if want["config_hash"] != table.model.config_hash:
        raise CalibrationError(f"calibration {cp}: table.config_hash {want['config_hash'][:19]} "
                               f"is not the model of {table_path} "
                               f"({table.model.config_hash[:19]}); delete it, re-run "
                               "`exo-bridge run --calibrate`, or pass --no-calibration")
    if want.get("created") and table.created and want["created"] != table.created:
        raise CalibrationError(f"calibration {cp}: it calibrates the table created "
                               f"{want['created']}, but {table_path} was profiled again "
                               f"({table.created}); delete it, re-run `exo-bridge run "
                               "--calibrate`, or pass --no-calibration")
    return apply(table, doc, str(cp)), doc


# ---------------------------------------------------------------------- measuring it


def stage_seconds(cluster, stages, s: int, phase: str, x: int, batch: int,
                  protocol: str) -> float:
    """Predicted compute of stage s for one pass (what the runner times for it): its blocks,
    the embedding on rank 0, the head on the last rank unless every rank runs it apart
    (exo-current times the head separately). Decode at context x and `batch` streams (per-step
    time from the table's batch grid when it has one, else its batch-1 rows); prefill of x
    tokens. Derived from the (uncalibrated) tables."""
    st = stages[s]
    t = cluster.node(st.node).table
    rows = [t.row(f"layers.{i}") for i in range(st.start_layer, st.end_layer)]
    if s == 0:
        rows.insert(0, t.embed)
    if s == len(stages) - 1 and protocol != "exo-current":
        rows.append(t.head)
    return sum(_row_seconds(t, r, phase, x, batch) for r in rows)


def _row_seconds(t, row, phase: str, x: int, batch: int) -> float:
    """One row's predicted seconds, exactly as the cost model charges it (its batching)."""
    from graphsplit.batching import decode_seconds

    return t.prefill_time(row, x) if phase == "prefill" else decode_seconds(t, row, x, batch)


def measured_entries(cluster, stages, ranks: list[dict[str, Any]], protocol: str,
                     prompt_tokens: int, context: int, now: str) -> list[dict[str, Any]]:
    """One entry per (stage, phase, batch) the run measured: median compute of its passes
    (`ranks[s]["passes"]`: [phase, batch, compute_s, wait_s]) against the prediction."""
    out = []
    for s, (st, rk) in enumerate(zip(stages, ranks)):
        by: dict[tuple[str, int], list[float]] = {}
        for ph, b, c, _ in rk.get("passes") or []:
            if ph in PHASES:
                by.setdefault((ph, int(b)), []).append(float(c))
        for (ph, b), xs in sorted(by.items()):
            x = context if ph == "decode" else prompt_tokens * b  # a batch of b prompts
            pred = stage_seconds(cluster, stages, s, ph, x, b, protocol)
            med = statistics.median(xs)
            if pred <= 0 or med <= 0:
                continue
            out.append({"node": st.node, "layers": [st.start_layer, st.end_layer],
                        "phase": ph, "context": context if ph == "decode" else prompt_tokens,
                        "tokens": 1 if ph == "decode" else prompt_tokens * b, "batch": b,
                        "measured_s": med, "repeats": len(xs),
                        "spread": (max(xs) - min(xs)) / med if len(xs) > 1 else 0.0,
                        "predicted_s": pred, "ratio": med / pred, "measured": now})
    return out


def write_for_run(cluster, stages, entries: list[dict[str, Any]],
                  measured_split: dict[str, Any], now: str) -> list[Path]:
    """Write each measured node's calibration beside its table (nodes whose table is derived
    from another's are skipped: their times are not that table's). Returns the paths."""
    from profiler.costtable import read_table

    written = []
    for st in stages:
        node = cluster.node(st.node)
        mine = [e for e in entries if e["node"] == st.node]
        if node.estimated or not node.profile or not mine:
            continue
        raw = read_table(node.profile)  # the table as profiled (its own created stamp)
        doc = {"format": FORMAT, "version": VERSION, "created": now,
               "table": {"path": str(node.profile), "config_hash": raw.model.config_hash,
                         "created": raw.created},
               "note": NOTE, "entries": mine, "measured_split": measured_split}
        written.append(write_calibration(calibration_path(node.profile), doc))
    return written


# --------------------------------------------------------------------- the closed loop


def _objective_measured(measured: dict[str, Any], objective: str) -> float | None:
    """The measured split's value in objective units (seconds; throughput as s per token)."""
    if objective == "latency":
        return measured.get("tpot_s")
    if objective == "ttft":
        return measured.get("ttft_s")
    if objective == "throughput":
        tps = measured.get("throughput_tps")
        return 1.0 / tps if tps else None
    return None


def _objective_predicted(pred: dict[str, Any], objective: str) -> float | None:
    if objective == "throughput":
        tps = pred.get("throughput_tps")
        return 1.0 / tps if tps else None
    return pred.get({"latency": "tpot_s", "ttft": "ttft_s"}.get(objective, ""))


def measured_split(cluster, runtime: str, workload) -> dict[str, Any] | None:
    """The newest measured split among the cluster's calibrations that ran under `runtime` at
    this workload (prompt, context, streams) on nodes of this cluster, else None."""
    best = None
    for doc in getattr(cluster, "calibrations", None) or []:
        ms = doc.get("measured_split")
        if not ms or ms["runtime"] != runtime:
            continue
        w = ms["workload"]
        if (w.get("prompt_tokens"), w.get("context_tokens"), w.get("streams")) != (
                workload.prompt_tokens, workload.context_tokens, workload.streams):
            continue
        if any(s["node"] not in cluster.ids for s in ms["stages"]):
            continue
        if best is None or doc.get("created", "") > best[0]:
            best = (doc.get("created", ""), ms)
    return best[1] if best else None


def keep_measured_split(plan, cluster, workload, runtime: str, objective: str):
    """Never re-plan worse than measured. Returns (plan, note or None).

    When the cluster was calibrated and holds a measured split for this runtime and workload:
    if the plan's calibrated prediction is not better (strictly lower in objective units)
    than the measured split's MEASURED value, the plan becomes the measured split (its stages,
    its calibrated prediction) and `solver.kept_measured` says why. O(S) plus one predict."""
    from graphsplit.costmodel import predict

    ms = measured_split(cluster, runtime, workload)
    if ms is None or objective == "pareto":
        return plan, None
    if objective == "latency" and workload.streams > 1:
        return plan, ("calibrated re-plan: the measured split's per-stream TPOT at "
                      f"{workload.streams} streams is not what the latency objective predicts "
                      "(one stream alone): not compared")
    have = _objective_measured(ms["measured"], objective)
    new = _objective_predicted(plan.predicted, objective)
    if have is None or new is None:
        return plan, None
    stages = stages_from_json(ms["stages"], "calibration measured_split")
    same = [(s.node, s.start_layer, s.end_layer) for s in stages] == \
        [(s.node, s.start_layer, s.end_layer) for s in plan.stages]
    unit = "s per token" if objective == "throughput" else "s"
    if new < have or same:
        return plan, (f"calibrated re-plan: predicted {new:.6g} {unit} ({objective}) against the "
                      f"measured split's measured {have:.6g} {unit}"
                      + (" (the same split)" if same else ": the re-planned split is kept"))
    plan.stages = stages
    wl = replace(workload, batch=min(int(ms["workload"].get("batch", 1)), workload.streams))
    pred = predict(cluster, stages, wl, runtime).to_dict()
    pred["derived_from"] = plan.predicted.get("derived_from", "measured cost tables")
    plan.predicted = pred
    plan.workload = {**plan.workload, "batch": wl.batch}
    plan.replicas = None  # the measured split is one pipeline
    if ms.get("serving"):
        plan.serving = dict(ms["serving"])
    why = (f"kept the measured split: the calibrated re-plan predicted {new:.6g} {unit} "
           f"({objective}), not better than the measured split's measured {have:.6g} {unit}")
    plan.solver = dict(plan.solver, kept_measured=True, message=why)
    return plan, why


def summary(plan, cluster) -> list[str]:
    """Lines saying which tables were calibrated (split-model prints them)."""
    lines = []
    for n in cluster.nodes:
        cal = (n.table.method or {}).get("calibration")
        if cal:
            rs = ", ".join(f"{k} x{v:.3f}" for k, v in cal["ratios"].items())
            lines.append(f"calibrated: node {n.id} from {cal['file']} (measured; {rs}); "
                         "--no-calibration plans from the profiles alone")
    return lines
