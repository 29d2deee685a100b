"""`exo-bridge compare PLAN`: exo legacy's split, current exo's split and the measured one.

For the plan's cluster: the layer ranges per node and the predicted time per output token, time
to first token and throughput of each split. The numbers come from the plan's `baselines` (the
splitter computed them with the same cost model); a missing one, or all with `--repredict`, is
recomputed with graphsplit from the plan's `cluster_file` (cost tables are measured, so the
prediction is the same model for all three).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphsplit.plan import Plan, Stage, read_plan, stage_dict, stages_from_json
from profiler import options as o
from profiler.errors import UserError

ROWS = (("exo-legacy", "exo legacy (memory-weighted)"),
        ("exo-current", "exo current (available RAM)"),
        ("measured", "measured (this plan)"))


@dataclass
class Split:
    key: str
    label: str
    stages: list[Stage]
    predicted: dict[str, Any] = field(default_factory=dict)
    source: str = "plan"
    error: str = ""  # why there is no split (e.g. "exo would refuse: ...")


def _workload(plan: Plan):
    from graphsplit.costmodel import Workload

    wl = plan.workload or {}
    return Workload(int(wl.get("prompt_tokens", 512)), int(wl.get("context_tokens", 1024)),
                    int(wl.get("streams", 1)), batch=int(wl.get("batch", 1)))


def _cluster(plan: Plan):
    if not plan.cluster_file:
        return None
    p = Path(plan.cluster_file)
    if not p.exists():
        return None
    from graphsplit.cluster import load_cluster

    return load_cluster(p)


def splits(plan: Plan, repredict: bool = False) -> list[Split]:
    """The three splits with their predictions, from the plan and/or its cluster file."""
    out: list[Split] = []
    cluster = None
    need_cluster = repredict or any(k not in (plan.baselines or {}) for k, _ in ROWS[:2])
    if need_cluster:
        cluster = _cluster(plan)
        if repredict and cluster is None:
            raise UserError(f"--repredict needs the plan's cluster file, "
                            f"{plan.cluster_file or '(none recorded)'}; run from the directory "
                            "the plan was made in, or re-plan with split-model")
    for key, label in ROWS:
        if key == "measured":
            if (plan.solver or {}).get("manual"):
                label = "manual (this plan)"
            s = Split(key, label, list(plan.stages), dict(plan.predicted or {}), "plan")
        elif key in (plan.baselines or {}) and not repredict:
            b = plan.baselines[key]
            s = Split(key, label, stages_from_json(b.get("stages"), f"plan baseline {key}"),
                      dict(b.get("predicted") or {}), "plan", str(b.get("error") or ""))
        elif cluster is not None:
            from graphsplit.baselines import BASELINES

            try:
                s = Split(key, label, list(BASELINES[key](cluster)), {}, "re-predicted")
            except UserError as e:  # exo would refuse this cluster
                s = Split(key, label, [], {}, "re-predicted", str(e))
        else:
            s = Split(key, label, [], {}, "missing")
        if cluster is not None and s.stages and (repredict or not s.predicted):
            from graphsplit.costmodel import predict

            s.predicted = predict(cluster, s.stages, _workload(plan), plan.runtime).to_dict()
            s.source = f"re-predicted from {plan.cluster_file}"
        out.append(s)
    return out


def _fmt(v: Any, scale: float = 1.0, digits: int = 2) -> str:
    if isinstance(v, (int, float)) and v == v and v not in (float("inf"),):
        return f"{v * scale:.{digits}f}"
    return "-"


def render(plan: Plan, rows: list[Split]) -> str:
    wl = plan.workload or {}
    lines = [f"model {plan.model.get('name', '?')} ({plan.n_layers} layers), runtime "
             f"{plan.runtime}, objective {plan.objective}, workload prompt "
             f"{wl.get('prompt_tokens', '?')} / context {wl.get('context_tokens', '?')} / "
             f"streams {wl.get('streams', '?')}", ""]
    lines.append(f"{'split':<30} {'tpot ms':>10} {'ttft s':>10} {'tok/s':>10}  layers per node")
    base = next((r for r in rows if r.key == "exo-current" and r.predicted.get("tpot_s")), None)
    for r in rows:
        p = r.predicted
        layers = ", ".join(f"{'+'.join(s.members)}[{s.start_layer},{s.end_layer})"
                           for s in r.stages) \
            or f"({r.error or 'not in the plan; no cluster file to compute it'})"
        lines.append(f"{r.label:<30} {_fmt(p.get('tpot_s'), 1000):>10} "
                     f"{_fmt(p.get('ttft_s'), 1, 3):>10} {_fmt(p.get('throughput_tps'), 1, 1):>10}"
                     f"  {layers}")
    meas = rows[-1].predicted
    if base and meas.get("tpot_s"):
        parts = [f"time per output token {base.predicted['tpot_s'] / meas['tpot_s']:.2f}x"]
        if base.predicted.get("ttft_s") and meas.get("ttft_s"):
            parts.append(f"time to first token {base.predicted['ttft_s'] / meas['ttft_s']:.2f}x")
        if base.predicted.get("throughput_tps") and meas.get("throughput_tps"):
            ratio = meas["throughput_tps"] / base.predicted["throughput_tps"]
            parts.append(f"throughput {ratio:.2f}x")
        lines.append("")
        lines.append("measured vs exo current (above 1 = the measured split is better): "
                     + ", ".join(parts))
    srcs = sorted({r.source for r in rows})
    lines.append(f"(predictions: {', '.join(srcs)})")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("plan", type=o.path("plan file"), help="plan file from `split-model --out`")
    ap.add_argument("--repredict", action="store_true",
                    help="recompute every split's prediction from the plan's cluster file")
    ap.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    plan = read_plan(args.plan)
    rows = splits(plan, args.repredict)
    if args.json:
        print(json.dumps({r.key: {"label": r.label, "source": r.source,
                                  "stages": [stage_dict(s) for s in r.stages],
                                  "predicted": r.predicted,
                                  **({"error": r.error} if r.error else {})}
                          for r in rows}, indent=2))
    else:
        print(render(plan, rows))
    return 0
