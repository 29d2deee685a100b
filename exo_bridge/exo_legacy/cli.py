"""`exo-bridge exo-legacy` and `exo-bridge strategy-check`: the toolkit's side of legacy exo.

`exo-bridge exo-legacy --plan PLAN -- <exo's arguments>` starts legacy exo's node with the
measured strategy when legacy exo is importable in the toolkit's own Python (launch.py). When
exo lives in its own environment, `exo-bridge exo-legacy install --python EXO_PYTHON`
(install.py) puts the stand-alone strategy there and exo starts from its own Python.

`exo-bridge strategy-check` shows what the strategy answers for a topology you describe, without
exo: the decision (plan / re-plan / fallback), the fractions, and the layers exo will assign.
"""

from __future__ import annotations

import argparse
import json

from exo_bridge.exo_legacy.launch import add_strategy_arguments, build_strategy, run_exo
from exo_bridge.exo_legacy.strategy import describe, exo_map_stages
from exo_bridge.exo_types import make_topology
from profiler.errors import UserError


OBJECTIVES = ("latency", "ttft", "throughput", "pareto")  # graphsplit.costmodel's


def _add_typed_strategy_arguments(ap: argparse.ArgumentParser) -> None:
    """launch.py's arguments (stdlib-only: it also runs inside exo's own environment) with the
    toolkit's one-line validators attached."""
    from profiler import options as o

    add_strategy_arguments(ap)
    types = {"plan": o.path("plan file"), "tables": o.path("cost table"),
             "node_map": o.path("node map file")}
    for action in ap._actions:
        if action.dest in types:
            action.type = types[action.dest]
        elif action.dest == "objective":
            action.choices = OBJECTIVES


def add_arguments(ap: argparse.ArgumentParser) -> None:
    _add_typed_strategy_arguments(ap)
    ap.add_argument("exo_args", nargs="*", help="exo's own arguments, after `--` "
                    "(e.g. -- --node-id studio --disable-tui); `exo-bridge exo-legacy install "
                    "--help` puts the strategy into exo's own environment")


def add_check_arguments(ap: argparse.ArgumentParser) -> None:
    from profiler import options as o

    _add_typed_strategy_arguments(ap)
    ap.add_argument("--node", action="append", default=[], metavar="ID:MEMORY_MB",
                    type=o.node_memory(),
                    help="a node of exo's topology (repeat); memory is DeviceCapabilities.memory")
    ap.add_argument("--layers", type=o.positive_int(1 << 20),
                    help="layer count to map to (default: the plan's)")


def _build_checked_strategy(args: argparse.Namespace):
    """The strategy, after the plan passed the toolkit's one plan validator (`read_plan`): the
    stand-alone strategy has only exo's stdlib and reads plans leniently."""
    if args.plan:
        from graphsplit.plan import read_plan

        read_plan(args.plan)
    return build_strategy(args)


def run(args: argparse.Namespace) -> int:
    strategy = _build_checked_strategy(args)  # validates the plan/tables before exo starts
    return run_exo(strategy, list(args.exo_args or []))


def run_check(args: argparse.Namespace) -> int:
    strategy = _build_checked_strategy(args)
    nodes = dict(args.node)  # (id, MB) pairs, checked by options.node_memory
    if not nodes and strategy.plan is not None:  # default: the plan's own nodes
        nodes = {strategy.to_exo(s.node): int((strategy.plan.nodes.get(s.node) or {})
                                              .get("memory_bytes", 0)) // (1024 * 1024)
                 for s in strategy.plan.stages}
    n = args.layers or strategy.n_layers
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
