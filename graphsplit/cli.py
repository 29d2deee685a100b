"""`split-model CLUSTER --objective latency|ttft|throughput|pareto`: measured, optimal splits."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from profiler import options as o
from profiler.errors import UserError, guard

MAX_TOKENS = 1 << 24  # 16M tokens: beyond any model's context
MAX_STREAMS = 4096


def auto_or_int(hi: int):
    """`auto` (None: the solver chooses) or a whole number 1..hi."""
    inner = o.positive_int(hi)

    def parse(text: str):
        if str(text).strip() == "auto":
            return None
        try:
            return inner(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e}, or auto") from None

    return o._typed("int", parse, f"auto_or_int_1_{hi}", lo=1, hi=hi)


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """The runtime and workload options every planning command takes (split-model, what-if)."""
    p.add_argument("--runtime", default="exo-current",
                   choices=["exo-current", "exo-legacy", "mlx-pipeline"])
    p.add_argument("--prompt-tokens", type=o.positive_int(MAX_TOKENS), default=512, metavar="P")
    p.add_argument("--context-tokens", type=o.positive_int(MAX_TOKENS), default=1024,
                   metavar="C")
    p.add_argument("--streams", type=o.positive_int(MAX_STREAMS), default=1, metavar="B")


def build_parser() -> argparse.ArgumentParser:
    p = o.OneLineParser(prog="split-model", description=(
        "Split a model's layers over a cluster from measured cost tables: the plan with the "
        "lowest time per output token (latency), time to first token (ttft), the highest "
        "throughput for concurrent streams, or the latency/throughput Pareto frontier; "
        "compared with exo's own splits."))
    p.add_argument("cluster", type=o.path("cluster file"), help="cluster file (JSON: nodes with cost tables, links)")
    p.add_argument("--objective", default="latency",
                   choices=["latency", "ttft", "throughput", "pareto"])
    add_workload_arguments(p)
    p.add_argument("--replicas", type=auto_or_int(MAX_STREAMS), default=1, metavar="auto|K",
                   help="throughput: split the nodes into K independent pipelines (auto: the "
                   "solver chooses K), each serving a share of the streams (default 1)")
    p.add_argument("--micro-batch", type=auto_or_int(MAX_STREAMS), default=None,
                   metavar="auto|M", help="throughput, --runtime mlx-pipeline: streams per "
                   "micro-batch (default auto: the solver chooses)")
    p.add_argument("--use-all-nodes", action="store_true",
                   help="every node gets at least one layer (as current exo does)")
    p.add_argument("--solver", default="auto",
                   choices=["auto", "bitmask", "fixed-order", "milp", "brute"])
    p.add_argument("--layers", type=o.text("manual split"), metavar="SPEC", help="predict a manual split instead, per-node "
                   "layer counts in execution order (e.g. studio:20,mini:12), beside the optimum "
                   "and exo's splits; --out writes it as the plan")
    p.add_argument("--hybrid", action="store_true", help="allow tensor-parallel stages "
                   "(groups with a measured all-reduce in the cluster file's collectives): the "
                   "exact hybrid search (graphsplit.hybrid)")
    p.add_argument("--tp-shares", choices=["any", "equal"], help="shares of a tensor group: "
                   "any whole KV heads (ours) or equal (exo, mlx-lm); implies --hybrid")
    p.add_argument("--max-group", type=o.positive_int(64), metavar="N", help="--hybrid: "
                   "groups of at most N nodes (the result is then labelled a bound)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--out", type=o.path("plan file"), metavar="PLAN.json", help="write the plan file")
    p.add_argument("--plot", type=o.path("image file"), metavar="FILE.png", help="draw per-layer cost and the timeline")
    p.add_argument("--simulate", action="store_true",
                   help="replay the plan in the discrete-event simulator too")
    p.add_argument("--no-calibration", action="store_true", help="ignore the measured "
                   "calibrations beside the cost tables (exo-bridge run --calibrate)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from graphsplit.api import make_manual_plan, make_plan
    from graphsplit.cluster import load_cluster
    from graphsplit.costmodel import Workload, extrapolation_notes
    from graphsplit.plan import write_plan
    from profiler.files import check_output
    for opt, out in (("--out", args.out), ("--plot", args.plot)):
        if out:  # an output that cannot be written is refused before anything is written
            check_output(out, f"{opt} {out}")
    if args.plot:  # so is an image format matplotlib does not write
        from graphsplit.plot import check_plot_path
        check_plot_path(args.plot)
    workload = Workload(prompt_tokens=args.prompt_tokens, context_tokens=args.context_tokens,
                        streams=args.streams)
    _check_serving_options(args)
    cluster = load_cluster(args.cluster, calibration=not args.no_calibration)
    kept = None
    hybrid = args.hybrid or args.tp_shares is not None or args.max_group is not None
    for flag, on in (("--layers", args.layers is not None), ("--simulate", args.simulate),
                     ("--plot", args.plot), ("--replicas", args.replicas != 1),
                     ("--micro-batch", args.micro_batch is not None)):
        if hybrid and on:
            raise UserError(f"{flag} works on pipeline plans only; drop it, or drop --hybrid "
                            "/ --tp-shares / --max-group")
    if hybrid:
        from graphsplit.hybrid.make import make_hybrid_plan
        plan = make_hybrid_plan(cluster, args.objective, workload, args.runtime,
                                args.use_all_nodes, args.tp_shares or "any", args.solver,
                                cluster_file=args.cluster, max_group=args.max_group)
    elif args.objective == "throughput" and args.layers is None:
        from graphsplit.api import make_throughput_plan
        plan = make_throughput_plan(cluster, workload, args.runtime, args.use_all_nodes,
                                    args.solver, args.cluster, args.micro_batch, args.replicas)
    elif args.layers is not None:  # a manual split, predicted beside the optimum
        plan = make_manual_plan(cluster, args.layers, args.objective, workload, args.runtime,
                                args.use_all_nodes, args.solver, cluster_file=args.cluster)
    else:
        plan = make_plan(cluster, args.objective, workload, args.runtime, args.use_all_nodes,
                         args.solver, cluster_file=args.cluster)
    if args.layers is None and not hybrid:  # never re-plan worse than a measured split
        from graphsplit.calibration import keep_measured_split
        plan, kept = keep_measured_split(plan, cluster, workload, args.runtime, args.objective)
    plan.predicted["extrapolated"] = extrapolation_notes(
        cluster, replace(workload, batch=int(plan.workload.get("batch", 1))))
    if args.simulate:
        from graphsplit.simulate import simulate
        sim = simulate(cluster, plan.stages, workload, args.runtime)
        plan.predicted["simulated"] = sim.to_dict()
    if args.out:
        write_plan(plan, args.out)
    if args.plot:
        from graphsplit.plot import plot_plan
        plot_plan(cluster, plan, workload, args.plot)
    if args.json:
        json.dump(plan.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        from graphsplit.hybrid.report import tensor_lines
        from graphsplit.report import render
        print(render(plan))
        for line in tensor_lines(plan):
            print(line)
        for note in plan.predicted["extrapolated"]:
            print(f"note: {note}")
        from graphsplit.calibration import summary
        for note in summary(plan, cluster) + ([kept] if args.layers is None and kept else []):
            print(f"note: {note}")
        if args.simulate:
            s = plan.predicted["simulated"]
            print(f"\nsimulated ({s['requests']} requests, {workload.streams} stream(s)): "
                  f"ttft {s['ttft_s'] * 1e3:.2f} ms, tpot {s['tpot_s'] * 1e3:.2f} ms, "
                  f"{s['throughput_tps']:.2f} tok/s; utilisation "
                  + ", ".join(f"{n} {u:.0%}" for n, u in s["utilisation"].items()))
            if int(plan.workload.get("batch", 1)) > 1:
                print("note: the simulator replays one stream per decode step (batch 1); the "
                      "plan's prediction batches them (see serving)")
        if args.out:
            print(f"\nplan written to {args.out}")
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def _check_serving_options(args) -> None:
    """--replicas and --micro-batch are choices of the throughput objective."""
    from graphsplit.batching import check_micro_batch
    from profiler.errors import UserError
    for opt, v, default in (("--replicas", args.replicas, 1), ("--micro-batch",
                                                                 args.micro_batch, None)):
        if v != default and args.objective != "throughput":
            raise UserError(f"{opt} applies to --objective throughput (many streams), not "
                            f"{args.objective}; add --objective throughput or drop {opt}")
        if v != default and args.layers is not None:
            raise UserError(f"{opt} chooses the split; a manual --layers split is one "
                            f"pipeline: drop {opt} or --layers")
    check_micro_batch(args.runtime, args.streams, args.micro_batch)
    if args.replicas is not None and args.replicas > args.streams:
        raise UserError(f"--replicas {args.replicas} is more than --streams {args.streams}; "
                        "each replica serves at least one stream")


def _main_pipe_safe(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # e.g. `split-model ... --json | head`
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


_main = main
main = guard(_main_pipe_safe)

if __name__ == "__main__":
    sys.exit(main())
