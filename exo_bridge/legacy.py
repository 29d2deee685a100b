"""Legacy exo: a `PartitioningStrategy` that runs the measured split.

Legacy exo asks its strategy for `Partition(node_id, start, end)` fractions and turns them into
layers with its own rule (`map_partitions_to_shards`)::

    start_layer = int(start * n_layers)
    end_layer   = int(end * n_layers) - 1        # INCLUSIVE, truncation
    the last partition ends at n_layers - 1; a partition with start_layer > end_layer is dropped

A boundary k/n written as a float can truncate to k - 1, so the strategy writes every inner
boundary b as the MIDDLE of layer b, (b + 0.5) / n, which truncates to b for any n; the first
start is exactly 0.0 and the last end exactly 1.0. `exo_map` reimplements exo's rule so every
answer is checked before exo sees it.

Inputs: a plan file (`split-model --out`), or cost tables plus the topology exo hands the
strategy (node memory from `DeviceCapabilities.memory`, MB). Decision when the topology and the
plan disagree (a node in one and not the other):

1. re-plan with graphsplit from the cost tables available for exactly the nodes present
   (the plan's `cluster_file` tables, or tables given directly), else
2. fall back to exo's own memory-weighted split, with a warning naming the nodes.

Every node of the cluster runs this code on the same inputs and gets the same answer: nodes are
sorted by id, ties broken by id, and graphsplit is deterministic. Results are cached per topology
(exo calls `partition` on every request).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from exo_bridge.exo_types import Partition, PartitioningStrategy
from graphsplit.baselines import exo_legacy_fractions, exo_truncation_map
from graphsplit.plan import Plan, Stage, check_stages, read_plan
from profiler.errors import UserError

log = logging.getLogger("exo_bridge.legacy")

MB = 1024 * 1024


# ---------------------------------------------------------------- fractions <-> layers


def boundary_fraction(b: int, n_layers: int) -> float:
    """The fraction for a stage boundary at block `b` (0 <= b <= n): exact 0/1 at the ends,
    the middle of layer b inside, so exo's truncation lands on b for every n."""
    if b <= 0:
        return 0.0
    if b >= n_layers:
        return 1.0
    return (b + 0.5) / n_layers


def exo_map(partitions: Sequence[Any], n_layers: int) -> list[tuple[str, int, int]]:
    """exo legacy's fraction -> layer rule on Partitions: `(node_id, start, end_inclusive)`
    (graphsplit.baselines.exo_truncation_map, the one implementation of the rule)."""
    return exo_truncation_map([(p.node_id, p.start, p.end) for p in partitions], n_layers)


def exo_map_stages(partitions: Sequence[Any], n_layers: int) -> list[Stage]:
    """`exo_map` as half-open stages (the plan's convention)."""
    return [Stage(node, s, e + 1) for node, s, e in exo_map(partitions, n_layers)]


def stages_to_partitions(stages: Sequence[Stage], n_layers: int) -> list:
    """Partitions (exo's class when installed) in execution order that exo maps back to exactly
    `stages`. Raises UserError if the stages are not a valid split or the check fails."""
    stages = list(stages)
    check_stages(stages, n_layers, "split")
    parts = [Partition(s.node, boundary_fraction(s.start_layer, n_layers),
                       boundary_fraction(s.end_layer, n_layers)) for s in stages]
    back = exo_map_stages(parts, n_layers)
    if back != stages:  # cannot happen with middle-of-layer fractions; guard anyway
        raise UserError(f"internal: fractions for {stages} map to {back} under exo's rule")
    return parts


def memory_weighted_partitions(nodes: Iterable[tuple[str, float]]) -> list:
    """exo legacy's default split (RingMemoryWeighted) as Partitions, for the fallback
    (graphsplit.baselines.exo_legacy_fractions)."""
    return [Partition(nid, a, b) for nid, a, b in exo_legacy_fractions(list(nodes))]


# ---------------------------------------------------------------- the strategy


@dataclass
class Decision:
    """What the strategy did for one topology: `source` is plan | replan | fallback."""

    source: str
    stages: list[Stage] | None
    partitions: list
    message: str = ""


def topology_nodes(topology: Any) -> list[tuple[str, int]]:
    """`[(node_id, memory_MB)]` sorted by id, from exo's `Topology.all_nodes()`."""
    out = []
    for node_id, caps in topology.all_nodes():
        out.append((str(node_id), int(getattr(caps, "memory", 0) or 0)))
    return sorted(out)


def _load_tables(tables: Any) -> dict[str, Any]:
    """Cost tables keyed by host: accepts `{node: CostTable}`, or paths/dirs of table files."""
    from profiler.costtable import CostTable, read_table

    if tables is None:
        return {}
    if isinstance(tables, dict):
        return {str(k): (v if isinstance(v, CostTable) else read_table(v))
                for k, v in tables.items()}
    out: dict[str, Any] = {}
    for item in tables:
        p = Path(item)
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        for f in files:
            t = read_table(f)
            out[t.device.host] = t
    return out


class MeasuredPartitioningStrategy(PartitioningStrategy):
    """exo legacy `PartitioningStrategy` that returns the measured split.

    plan: a `Plan` or a plan file path. tables: cost tables for re-planning (`{host: table}` or
    paths); when omitted, the plan's `cluster_file` is used if it exists.
    node_map: `{plan node name: exo node id}` when exo's ids are not the plan's names
    (run exo with `--node-id NAME` to make them equal). warn: where warnings go (stderr).
    """

    def __init__(self, plan: Plan | str | Path | None = None, tables: Any = None,
                 node_map: dict[str, str] | None = None, objective: str | None = None,
                 workload: dict[str, Any] | None = None, use_all_nodes: bool = False,
                 warn: Callable[[str], None] | None = None) -> None:
        if isinstance(plan, (str, Path)):
            plan = read_plan(plan)
        if plan is None and tables is None:
            raise UserError("the measured strategy needs a plan file (--plan) or cost tables "
                            "(--tables) to work from")
        self.plan: Plan | None = plan
        self.node_map = dict(node_map or {})
        self.tables = _load_tables(tables)
        self.objective = objective or (plan.objective if plan else "latency")
        self.workload = dict(workload or (plan.workload if plan else {}) or {})
        self.use_all_nodes = use_all_nodes
        self.warn = warn or (lambda msg: print(f"exo-bridge: warning: {msg}", file=sys.stderr))
        self._cache: dict[tuple, Decision] = {}
        self._links: dict | None = None  # from the plan's cluster file, by exo id
        self._default_link = None
        self.last_decision: Decision | None = None

    # names: plan/table names <-> exo ids
    def to_exo(self, name: str) -> str:
        return self.node_map.get(name, name)

    def partition(self, topology: Any) -> list:
        key = tuple(topology_nodes(topology))
        if key not in self._cache:
            self._cache[key] = self.decide(list(key))
            d = self._cache[key]
            if d.message:
                self.warn(d.message)
        self.last_decision = self._cache[key]
        return list(self.last_decision.partitions)

    # ---- the decision, deterministic in (plan, tables, node list)
    def decide(self, nodes: list[tuple[str, int]]) -> Decision:
        present = [n for n, _ in nodes]
        if not present:
            return Decision("fallback", None, [], "exo's topology is empty; nothing to split")
        plan = self.plan
        if plan is not None:
            planned = [self.to_exo(s.node) for s in plan.stages]
            known = set(planned) | {self.to_exo(n) for n in plan.nodes}
            missing = sorted(set(planned) - set(present))
            extra = sorted(set(present) - known)
            if not missing and not extra:
                stages = [Stage(self.to_exo(s.node), s.start_layer, s.end_layer)
                          for s in plan.stages]
                idle = sorted(set(present) - set(planned))
                msg = (f"nodes {', '.join(idle)} run no layers in this plan; send requests to "
                       f"{planned[0]}" if idle else "")
                return Decision("plan", stages, stages_to_partitions(stages, plan.n_layers), msg)
            why = []
            if missing:
                why.append(f"planned nodes not in exo's topology: {', '.join(missing)}")
            if extra:
                why.append(f"nodes in exo's topology not in the plan: {', '.join(extra)}")
            reason = "; ".join(why)
        else:
            reason = "no plan given (planning from cost tables)"
        replanned = self._replan(nodes)
        if isinstance(replanned, Decision):
            replanned.message = f"{reason}; re-planned from cost tables: " + replanned.message
            return replanned
        parts = memory_weighted_partitions(nodes)
        return Decision("fallback", None, parts,
                        f"{reason}; {replanned}; falling back to exo's memory-weighted split over "
                        f"{', '.join(present)}")

    def _tables_by_exo_id(self) -> dict[str, Any]:
        tables = dict(self.tables)
        if not tables and self.plan is not None and self.plan.cluster_file:
            try:
                from graphsplit.cluster import load_cluster

                cluster = load_cluster(self.plan.cluster_file)
                tables = {n.id: n.table for n in cluster.nodes}
                self._links = {(self.to_exo(a), self.to_exo(b)): link
                               for (a, b), link in cluster.links.items()}
                self._default_link = cluster.default_link
            except (UserError, OSError, ImportError) as e:
                return {"__error__": f"cannot read the plan's cluster file ({e})"}
        return {self.to_exo(k): v for k, v in tables.items()}

    def _replan(self, nodes: list[tuple[str, int]]) -> Decision | str:
        """Re-plan for exactly `nodes` from cost tables; a Decision, or why not (a string)."""
        tables = self._tables_by_exo_id()
        if "__error__" in tables:
            return tables["__error__"]
        present = [n for n, _ in nodes]
        lacking = [n for n in present if n not in tables]
        if not tables:
            return "no cost tables to re-plan from"
        if lacking:
            return f"no cost table for {', '.join(lacking)}"
        try:
            from graphsplit.api import make_plan
            from graphsplit.cluster import cluster_from_tables
            from graphsplit.costmodel import Workload
        except ImportError as e:  # the splitter is part of this package; a broken install
            return f"graphsplit is unavailable ({e})"
        wl = self.workload
        workload = Workload(int(wl.get("prompt_tokens", 512)), int(wl.get("context_tokens", 1024)),
                            int(wl.get("streams", 1)))
        # exo reports TOTAL memory (MB); the splitter fits into USABLE memory: scale the
        # topology's total by the table's measured usable/total ratio, never above the table's
        memory = {}
        for n, m in nodes:
            dev = tables[n].device
            if m > 0 and dev.memory_total_bytes > 0:
                ratio = dev.memory_usable_bytes / dev.memory_total_bytes
                memory[n] = int(min(dev.memory_usable_bytes, m * MB * ratio))
        try:
            links = {k: v for k, v in (self._links or {}).items()
                     if k[0] in present and k[1] in present}
            cluster = cluster_from_tables({n: tables[n] for n in present}, links=links or None,
                                          default_link=self._default_link,
                                          memory=memory or None)
            plan = make_plan(cluster, objective=self.objective, workload=workload,
                             runtime="exo-legacy", use_all_nodes=self.use_all_nodes)
        except UserError as e:
            return f"re-planning failed ({e})"
        except Exception as e:  # inside exo's node: never take the node down, fall back instead
            return f"re-planning failed ({type(e).__name__}: {e})"
        stages = list(plan.stages)
        idle = sorted(set(present) - {s.node for s in stages})
        msg = " -> ".join(f"{s.node}[{s.start_layer},{s.end_layer})" for s in stages)
        if idle:
            msg += f"; nodes {', '.join(idle)} run no layers"
        return Decision("replan", stages, stages_to_partitions(stages, plan.n_layers), msg)


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
    import json
    import os

    plan = os.environ.get("EXO_BRIDGE_PLAN") or None
    tables = os.environ.get("EXO_BRIDGE_TABLES") or None
    if plan is None and tables is None:
        try:
            from exo.topology.ring_memory_weighted_partitioning_strategy import (  # type: ignore
                RingMemoryWeightedPartitioningStrategy,
            )

            return RingMemoryWeightedPartitioningStrategy()
        except ImportError:
            raise UserError("set EXO_BRIDGE_PLAN (a plan file) or EXO_BRIDGE_TABLES (cost "
                            "tables) for the measured strategy") from None
    node_map = None
    if os.environ.get("EXO_BRIDGE_NODE_MAP"):
        node_map = json.loads(Path(os.environ["EXO_BRIDGE_NODE_MAP"]).read_text())
    return MeasuredPartitioningStrategy(
        plan=plan, tables=tables.split(os.pathsep) if tables else None, node_map=node_map)
