"""`exo-bridge exo-legacy`: start legacy exo's node with the measured partitioning strategy.

Legacy exo builds its strategy in `exo/main.py` at import time
(`partitioning_strategy=RingMemoryWeightedPartitioningStrategy()`) and has no flag to choose
another. This launcher replaces that class in its module with a factory for our
`MeasuredPartitioningStrategy` BEFORE `exo.main` is imported, hands exo its own command line
(everything after `--`), then calls `exo.main.run()`, as the `exo` command does.

Run it on every node with the same plan (or tables) and the same node map: every node computes
the partition itself and all get the same answer.

`exo-bridge strategy-check` shows what the strategy answers for a topology you describe, without
exo: the decision (plan / re-plan / fallback), the fractions, and the layers exo will assign.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys

from exo_bridge.exo_types import make_topology
from exo_bridge.legacy import MeasuredPartitioningStrategy, describe, exo_map_stages
from profiler import options as o
from profiler.errors import UserError

OBJECTIVES = ("latency", "ttft", "throughput", "pareto")  # graphsplit.costmodel's

LEGACY_MODULE = "exo.topology.ring_memory_weighted_partitioning_strategy"
INSTALL_HINT = ("install legacy exo into this Python: `git clone https://github.com/exo-explore/"
                "exo && cd exo && git checkout e4238f9 && pip install -e .` (current exo, the "
                "rewrite, has no partitioning strategy: use `exo-bridge place` for it)")


def _strategy_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--plan", type=o.path("plan file"), help="plan file from `split-model --out`")
    ap.add_argument("--tables", nargs="+", type=o.path("cost table"), help="cost tables (files or directories) to "
                    "re-plan from when exo's topology differs from the plan")
    ap.add_argument("--node-map", type=o.path("node map file"), help="JSON file {plan node: exo node id} (or start exo with "
                    "--node-id NAME so the ids are the plan's names)")
    ap.add_argument("--objective", choices=OBJECTIVES, help="objective when re-planning (default: the plan's)")
    ap.add_argument("--use-all-nodes", action="store_true",
                    help="when re-planning, give every node of the topology some layers")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    _strategy_args(ap)
    ap.add_argument("exo_args", nargs="*", help="exo's own arguments, after `--` "
                    "(e.g. -- --node-id studio --disable-tui)")


def add_check_arguments(ap: argparse.ArgumentParser) -> None:
    _strategy_args(ap)
    ap.add_argument("--node", action="append", default=[], metavar="ID:MEMORY_MB",
                    type=o.node_memory(),
                    help="a node of exo's topology (repeat); memory is DeviceCapabilities.memory")
    ap.add_argument("--layers", type=o.positive_int(1 << 20), help="layer count to map to (default: the plan's)")


def build_strategy(args: argparse.Namespace) -> MeasuredPartitioningStrategy:
    node_map = None
    if args.node_map:
        from exo_bridge.exo_current.place import read_node_map

        node_map = read_node_map(args.node_map)
    return MeasuredPartitioningStrategy(plan=args.plan, tables=args.tables, node_map=node_map,
                                        objective=args.objective,
                                        use_all_nodes=args.use_all_nodes)


def legacy_exo_available() -> bool:
    try:
        return importlib.util.find_spec(LEGACY_MODULE) is not None
    except (ImportError, ValueError):  # `exo` missing, or a namespace without submodules
        return False


def run(args: argparse.Namespace) -> int:
    strategy = build_strategy(args)  # validates the plan/tables before exo starts
    if not legacy_exo_available():
        raise UserError(f"legacy exo is not installed ({LEGACY_MODULE} cannot be imported); "
                        + INSTALL_HINT)
    if "exo.main" in sys.modules:
        raise UserError("exo.main was already imported in this process; start exo-bridge "
                        "exo-legacy in a fresh process")
    mod = importlib.import_module(LEGACY_MODULE)
    mod.RingMemoryWeightedPartitioningStrategy = lambda *a, **k: strategy  # what main.py builds
    what = ("plan " + " -> ".join(f"{strategy.to_exo(s.node)}[{s.start_layer},{s.end_layer})"
                                  for s in strategy.plan.stages)) if strategy.plan else "cost tables"
    print(f"exo-bridge: legacy exo starts with the measured partitioning strategy ({what})",
          file=sys.stderr)
    sys.argv = ["exo"] + list(args.exo_args or [])
    exo_main = importlib.import_module("exo.main")  # builds the node with our strategy
    exo_main.run()
    return 0


def run_check(args: argparse.Namespace) -> int:
    strategy = build_strategy(args)
    nodes = dict(args.node)  # (id, MB) pairs, checked by options.node_memory
    if not nodes and strategy.plan is not None:  # default: the plan's own nodes
        nodes = {strategy.to_exo(s.node): int((strategy.plan.nodes.get(s.node) or {})
                                              .get("memory_bytes", 0)) // (1024 * 1024)
                 for s in strategy.plan.stages}
    n = args.layers or (strategy.plan.n_layers if strategy.plan else None)
    if not n:
        raise UserError("--layers is required without a plan")
    msgs: list[str] = []
    strategy.warn = msgs.append
    parts = strategy.partition(make_topology(nodes))
    d = strategy.last_decision
    print(f"decision: {d.source}" + (f" ({d.message})" if d.message else ""))
    print(f"partitions ({n} layers under exo's rule):")
    print(describe(parts, n))
    stages = exo_map_stages(parts, n)
    print(json.dumps([{"node": s.node, "start_layer": s.start_layer, "end_layer": s.end_layer}
                      for s in stages]))
    return 0
