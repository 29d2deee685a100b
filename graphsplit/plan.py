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
      # a tensor-parallel stage (graphsplit.hybrid): a group with whole KV heads each
      #   {"node": "a", "start_layer": 0, "end_layer": 20,
      #    "tensor": {"nodes": ["a", "b"], "kv_heads": [6, 2], "mlp_columns": [10752, 3584]}}
      "predicted": {"tpot_s": ..., "ttft_s": ..., "throughput_tps": ...,
                    "stage_memory_bytes": {"studio": ..., "mini": ...}, ...},
      "solver": {"name": "bitmask-dp", "optimal": true, "message": "...", "solve_s": 0.01},
      "baselines": {"exo-legacy": {"stages": [...], "predicted": {...}},
                    "exo-current": {...}, "even": {...}},
      "cluster_file": "cluster.json" | null,   # for re-planning when nodes change
      "nodes": {"studio": {"memory_bytes": ..., "estimated": false, "profile": "..."}, ...}
    }

Stages are in execution order; layer ranges are HALF-OPEN over transformer blocks
[start_layer, end_layer), contiguous, covering 0..n_layers. The first stage also runs the
embedding, the last the final norm and head (where the runtime keeps them on every rank, their
memory is counted on every stage). All predicted numbers are derived from measured cost tables.

A stage carrying `tensor` runs its layers tensor-parallel over `tensor.nodes` (`node` is the
first of them: it receives from and sends to the neighbouring stages); member i holds
`kv_heads[i]` whole KV heads (with their query heads) and `mlp_columns[i]` MLP columns. Shares
are >= 1, sum to `model.n_kv_heads` (and the columns to `model.intermediate_size`), members are
distinct and in no other stage. Readers that predate it see a one-node stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
class TensorSpec:
    """A tensor-parallel group: member i holds kv_heads[i] KV heads and mlp_columns[i] columns."""
    nodes: tuple[str, ...]
    kv_heads: tuple[int, ...]
    mlp_columns: tuple[int, ...]

    def __post_init__(self):
        for k in ("nodes", "kv_heads", "mlp_columns"):
            object.__setattr__(self, k, tuple(getattr(self, k)))

    @property
    def equal(self) -> bool:
        return len(set(self.kv_heads)) == 1

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": list(self.nodes), "kv_heads": list(self.kv_heads),
                "mlp_columns": list(self.mlp_columns)}


@dataclass(frozen=True)
class Stage:
    node: str
    start_layer: int  # first block, inclusive
    end_layer: int  # one past the last block (half-open)
    tensor: TensorSpec | None = None  # a tensor-parallel group (graphsplit.hybrid)

    def __post_init__(self):
        if isinstance(self.tensor, dict):  # a stage rebuilt from its JSON with Stage(**d)
            object.__setattr__(self, "tensor", TensorSpec(**self.tensor))

    @property
    def n_layers(self) -> int:
        return self.end_layer - self.start_layer

    @property
    def members(self) -> tuple[str, ...]:
        """The nodes that run this stage (the group, or the one node)."""
        return self.tensor.nodes if self.tensor is not None else (self.node,)


def stage_dict(s: Stage) -> dict[str, Any]:
    """A stage as JSON: `tensor` only where the stage has one (plain stages stay as before)."""
    d = {"node": s.node, "start_layer": s.start_layer, "end_layer": s.end_layer}
    if s.tensor is not None:
        d["tensor"] = s.tensor.to_dict()
    return d


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
            "stages": [stage_dict(s) for s in self.stages],
            "predicted": self.predicted,
            "solver": self.solver,
            "baselines": self.baselines,
            "cluster_file": self.cluster_file,
            "nodes": self.nodes,
        }


# -- the fields of a plan file (profiler.fields) -------------------------------------------------

_NAME = F.Str(nonempty=True)
TENSOR = F.Obj({"nodes": F.List(_NAME, nonempty=True),
                "kv_heads": F.List(F.Int(ge=1, le=1_000_000), nonempty=True),
                "mlp_columns": F.List(F.Int(ge=1, le=10**9), nonempty=True)},
               required=("nodes", "kv_heads", "mlp_columns"),
               name="an object {nodes, kv_heads, mlp_columns}")
STAGE = F.Obj({"node": _NAME, "start_layer": F.Int(ge=0, le=100_000),
               "end_layer": F.Int(gt=0, le=100_000), "tensor": F.Opt(TENSOR)},
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
    "gather_s": F.SECONDS, "message_overhead_s": F.SECONDS,
    "pareto": F.List(F.Obj({"stages": F.List(STAGE), "tpot_s": F.SECONDS,
                            "bottleneck_s": F.SECONDS, "throughput_tps": F.Num(ge=0)}))},
    name="an object of predictions")
WORKLOAD = F.Obj({"prompt_tokens": F.Int(gt=0), "context_tokens": F.Int(gt=0),
                  "streams": F.Int(gt=0), "sampling_s": F.SECONDS,
                  "prefill_chunks": F.Int(gt=0), "token_bytes": F.Int(gt=0)})
SOLVER = F.Obj({"name": F.Str(), "optimal": F.Bool(), "status": F.Int(), "message": F.Str(),
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
                    "config_hash": F.Str(), "n_kv_heads": F.Int(gt=0, le=1_000_000),
                    "intermediate_size": F.Int(gt=0, le=10**9)}, required=("n_layers",)),
    "runtime": F.Str(choices=RUNTIMES), "objective": F.Str(choices=OBJECTIVES),
    "workload": WORKLOAD, "stages": F.List(STAGE, nonempty=True), "predicted": PREDICTED,
    "solver": SOLVER, "baselines": F.Map(BASELINE), "cluster_file": F.Opt(F.Str()),
    "nodes": F.Map(NODE_ENTRY)}, required=("model", "stages"))


def check_stages(stages: list[Stage], n_layers: int, source: str = "plan",
                 n_kv_heads: int | None = None, intermediate_size: int | None = None) -> None:
    """Stages must be contiguous, non-empty, half-open, cover [0, n_layers), one per node (a
    tensor group's members count as the stage's nodes; `check_tensor` checks its shares)."""
    if not stages:
        raise PlanError(f"{source}: no stages")
    seen = set()
    expect = 0
    for i, s in enumerate(stages):
        if s.tensor is not None:
            check_tensor(s, i, source, n_kv_heads, intermediate_size)
        for m in s.members:
            if m in seen:
                raise PlanError(f"{source}: node {m!r} appears in two stages; a node runs one "
                                "contiguous range")
            seen.add(m)
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


def check_tensor(s: Stage, i: int, source: str, n_kv_heads: int | None = None,
                 intermediate_size: int | None = None) -> None:
    """A tensor stage's group: distinct members, `node` first, one whole share (>= 1 KV head,
    >= 1 MLP column) per member, the shares summing to the model's KV heads and columns (when
    the plan names them). One PlanError line naming the stage and the field otherwise."""
    t = s.tensor
    where = f"{source}: stages[{i}].tensor"
    if not len(t.nodes) == len(t.kv_heads) == len(t.mlp_columns):
        raise PlanError(f"{where}: nodes, kv_heads and mlp_columns have {len(t.nodes)}, "
                        f"{len(t.kv_heads)} and {len(t.mlp_columns)} entries; give one share "
                        "per node")
    if len(set(t.nodes)) != len(t.nodes):
        raise PlanError(f"{where}.nodes: {list(t.nodes)} names a node twice; a group's nodes "
                        "are distinct")
    if t.nodes[0] != s.node:
        raise PlanError(f"{where}.nodes: the first node is {t.nodes[0]!r} but the stage's node "
                        f"is {s.node!r}; the stage's node must be the group's first member")
    for key, shares in (("kv_heads", t.kv_heads), ("mlp_columns", t.mlp_columns)):
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in shares):
            raise PlanError(f"{where}.{key}: {list(shares)}: every member needs a whole share "
                            ">= 1; a share of 0 cannot be cut: drop that node from the group")
    for key, shares, total in (("kv_heads", t.kv_heads, n_kv_heads),
                               ("mlp_columns", t.mlp_columns, intermediate_size)):
        if total is not None and sum(shares) != total:
            extra = (f"; {len(t.nodes)} ranks cannot share {total} heads" if key == "kv_heads"
                     and len(t.nodes) > total else "")
            raise PlanError(f"{where}.{key}: {list(shares)} sums to {sum(shares)} but the model "
                            f"has {total}{extra}; the shares must add up to the model's "
                            f"{'KV heads' if key == 'kv_heads' else 'MLP columns'}")


def stages_from_json(items: Any, source: str) -> list[Stage]:
    if not isinstance(items, list):
        raise PlanError(f"{source}: 'stages' must be a list of {{node, start_layer, end_layer}}")
    out = []
    for i, it in enumerate(items):
        try:
            t = it.get("tensor")
            out.append(Stage(str(it["node"]), int(it["start_layer"]), int(it["end_layer"]),
                             None if t is None else TensorSpec(
                                 [str(n) for n in t["nodes"]], list(t["kv_heads"]),
                                 list(t["mlp_columns"]))))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise PlanError(f"{source}: stage {i} is {it!r}; each stage needs node, start_layer "
                            "and end_layer (and a tensor stage nodes, kv_heads, "
                            "mlp_columns)") from None
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
    kv, cols = data["model"].get("n_kv_heads"), data["model"].get("intermediate_size")
    if any(s.tensor is not None for s in stages) and kv is None:
        raise PlanError(f"{source}: model.n_kv_heads: missing, and the plan has tensor stages "
                        "whose shares must add up to it; write the plan again with split-model")
    check_stages(stages, n_layers, source, kv, cols)
    nodes = data.get("nodes") or {}
    _check_known_nodes(stages, nodes, "stages", source)
    for name, b in (data.get("baselines") or {}).items():
        if b.get("stages"):
            st = stages_from_json(b["stages"], source)
            check_stages(st, n_layers, f"{source}: baselines.{name}", kv, cols)
            _check_known_nodes(st, nodes, f"baselines.{name}.stages", source)
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
    )


def _check_known_nodes(stages: list[Stage], nodes: dict, where: str, source: str) -> None:
    """A stage must run on a node the plan describes (when it describes any)."""
    if not nodes:
        return
    for i, s in enumerate(stages):
        for m in s.members:
            if m not in nodes:
                field_ = "node" if m == s.node else "tensor.nodes"
                raise PlanError(f"{source}: {where}[{i}].{field_}: {m!r} is not one of the "
                                f"plan's nodes ({', '.join(sorted(nodes))}); fix the name or "
                                "write the plan again with split-model")


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
