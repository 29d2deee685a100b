"""Start legacy exo's node with the measured strategy (standard library only; runs in exo's env).

Legacy exo builds its strategy in `exo/main.py` at import time
(`partitioning_strategy=RingMemoryWeightedPartitioningStrategy()`) and has no flag to choose
another. `run_exo` replaces that class in its module with a factory for our strategy BEFORE
`exo.main` is imported, hands exo its own command line, then calls `exo.main.run()`, as the `exo`
command does.

In exo's environment, after `exo-bridge exo-legacy install --python EXO_PYTHON`::

    EXO_PYTHON -m exo_measured_split --plan plan.json [--node-map map.json] -- --node-id studio

In an environment that has both the toolkit and legacy exo: `exo-bridge exo-legacy --plan ...`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Any, List, Optional

LEGACY_MODULE = "exo.topology.ring_memory_weighted_partitioning_strategy"
INSTALL_HINT = ("install legacy exo (`git clone https://github.com/exo-explore/exo && cd exo && "
                "git checkout e4238f9 && pip install -e .`), then put the strategy into its "
                "environment with `exo-bridge exo-legacy install --python EXO_VENV/bin/python` "
                "and start it there with `EXO_VENV/bin/python -m exo_measured_split --plan "
                "PLAN -- <exo's arguments>` (current exo, the rewrite, has no partitioning "
                "strategy: use `exo-bridge place` for it)")


def legacy_exo_available() -> bool:
    """Whether legacy exo's strategy module can be imported in this Python."""
    try:
        return importlib.util.find_spec(LEGACY_MODULE) is not None
    except (ImportError, ValueError):  # `exo` missing, or a namespace without submodules
        return False


def add_strategy_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--plan", help="plan file from `split-model --out`")
    ap.add_argument("--tables", nargs="+", help="cost tables (files or directories) to "
                    "re-plan from when exo's topology differs from the plan")
    ap.add_argument("--node-map", help="JSON file {plan node: exo node id} (or start exo with "
                    "--node-id NAME so the ids are the plan's names)")
    ap.add_argument("--objective", help="objective when re-planning (default: the plan's)")
    ap.add_argument("--use-all-nodes", action="store_true",
                    help="when re-planning, give every node of the topology some layers")


def build_strategy(args: argparse.Namespace, **kw: Any):
    """The strategy from parsed --plan/--tables/--node-map/... arguments."""
    from .strategy import MeasuredPartitioningStrategy, read_node_map

    node_map = read_node_map(args.node_map) if args.node_map else None
    return MeasuredPartitioningStrategy(plan=args.plan, tables=args.tables, node_map=node_map,
                                        objective=args.objective,
                                        use_all_nodes=args.use_all_nodes, **kw)


def run_exo(strategy: Any, exo_args: List[str]) -> int:
    """Patch exo's default strategy class to return `strategy`, then run exo's node."""
    from .strategy import StrategyError

    if not legacy_exo_available():
        raise StrategyError(f"legacy exo is not installed ({LEGACY_MODULE} cannot be "
                            f"imported by {sys.executable}); " + INSTALL_HINT)
    if "exo.main" in sys.modules:
        raise StrategyError("exo.main was already imported in this process; start the measured "
                            "strategy's launcher in a fresh process")
    mod = importlib.import_module(LEGACY_MODULE)
    mod.RingMemoryWeightedPartitioningStrategy = lambda *a, **k: strategy  # what main.py builds
    what = "cost tables"
    if strategy.plan:
        what = "plan " + " -> ".join(f"{strategy.to_exo(s.node)}[{s.start_layer},{s.end_layer})"
                                     for s in strategy.plan.stages)
    print(f"exo-bridge: legacy exo starts with the measured partitioning strategy ({what})",
          file=sys.stderr)
    sys.argv = ["exo"] + list(exo_args)
    exo_main = importlib.import_module("exo.main")  # builds the node with our strategy
    exo_main.run()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m exo_measured_split --plan PLAN -- <exo's arguments>` in exo's environment."""
    from .strategy import StrategyError

    argv = list(sys.argv[1:] if argv is None else argv)
    exo_args: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, exo_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m exo_measured_split",
                                 description="legacy exo's node with the measured split")
    add_strategy_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return run_exo(build_strategy(args), exo_args)
    except StrategyError as e:
        print(f"exo-bridge: error: {e}", file=sys.stderr)
        return 2
