"""The plan: which node runs which layers, in which order, and what that is predicted to cost.

Contract between the splitter (writes plans: `split-model --json`, `split-model --out`) and the
bridge (reads them: exo legacy / current exo / the MLX runner). Plain Python.

Format "mlx-split/plan", version 1::

    {
      "format": "mlx-split/plan", "version": 1,
      "model": {"name": "llama-3-8b", "n_layers": 32, "config_hash": "sha256:..."},
      "runtime": "exo-current",          # exo-legacy | exo-current | mlx-pipeline
      "objective": "latency",            # latency | ttft | throughput | pareto
      "workload": {"prompt_tokens": 512, "context_tokens": 1024, "streams": 1},
      "stages": [{"node": "studio", "start_layer": 0, "end_layer": 20},
                 {"node": "mini", "start_layer": 20, "end_layer": 32}],
      "predicted": {"tpot_s": ..., "ttft_s": ..., "throughput_tps": ...,
                    "stage_memory_bytes": {"studio": ..., "mini": ...}, ...},
      "solver": {"name": "bitmask-dp", "optimal": true, "message": "...", "solve_s": 0.01},
      "baselines": {"exo-legacy": {"stages": [...], "predicted": {...}},
                    "exo-current": {...}, "even": {...}},
      "cluster_file": "cluster.json" | null,   # for re-planning when nodes change
      "nodes": {"studio": {"memory_bytes": ..., "estimated": false, "profile": "..."}, ...},
      # throughput plans (graphsplit.batching, graphsplit.replicas):
      "serving": {"pattern": "batch-through" | "micro-batch", "micro_batch": 2,
                  "max_batch": 8, "why": "the runtime source the pattern comes from"},
      "replicas": [{"stages": [...], "streams": 5, "serving": {...}, "predicted": {...}}, ...]
    }

`replicas` is present only with k > 1 independent pipelines: the top-level `stages` are
replicas[0]'s, every node is in at most one replica, the streams sum to workload.streams and
the top-level `predicted` sums the replicas' throughput.

Stages are in execution order; layer ranges are HALF-OPEN over transformer blocks
[start_layer, end_layer), contiguous, covering 0..n_layers. The first stage also runs the
embedding, the last the final norm and head (where the runtime keeps them on every rank, their
memory is counted on every stage). All predicted numbers are derived from measured cost tables.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from profiler import fields as F
from profiler.errors import UserError
from profiler.files import atomic_write_json, locked, read_json

FORMAT = "mlx-split/plan"
VERSION = 1
RUNTIMES = ("exo-legacy", "exo-current", "mlx-pipeline")
OBJECTIVES = ("latency", "ttft", "throughput", "pareto")


class PlanError(UserError):
    """A plan file that cannot be used; the message says which file and what is wrong."""


@dataclass(frozen=True)
class Stage:
    node: str
    start_layer: int  # first block, inclusive
    end_layer: int  # one past the last block (half-open)

    @property
    def n_layers(self) -> int:
        return self.end_layer - self.start_layer


@dataclass
class Plan:
    model: dict[str, Any]
    stages: list[Stage]
    predicted: dict[str, Any] = field(default_factory=dict)
    runtime: str = "exo-current"
    objective: str = "latency"
    workload: dict[str, Any] = field(default_factory=dict)
    solver: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    cluster_file: str | None = None
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    serving: dict[str, Any] | None = None  # how the streams are batched (throughput plans)
    replicas: list[dict[str, Any]] | None = None  # k > 1 independent pipelines

    @property
    def n_layers(self) -> int:
        return int(self.model["n_layers"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "runtime": self.runtime,
            "objective": self.objective,
            "workload": self.workload,
            "stages": [asdict(s) for s in self.stages],
            "predicted": self.predicted,
            "solver": self.solver,
            "baselines": self.baselines,
            "cluster_file": self.cluster_file,
            "nodes": self.nodes,
            **({"serving": self.serving} if self.serving else {}),
            **({"replicas": self.replicas} if self.replicas else {}),
        }


# -- the fields of a plan file (profiler.fields) -------------------------------------------------

_NAME = F.Str(nonempty=True)
STAGE = F.Obj({"node": _NAME, "start_layer": F.Int(ge=0, le=100_000),
               "end_layer": F.Int(gt=0, le=100_000)},
              required=("node", "start_layer", "end_layer"),
              name="an object {node, start_layer, end_layer}")
_SECONDS_BY_NODE = F.Map(F.SECONDS)
SIMULATED = F.Obj({"requests": F.Int(ge=0), "ttft_s": F.SECONDS, "tpot_s": F.SECONDS,
                   "throughput_tps": F.Num(ge=0), "overall_tps": F.Num(ge=0),
                   "makespan_s": F.SECONDS, "utilisation": F.Map(F.Num(ge=0)),
                   "busy": F.Map(F.Num(ge=0))})
PREDICTED = F.Obj({
    "tpot_s": F.SECONDS, "ttft_s": F.SECONDS, "throughput_tps": F.Num(ge=0),
    "bottleneck_s": F.SECONDS, "roofline_tpot_s": F.SECONDS,
    "stage_memory_bytes": F.Map(F.BYTES), "stage_capacity_bytes": F.Map(F.BYTES),
    "stage_compute_s": _SECONDS_BY_NODE, "stage_link_s": _SECONDS_BY_NODE,
    "stage_prefill_s": _SECONDS_BY_NODE, "estimated": F.Bool(), "fits": F.Bool(),
    "shortfalls": F.Map(F.BYTES), "derived_from": F.Str(), "extrapolated": F.List(F.Str()),
    "simulated": SIMULATED, "protocol": F.Str(choices=RUNTIMES), "head_pace_s": F.SECONDS,
    "gather_s": F.SECONDS, "message_overhead_s": F.SECONDS, "decode_batch": F.Int(gt=0),
    "micro_batches": F.Int(gt=0), "served_streams": F.Int(gt=0), "cycle_s": F.SECONDS,
    "pareto": F.List(F.Obj({"stages": F.List(STAGE), "tpot_s": F.SECONDS,
                            "bottleneck_s": F.SECONDS, "throughput_tps": F.Num(ge=0)}))},
    name="an object of predictions")
WORKLOAD = F.Obj({"prompt_tokens": F.Int(gt=0), "context_tokens": F.Int(gt=0),
                  "streams": F.Int(gt=0), "sampling_s": F.SECONDS,
                  "prefill_chunks": F.Int(gt=0), "token_bytes": F.Int(gt=0),
                  "batch": F.Int(gt=0)})
SERVING = F.Obj({"pattern": F.Str(choices=("batch-through", "micro-batch")),
                 "micro_batch": F.Int(gt=0), "max_batch": F.Int(gt=0), "why": F.Str()},
                required=("pattern", "micro_batch"),
                name="an object {pattern, micro_batch, max_batch, why}")
REPLICA = F.Obj({"stages": F.List(STAGE, nonempty=True), "streams": F.Int(gt=0),
                 "serving": SERVING, "predicted": PREDICTED},
                required=("stages", "streams"), name="an object {stages, streams, predicted}")
# what a solver proved (graphsplit.result.SplitResult.proven)
PROVEN = ("optimal-all-orders-subsets", "optimal-given-order", "bound")
SOLVER = F.Obj({"name": F.Str(), "optimal": F.Bool(), "status": F.Int(), "message": F.Str(),
                "proven": F.Str(choices=PROVEN), "lower_bound": F.Opt(F.Num()),
                "gap": F.Opt(F.Num(ge=0)),
                "solve_s": F.SECONDS, "objective_value": F.Opt(F.Num()),
                "work": F.Opt(F.Int(ge=0)), "manual": F.Bool(), "layers": F.Str()})
BASELINE = F.Obj({"stages": F.List(STAGE), "predicted": PREDICTED, "error": F.Str()},
                 required=("stages", "predicted"), name="an object {stages, predicted}")
NODE_ENTRY = F.Obj({"memory_bytes": F.BYTES, "available_bytes": F.BYTES,
                    "total_bytes": F.BYTES, "estimated": F.Bool(), "profile": F.Opt(F.Str()),
                    "device": F.Str(), "derive_from": F.Opt(F.Str())})
PLAN = F.Obj({
    "format": F.Str(), "version": F.Int(),
    "model": F.Obj({"name": F.Str(), "n_layers": F.Int(gt=0, le=100_000),
                    "config_hash": F.Str()}, required=("n_layers",)),
    "runtime": F.Str(choices=RUNTIMES), "objective": F.Str(choices=OBJECTIVES),
    "workload": WORKLOAD, "stages": F.List(STAGE, nonempty=True), "predicted": PREDICTED,
    "solver": SOLVER, "baselines": F.Map(BASELINE), "cluster_file": F.Opt(F.Str()),
    "nodes": F.Map(NODE_ENTRY), "serving": SERVING,
    "replicas": F.List(REPLICA, nonempty=True)}, required=("model", "stages"))


def check_stages(stages: list[Stage], n_layers: int, source: str = "plan") -> None:
    """Stages must be contiguous, non-empty, half-open, cover [0, n_layers), one per node."""
    if not stages:
        raise PlanError(f"{source}: no stages")
    seen = set()
    expect = 0
    for i, s in enumerate(stages):
        if s.node in seen:
            raise PlanError(f"{source}: node {s.node!r} appears in two stages; a node runs one "
                            "contiguous range")
        seen.add(s.node)
        if s.start_layer != expect:
            raise PlanError(f"{source}: stage {i} ({s.node}) starts at layer {s.start_layer}, "
                            f"expected {expect}; stages must be contiguous and in order")
        if s.end_layer <= s.start_layer:
            raise PlanError(f"{source}: stage {i} ({s.node}) has an empty range "
                            f"[{s.start_layer}, {s.end_layer})")
        expect = s.end_layer
    if expect != n_layers:
        raise PlanError(f"{source}: stages end at layer {expect} but the model has {n_layers} "
                        "layers; the last stage must end at n_layers")


def stages_from_json(items: Any, source: str) -> list[Stage]:
    if not isinstance(items, list):
        raise PlanError(f"{source}: 'stages' must be a list of {{node, start_layer, end_layer}}")
    out = []
    for i, it in enumerate(items):
        try:
            out.append(Stage(str(it["node"]), int(it["start_layer"]), int(it["end_layer"])))
        except (KeyError, TypeError, ValueError):
            raise PlanError(f"{source}: stage {i} is {it!r}; each stage needs node, start_layer "
                            "and end_layer") from None
    return out


def plan_from_dict(data: Any, source: str = "<dict>") -> Plan:
    """Validate a parsed plan field by field (the one check every command that reads a plan
    goes through) and build it. Raises PlanError: one line naming `source` and the field."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PlanError(f"{source}: not a plan (format must be {FORMAT!r}); write one with "
                        "`split-model CLUSTER --out PLAN.json`")
    if data.get("version") != VERSION or isinstance(data.get("version"), bool):
        raise PlanError(f"{source}: plan version {F.shown(data.get('version'))} is not "
                        f"supported (this release reads version {VERSION}); re-run split-model")
    try:
        F.check(data, PLAN)
    except F.FieldError as e:
        raise PlanError(f"{source}: {e.path}: {e.problem}; fix that field or write the plan "
                        "again with split-model") from None
    n_layers = data["model"]["n_layers"]
    stages = stages_from_json(data["stages"], source)
    check_stages(stages, n_layers, source)
    nodes = data.get("nodes") or {}
    _check_known_nodes(stages, nodes, "stages", source)
    for name, b in (data.get("baselines") or {}).items():
        if b.get("stages"):
            st = stages_from_json(b["stages"], source)
            check_stages(st, n_layers, f"{source}: baselines.{name}")
            _check_known_nodes(st, nodes, f"baselines.{name}.stages", source)
    reps = data.get("replicas")
    if reps:
        _check_replicas(reps, stages, data.get("workload") or {}, n_layers, nodes, source)
    return Plan(
        model=data["model"],
        stages=stages,
        predicted=data.get("predicted", {}),
        runtime=data.get("runtime", "exo-current"),
        objective=data.get("objective", "latency"),
        workload=data.get("workload", {}),
        solver=data.get("solver", {}),
        baselines=data.get("baselines", {}),
        cluster_file=data.get("cluster_file"),
        nodes=nodes,
        serving=data.get("serving"),
        replicas=reps or None,
    )


def _check_replicas(reps: list, stages: list[Stage], workload: dict, n_layers: int,
                    nodes: dict, source: str) -> None:
    """Replicas: each a valid split, no node in two, the top-level stages replicas[0]'s, the
    streams summing to the workload's."""
    seen: dict[str, int] = {}
    for j, r in enumerate(reps):
        st = stages_from_json(r["stages"], source)
        check_stages(st, n_layers, f"{source}: replicas[{j}]")
        _check_known_nodes(st, nodes, f"replicas[{j}].stages", source)
        for s in st:
            if s.node in seen:
                raise PlanError(f"{source}: replicas[{j}]: node {s.node!r} is also in "
                                f"replicas[{seen[s.node]}]; a node serves one replica")
            seen[s.node] = j
        if j == 0 and st != stages:
            raise PlanError(f"{source}: stages differ from replicas[0].stages; the top-level "
                            "stages are the first replica's: write the plan again with "
                            "split-model")
    total = sum(r["streams"] for r in reps)
    if workload.get("streams") is not None and total != workload["streams"]:
        raise PlanError(f"{source}: replicas serve {total} stream(s) but workload.streams is "
                        f"{workload['streams']}; they must add up")


def _check_known_nodes(stages: list[Stage], nodes: dict, where: str, source: str) -> None:
    """A stage must run on a node the plan describes (when it describes any)."""
    if not nodes:
        return
    for i, s in enumerate(stages):
        if s.node not in nodes:
            raise PlanError(f"{source}: {where}[{i}].node: {s.node!r} is not one of the plan's "
                            f"nodes ({', '.join(sorted(nodes))}); fix the name or write the "
                            "plan again with split-model")


def read_plan(path: str | Path) -> Plan:
    """Read and validate a plan. Its `cluster_file` is resolved: as written when it exists from
    the working directory, else relative to the plan file's directory."""
    p = Path(path)
    data = read_json(p, f"plan {p}", error=PlanError,
                     missing=f"write one with `split-model CLUSTER --out {p}`")
    plan = plan_from_dict(data, source=f"plan {p}")
    cf = plan.cluster_file
    if cf and not Path(cf).exists() and (p.resolve().parent / cf).exists():
        # split-model records the path it was given; from elsewhere, look beside the plan
        plan.cluster_file = str(p.resolve().parent / cf)
    return plan


def write_plan(plan: Plan, path: str | Path) -> Path:
    """Validate and write atomically, under the plan's lock (two writers of one plan each
    write a whole plan, one after the other; neither is half-written or lost unreported)."""
    what = f"plan {path}"
    data = plan.to_dict()
    plan_from_dict(data, source=what)
    with locked(path, what, wait_s=60.0):
        atomic_write_json(path, data, what=what)
    return Path(path)
