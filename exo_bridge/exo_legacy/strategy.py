"""Legacy exo: a `PartitioningStrategy` that runs the measured split (standard library only).

This module runs INSIDE legacy exo's process, in exo's own Python environment, so it imports
nothing outside the standard library (and exo's own classes when they are there):
`exo-bridge exo-legacy install --python EXO_PYTHON` copies it, with `graphsplit/exo_rules.py`,
into exo's environment as a stand-alone distribution that declares no dependencies. Re-planning
(the solver, cost tables) runs in the toolkit's own environment: in this process when the
toolkit is importable, else as a subprocess of the toolkit's Python (`replan.py`).

Legacy exo asks its strategy for `Partition(node_id, start, end)` fractions and turns them into
layers with its own truncation rule (`graphsplit.exo_rules.exo_truncation_map`), then indexes the
resulting shards by the partition's POSITION. A boundary k/n written as a float can truncate to
k - 1, so every inner boundary b is written as the MIDDLE of layer b, (b + 0.5) / n, which
truncates to b; the first start is exactly 0.0 and the last end exactly 1.0. Every answer is
checked under exo's rule before exo sees it, and no answer contains a partition that truncates
to an empty shard, for the plan's layer count n or any larger one (each stage of L >= 1 layers
spans L / n >= 1 / n' of the model). For a model with fewer layers than the plan's no split can
promise that (stages [0,1) + [1,n) need a first boundary below 2/n; n/2 layers need it at 2/n or
above): a plan is for one model.

Decision when the topology and the plan disagree (a node in one and not the other):

1. re-plan from the cost tables for exactly the nodes present, else
2. fall back to a memory-weighted split (exo's order and weights; layer counts by largest
   remainder, at least one layer per node, so no shard is empty), with a warning naming the nodes.

Every node runs this code on the same inputs and gets the same answer: nodes are sorted by id and
the solver is deterministic. Results are cached per topology (exo calls `partition` often).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

try:  # the stand-alone distribution installed into exo's environment ships the rules beside us
    from ._exo_rules import exo_legacy_fractions, exo_truncation_map, proportional_counts
except ImportError:  # inside the toolkit
    from graphsplit.exo_rules import exo_legacy_fractions, exo_truncation_map, proportional_counts

try:  # the toolkit's one-line error class when it is there (exit code 2, no traceback)
    from profiler.errors import UserError as _ErrorBase
except ImportError:
    _ErrorBase = ValueError  # type: ignore[misc,assignment]


class StrategyError(_ErrorBase):  # type: ignore[misc,valid-type]
    """Bad strategy input (plan, tables, node map); the message says what and how to fix it."""


try:  # exo's own classes when legacy exo is installed in this Python
    from exo.topology.partitioning_strategy import Partition, PartitioningStrategy  # type: ignore

    EXO_INSTALLED = True
except Exception:  # not installed, or current exo (the rewrite has no such module)
    EXO_INSTALLED = False

    @dataclass
    class Partition:  # type: ignore[no-redef]
        """A half-open fraction [start, end) of the model that one node runs (exo's shape)."""

        node_id: str
        start: float
        end: float

    class PartitioningStrategy(ABC):  # type: ignore[no-redef]
        """exo's interface: one method, `partition(topology) -> List[Partition]`."""

        @abstractmethod
        def partition(self, topology) -> List[Partition]:
            ...


MB = 2 ** 20
PLAN_FORMAT = "mlx-split/plan"
REPLAN_TIMEOUT_S = 300


try:  # the toolkit's plan stage when it is there, so answers compare equal to plans
    from graphsplit.plan import Stage as Span
except ImportError:
    @dataclass(frozen=True)
    class Span:  # type: ignore[no-redef]
        """One stage: `node` runs blocks [start_layer, end_layer) (half-open, as in the plan)."""

        node: str
        start_layer: int
        end_layer: int


@dataclass
class PlanView:
    """The parts of a plan file the strategy uses (graphsplit.plan is not here in exo's env)."""

    n_layers: int
    stages: List[Span]
    nodes: dict = field(default_factory=dict)
    objective: str = "latency"
    workload: dict = field(default_factory=dict)
    cluster_file: Optional[str] = None


# ---------------------------------------------------------------- fractions <-> layers


def boundary_fraction(b: int, n_layers: int) -> float:
    """The fraction for a stage boundary at block `b` (0 <= b <= n): exact 0/1 at the ends,
    the middle of layer b inside, so exo's truncation lands on b for every n."""
    if b <= 0:
        return 0.0
    if b >= n_layers:
        return 1.0
    return (b + 0.5) / n_layers


def exo_map(partitions: Sequence[Any], n_layers: int) -> List[Tuple[str, int, int]]:
    """exo legacy's fraction -> layer rule on Partitions: `(node_id, start, end_inclusive)`."""
    return exo_truncation_map([(p.node_id, p.start, p.end) for p in partitions], n_layers)


def exo_map_stages(partitions: Sequence[Any], n_layers: int) -> List[Span]:
    """`exo_map` as half-open stages (the plan's convention)."""
    return [Span(node, s, e + 1) for node, s, e in exo_map(partitions, n_layers)]


def check_chain(stages: Sequence[Any], n_layers: int, source: str) -> None:
    """Stages must be non-empty, contiguous from 0 to n_layers, one per node."""
    if not stages:
        raise StrategyError(f"{source}: no stages")
    expect, seen = 0, set()
    for i, s in enumerate(stages):
        if s.node in seen:
            raise StrategyError(f"{source}: node {s.node!r} appears in two stages")
        seen.add(s.node)
        if s.start_layer != expect or s.end_layer <= s.start_layer:
            raise StrategyError(f"{source}: stage {i} ({s.node}) is [{s.start_layer}, "
                                f"{s.end_layer}); stages must be non-empty and contiguous from "
                                f"layer {expect}")
        expect = s.end_layer
    if expect != n_layers:
        raise StrategyError(f"{source}: stages end at layer {expect}, the model has {n_layers}")


def stages_to_partitions(stages: Sequence[Any], n_layers: int) -> list:
    """Partitions (exo's class when installed) in execution order that exo maps back to exactly
    `stages`, one non-empty shard per partition. Raises StrategyError on an invalid split."""
    stages = [Span(s.node, s.start_layer, s.end_layer) for s in stages]
    check_chain(stages, n_layers, "split")
    parts = [Partition(s.node, boundary_fraction(s.start_layer, n_layers),
                       boundary_fraction(s.end_layer, n_layers)) for s in stages]
    back = exo_map_stages(parts, n_layers)
    if back != stages:  # cannot happen with middle-of-layer fractions; guard anyway
        raise StrategyError(f"internal: fractions for {stages} map to {back} under exo's rule")
    return parts


def memory_weighted_stages(nodes: Iterable[Tuple[str, float]], n_layers: int) -> List[Span]:
    """The fallback: exo's order (memory, id descending) and weights (memory in MB), as whole
    layers with at least one per node, so no shard is empty; nodes past the n_layers-th run
    none (exo's own fractions would give them empty shards)."""
    order = sorted(nodes, key=lambda x: (x[1], x[0]), reverse=True)[:n_layers]
    counts = proportional_counts(n_layers, [m for _, m in order])
    out, a = [], 0
    for (nid, _), k in zip(order, counts):
        out.append(Span(nid, a, a + k))
        a += k
    return out


def memory_weighted_partitions(nodes: Iterable[Tuple[str, float]]) -> list:
    """exo legacy's own default split (RingMemoryWeighted) as Partitions, unchanged (for
    comparison; it can truncate to empty shards, which the fallback above never does)."""
    return [Partition(nid, a, b) for nid, a, b in exo_legacy_fractions(list(nodes))]


# ---------------------------------------------------------------- inputs


def read_plan_view(plan: Any) -> PlanView:
    """A PlanView from a plan file path, a plan dict, or graphsplit's Plan object."""
    if isinstance(plan, PlanView):
        return plan
    source = "plan"
    where = None
    if isinstance(plan, (str, Path)):
        source, where = f"plan {plan}", Path(plan).resolve().parent
        try:
            plan = json.loads(Path(plan).read_text())
        except OSError as e:
            raise StrategyError(f"{source}: cannot read it ({e.strerror or e}); write one with "
                                "`split-model CLUSTER --out PLAN.json`") from None
        except ValueError as e:
            raise StrategyError(f"{source}: not valid JSON ({e})") from None
    if isinstance(plan, dict):
        if plan.get("format") != PLAN_FORMAT:
            raise StrategyError(f"{source}: not a plan (format must be {PLAN_FORMAT!r})")
        try:
            n = int(plan["model"]["n_layers"])
            stages = [Span(str(s["node"]), int(s["start_layer"]), int(s["end_layer"]))
                      for s in plan["stages"]]
        except (KeyError, TypeError, ValueError):
            raise StrategyError(f"{source}: needs model.n_layers and stages of "
                                "{node, start_layer, end_layer}") from None
        view = PlanView(n, stages, dict(plan.get("nodes") or {}),
                        plan.get("objective") or "latency", dict(plan.get("workload") or {}),
                        plan.get("cluster_file"))
    else:  # graphsplit.plan.Plan (duck-typed)
        view = PlanView(int(plan.n_layers),
                        [Span(s.node, s.start_layer, s.end_layer) for s in plan.stages],
                        dict(plan.nodes or {}), plan.objective, dict(plan.workload or {}),
                        plan.cluster_file)
    raw = plan["stages"] if isinstance(plan, dict) else plan.stages
    tens = [i for i, s in enumerate(raw) if (s.get("tensor") if isinstance(s, dict)
                                             else getattr(s, "tensor", None))]
    if tens:  # a tensor-parallel stage (graphsplit.hybrid): not something legacy exo can run
        raise StrategyError(f"{source}: stage {tens[0]} is tensor-parallel but legacy exo has no "
                            "tensor parallelism (a shard is one node's layer range); run it "
                            "with `exo-bridge run`, or split without --hybrid")
    check_chain(view.stages, view.n_layers, source)
    cf = view.cluster_file
    if where is not None and cf and not Path(cf).exists() and (where / cf).exists():
        view.cluster_file = str(where / cf)  # split-model records the path it was given
    return view


def topology_nodes(topology: Any) -> List[Tuple[str, int]]:
    """`[(node_id, memory_MB)]` sorted by id, from exo's `Topology.all_nodes()`."""
    out = []
    for node_id, caps in topology.all_nodes():
        out.append((str(node_id), int(getattr(caps, "memory", 0) or 0)))
    return sorted(out)


def _table_layers(tables: Any) -> Optional[int]:
    """The model's layer count from the first cost table (object or JSON file), if any."""
    items = list(tables.values()) if isinstance(tables, dict) else list(tables or [])
    for t in items:
        if hasattr(t, "n_layers"):
            return int(t.n_layers)
        p = Path(t)
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        for f in files:
            try:
                return int(json.loads(f.read_text())["model"]["n_layers"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return None


# ---------------------------------------------------------------- re-planning


def _installed_info() -> dict:
    """What `exo-bridge exo-legacy install` recorded beside this file (the toolkit's Python)."""
    try:
        return json.loads((Path(__file__).parent / "_installed.json").read_text())
    except (OSError, ValueError):
        return {}


def default_replanner() -> Optional[Callable[[dict], dict]]:
    """How to re-plan from here: in this process when the toolkit is importable, else a
    subprocess of the toolkit's Python (EXO_BRIDGE_TOOLKIT_PYTHON, or the one recorded at
    install), else None (the strategy falls back with a warning)."""
    try:
        from exo_bridge.exo_legacy.replan import replan  # type: ignore

        return replan
    except ImportError:
        pass
    info = _installed_info()
    python = os.environ.get("EXO_BRIDGE_TOOLKIT_PYTHON") or info.get("toolkit_python")
    if not python:
        return None
    return lambda request: replan_subprocess(python, request, info.get("toolkit_path"))


def replan_subprocess(python: str, request: dict, toolkit_path: Optional[str] = None) -> dict:
    """Run `python -m exo_bridge.exo_legacy.replan` with `request` as JSON on stdin."""
    env = dict(os.environ)
    if toolkit_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (toolkit_path, env.get("PYTHONPATH"))
                                            if p)
    try:
        cp = subprocess.run([python, "-m", "exo_bridge.exo_legacy.replan"],
                            input=json.dumps(request), capture_output=True, text=True, env=env,
                            timeout=REPLAN_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"cannot run the toolkit's Python {python} ({e})"}
    try:
        return json.loads(cp.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        err = (cp.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the toolkit's Python {python} failed to re-plan ({err})"}


# ---------------------------------------------------------------- the strategy


@dataclass
class Decision:
    """What the strategy did for one topology: `source` is plan | replan | fallback."""

    source: str
    stages: Optional[List[Span]]
    partitions: list
    message: str = ""


class MeasuredPartitioningStrategy(PartitioningStrategy):
    """exo legacy `PartitioningStrategy` that returns the measured split.

    plan: a plan file path, its dict, or graphsplit's Plan. tables: cost tables for re-planning
    (`{host: CostTable}` in the toolkit, or paths of files/directories); when omitted, the plan's
    `cluster_file`. node_map: `{plan node name: exo node id}` (or run exo with `--node-id NAME`).
    replanner: `request dict -> {"stages": ...} | {"error": ...}` (default: `default_replanner`).
    warn: where warnings go (stderr).
    """

    def __init__(self, plan: Any = None, tables: Any = None,
                 node_map: Optional[dict] = None, objective: Optional[str] = None,
                 workload: Optional[dict] = None, use_all_nodes: bool = False,
                 warn: Optional[Callable[[str], None]] = None,
                 replanner: Optional[Callable[[dict], dict]] = None) -> None:
        if plan is None and tables is None:
            raise StrategyError("the measured strategy needs a plan file (--plan) or cost "
                                "tables (--tables) to work from")
        self.plan: Optional[PlanView] = read_plan_view(plan) if plan is not None else None
        self.node_map = dict(node_map or {})
        self.tables = tables
        self.objective = objective or (self.plan.objective if self.plan else "latency")
        self.workload = dict(workload or (self.plan.workload if self.plan else {}) or {})
        self.use_all_nodes = use_all_nodes
        self.n_layers = self.plan.n_layers if self.plan else _table_layers(tables)
        self.warn = warn or (lambda msg: print(f"exo-bridge: warning: {msg}", file=sys.stderr))
        self.replanner = replanner
        self._cache: dict = {}
        self.last_decision: Optional[Decision] = None

    def to_exo(self, name: str) -> str:
        """A plan/table node name as exo's node id."""
        return self.node_map.get(name, name)

    def partition(self, topology: Any) -> list:
        key = tuple(topology_nodes(topology))
        if key not in self._cache:
            self._cache[key] = self.decide(list(key))
            if self._cache[key].message:
                self.warn(self._cache[key].message)
        self.last_decision = self._cache[key]
        return list(self.last_decision.partitions)

    def decide(self, nodes: List[Tuple[str, int]]) -> Decision:
        """The decision for `[(exo node id, memory MB)]`, deterministic in its inputs."""
        present = [n for n, _ in nodes]
        if not present:
            return Decision("fallback", None, [], "exo's topology is empty; nothing to split")
        if self.plan is not None:
            d = self._from_plan(present)
            if isinstance(d, Decision):
                return d
            reason = d
        else:
            reason = "no plan given (planning from cost tables)"
        replanned = self._replan(nodes)
        if isinstance(replanned, Decision):
            replanned.message = f"{reason}; re-planned from cost tables: {replanned.message}"
            return replanned
        return self._fallback(nodes, f"{reason}; {replanned}")

    def _from_plan(self, present: List[str]):
        plan = self.plan
        planned = [self.to_exo(s.node) for s in plan.stages]
        known = set(planned) | {self.to_exo(n) for n in plan.nodes}
        missing = sorted(set(planned) - set(present))
        extra = sorted(set(present) - known)
        if missing or extra:
            why = []
            if missing:
                why.append(f"planned nodes not in exo's topology: {', '.join(missing)}")
            if extra:
                why.append(f"nodes in exo's topology not in the plan: {', '.join(extra)}")
            return "; ".join(why)
        stages = [Span(self.to_exo(s.node), s.start_layer, s.end_layer) for s in plan.stages]
        idle = sorted(set(present) - set(planned))
        msg = (f"nodes {', '.join(idle)} run no layers in this plan; send requests to "
               f"{planned[0]}" if idle else "")
        return Decision("plan", stages, stages_to_partitions(stages, plan.n_layers), msg)

    def _fallback(self, nodes: List[Tuple[str, int]], reason: str) -> Decision:
        if not self.n_layers:  # no plan and no readable table: exo's own fractions, as exo
            return Decision("fallback", None, memory_weighted_partitions(nodes),
                            f"{reason}; falling back to exo's memory-weighted split")
        stages = memory_weighted_stages(nodes, self.n_layers)
        idle = sorted({n for n, _ in nodes} - {s.node for s in stages})
        msg = (f"{reason}; falling back to a memory-weighted split over "
               f"{', '.join(n for n, _ in nodes)}: "
               + " -> ".join(f"{s.node}[{s.start_layer},{s.end_layer})" for s in stages))
        if idle:
            msg += f"; nodes {', '.join(idle)} run no layers"
        return Decision("fallback", stages, stages_to_partitions(stages, self.n_layers), msg)

    def replan_request(self, nodes: List[Tuple[str, int]]) -> dict:
        """What the re-planner gets: the nodes present (exo ids, MB) and where tables are."""
        return {"nodes": [[n, m] for n, m in nodes], "tables": self.tables,
                "cluster_file": self.plan.cluster_file if self.plan else None,
                "node_map": self.node_map, "objective": self.objective,
                "workload": self.workload, "use_all_nodes": self.use_all_nodes}

    def _replan(self, nodes: List[Tuple[str, int]]):
        """A Decision re-planned for exactly `nodes`, or why not (a string)."""
        replanner = self.replanner or default_replanner()
        if replanner is None:
            return ("cannot re-plan here (the toolkit is not importable and no toolkit Python "
                    "is known: set EXO_BRIDGE_TOOLKIT_PYTHON)")
        try:
            answer = replanner(self.replan_request(nodes))
        except Exception as e:  # inside exo's node: never take the node down, fall back instead
            return f"re-planning failed ({type(e).__name__}: {e})"
        if answer.get("error"):
            return answer["error"]
        try:
            n = int(answer["n_layers"])
            stages = [Span(str(a), int(b), int(c)) for a, b, c in answer["stages"]]
            parts = stages_to_partitions(stages, n)
        except (KeyError, TypeError, ValueError) as e:
            return f"re-planning answered something unusable ({e})"
        self.n_layers = self.n_layers or n
        idle = sorted({m for m, _ in nodes} - {s.node for s in stages})
        msg = " -> ".join(f"{s.node}[{s.start_layer},{s.end_layer})" for s in stages)
        if idle:
            msg += f"; nodes {', '.join(idle)} run no layers"
        return Decision("replan", stages, parts, msg)


def describe(partitions: Sequence[Any], n_layers: int) -> str:
    """One line per partition: node, fractions, and the layers exo will give it."""
    lines = []
    mapped = {node: (s, e) for node, s, e in exo_map(partitions, n_layers)}
    for p in partitions:
        layers = mapped.get(p.node_id)
        where = f"layers [{layers[0]}, {layers[1] + 1})" if layers else "no layers"
        lines.append(f"  {p.node_id:<24} [{p.start:.6f}, {p.end:.6f})  -> {where}")
    return "\n".join(lines)


def strategy_from_env():
    """The strategy legacy exo should build, from the environment (the one-line hook).

    EXO_BRIDGE_PLAN=plan.json and/or EXO_BRIDGE_TABLES=dir-or-files (os.pathsep-separated),
    EXO_BRIDGE_NODE_MAP=map.json ({plan node: exo node id}). With neither PLAN nor TABLES set it
    returns exo's own default strategy, so the patched exo behaves as before.
    """
    plan = os.environ.get("EXO_BRIDGE_PLAN") or None
    tables = os.environ.get("EXO_BRIDGE_TABLES") or None
    if plan is None and tables is None:
        try:
            from exo.topology.ring_memory_weighted_partitioning_strategy import (  # type: ignore
                RingMemoryWeightedPartitioningStrategy,
            )

            return RingMemoryWeightedPartitioningStrategy()
        except ImportError:
            raise StrategyError("set EXO_BRIDGE_PLAN (a plan file) or EXO_BRIDGE_TABLES (cost "
                                "tables) for the measured strategy") from None
    node_map = None
    if os.environ.get("EXO_BRIDGE_NODE_MAP"):
        node_map = read_node_map(os.environ["EXO_BRIDGE_NODE_MAP"])
    return MeasuredPartitioningStrategy(
        plan=plan, tables=tables.split(os.pathsep) if tables else None, node_map=node_map)


def read_node_map(path: str) -> dict:
    """`{plan node: exo node id}` from a JSON file (a FIFO or device is refused, never read)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise StrategyError(f"node map {path}: not a regular file; give a JSON file")
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise StrategyError(f"node map {path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise StrategyError(f"node map {path}: must be a JSON object {{plan node: exo node id}}")
    return {str(k): v for k, v in data.items()}
