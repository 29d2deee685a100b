"""Manual splits: per-node layer counts given by the user, `--layers studio:20,mini:12`.

The nodes run in the order written, each a contiguous range: `studio:20,mini:12` is studio on
blocks [0, 20) and mini on [20, 32). One parser and one validator serve `split-model --layers`
(predicts the split beside the optimum and exo's baselines) and `exo-bridge place / run
--layers` (replace a plan's stages); every mistake is one line naming the option and the item.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from graphsplit.plan import Plan, Stage
from profiler.errors import UserError

EXAMPLE = "e.g. --layers studio:20,mini:12"


def parse_layers(spec: str, nodes: Iterable[str], n_layers: int,
                 option: str = "--layers") -> list[Stage]:
    """Stages in the written order from `NODE:COUNT,...`; `nodes` are the known node ids.

    Refused, one line each: an empty spec or item, an item without ':', an unknown node, a node
    given twice, a count that is not a whole number or is below 1, counts not summing to
    `n_layers`."""
    known = list(nodes)
    items = [x.strip() for x in str(spec).split(",")]
    if not spec or not str(spec).strip():
        raise UserError(f"{option}: empty; give NODE:COUNT for each node in execution order, "
                        f"{EXAMPLE}")
    stages: list[Stage] = []
    seen: set[str] = set()
    start = 0
    for item in items:
        node, sep, count = item.rpartition(":")
        node, count = node.strip(), count.strip()
        if not item or not sep or not node:
            raise UserError(f"{option} {spec!r}: item {item!r} is not NODE:COUNT ({EXAMPLE})")
        if node not in known:
            raise UserError(f"{option} {item}: node {node!r} is not in the cluster (its nodes: "
                            f"{', '.join(sorted(known))})")
        if node in seen:
            raise UserError(f"{option} {item}: node {node!r} is given twice; a node runs one "
                            "contiguous range of layers")
        seen.add(node)
        if not count.lstrip("+-").isdigit():
            raise UserError(f"{option} {item}: the layer count {count!r} is not a whole number")
        k = int(count)
        if k < 1:
            raise UserError(f"{option} {item}: a node needs at least 1 layer (leave a node out "
                            "to give it none)")
        stages.append(Stage(node, start, start + k))
        start += k
    if start != n_layers:
        raise UserError(f"{option} {spec}: the counts sum to {start} but the model has "
                        f"{n_layers} layers; make them add up to {n_layers}")
    return stages


def format_layers(stages: Iterable[Stage]) -> str:
    """The `--layers` spelling of stages: `studio:20,mini:12`."""
    return ",".join(f"{s.node}:{s.end_layer - s.start_layer}" for s in stages)


def manual_solver_entry(spec: str) -> dict:
    """The plan's `solver` field for a manual split (how a plan records that it was manual)."""
    return {"name": "manual", "manual": True, "layers": spec, "optimal": False,
            "message": f"manual split --layers {spec}", "solve_s": 0.0}


def apply_layers(plan: Plan, spec: str, option: str = "--layers") -> Plan:
    """`plan` with its stages replaced by the manual split `spec` (validated against the plan's
    nodes and layer count), recorded as manual. The prediction is re-derived from the plan's
    cluster file when it is here, else dropped (the old one was for other stages)."""
    nodes = list(plan.nodes) or [s.node for s in plan.stages]
    nodes += [s.node for s in plan.stages if s.node not in nodes]
    stages = parse_layers(spec, nodes, plan.n_layers, option)
    predicted: dict = {}
    if plan.cluster_file:
        from pathlib import Path

        if Path(plan.cluster_file).exists():
            from graphsplit.cluster import load_cluster
            from graphsplit.costmodel import Workload, predict

            wl = plan.workload or {}
            workload = Workload(int(wl.get("prompt_tokens", 512)),
                                int(wl.get("context_tokens", 1024)), int(wl.get("streams", 1)))
            predicted = predict(load_cluster(plan.cluster_file), stages, workload,
                                plan.runtime).to_dict()
            predicted["derived_from"] = f"measured cost tables ({plan.cluster_file})"
    return dataclasses.replace(plan, stages=stages, predicted=predicted,
                               solver=manual_solver_entry(format_layers(stages)))
