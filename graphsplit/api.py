"""One call from a cluster to a plan: solve, predict, compare with exo's baselines."""

from __future__ import annotations

from typing import Any

from graphsplit.baselines import BASELINES, exo_current_partition
from graphsplit.costmodel import OBJECTIVES, Workload, check_runtime, predict
from graphsplit.plan import Plan, stage_dict
from graphsplit.result import SplitResult
from profiler.errors import UserError

SOLVERS = ("auto", "bitmask", "fixed-order", "milp", "brute")
BITMASK_MAX_NODES = 12


class NoFitError(UserError):
    """The model does not fit the cluster; the message says which nodes fall short, by how much."""


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def shortfall_message(cluster, workload: Workload, runtime: str) -> str:
    """Why nothing fits: the shortfalls of a memory-proportional split over every node."""
    nodes = [(n.id, n.memory_bytes) for n in cluster.nodes][:cluster.n_layers]
    stages = exo_current_partition(nodes, cluster.n_layers)
    pr = predict(cluster, stages, workload, runtime)
    need = sum(pr.stage_memory_bytes.values())
    have = sum(pr.stage_capacity_bytes.values())
    parts = [f"{n} short by {_gib(b)} ({b} bytes)" for n, b in sorted(pr.shortfalls.items())]
    what = "; ".join(parts) if parts else "no single split avoids every shortfall"
    return (f"the model does not fit these nodes (runtime {runtime}, {workload.kv_tokens} tokens "
            f"of KV x {workload.streams} stream(s)): with layers in proportion to memory, {what} "
            f"(needs {_gib(need)}, has {_gib(have)}); add a node or memory, or lower "
            f"{_kv_options(workload)}")


def _kv_options(workload: Workload) -> str:
    """The options that set the KV length: the prompt when it is the longer, the streams."""
    kv = "--prompt-tokens" if workload.prompt_tokens > workload.context_tokens \
        else "--context-tokens"
    return kv + (" / --streams" if workload.streams > 1 else "")


def solve(cluster, objective: str = "latency", workload: Workload = Workload(),
          runtime: str = "exo-current", use_all_nodes: bool = False,
          solver: str = "auto") -> SplitResult:
    """Run one solver on the chain model of `cluster`."""
    from graphsplit import solve_dp
    if objective not in OBJECTIVES:
        raise UserError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if solver not in SOLVERS:
        raise UserError(f"solver {solver!r} is not one of {', '.join(SOLVERS)}")
    check_runtime(runtime)
    if use_all_nodes and len(cluster.nodes) > cluster.n_layers:
        raise UserError(f"--use-all-nodes: {len(cluster.nodes)} nodes cannot each get one of "
                        f"{cluster.n_layers} layers")
    if solver == "auto":
        solver = "bitmask" if len(cluster.nodes) <= BITMASK_MAX_NODES else "fixed-order"
    if solver == "bitmask":
        return solve_dp.solve_bitmask(cluster, objective, workload, runtime, use_all_nodes)
    if solver == "fixed-order":
        return solve_dp.solve_fixed_order(cluster, objective, workload, runtime, use_all_nodes)
    if solver == "brute":
        if len(cluster.nodes) > 6 or cluster.n_layers > 16:
            raise UserError("--solver brute is a test oracle for at most 6 nodes and 16 layers; "
                            "use --solver bitmask (exact) instead")
        from graphsplit.brute import brute_force
        return brute_force(cluster, objective, workload, runtime, use_all_nodes)
    if objective == "pareto":
        raise UserError("--solver milp does not enumerate a Pareto frontier; use --solver "
                        "bitmask or fixed-order for --objective pareto")
    from graphsplit.solve_milp import solve_milp_chain
    return solve_milp_chain(cluster, objective, workload, runtime, use_all_nodes)


def baseline_entries(cluster, workload: Workload, runtime: str) -> dict[str, dict[str, Any]]:
    out = {}
    for name, fn in BASELINES.items():
        try:
            st = fn(cluster)
            pred = predict(cluster, st, workload, runtime).to_dict()
        except UserError as e:  # exo would refuse; or a tensor stage this cluster cannot price
            out[name] = {"stages": [], "predicted": {}, "error": str(e)}
            continue
        out[name] = {"stages": [stage_dict(s) for s in st], "predicted": pred}
    return out


def node_entries(cluster) -> dict[str, dict[str, Any]]:
    return {n.id: {"memory_bytes": int(n.memory_bytes), "available_bytes": int(n.available_bytes),
                   "total_bytes": int(n.total_bytes), "estimated": n.estimated,
                   "profile": n.profile, "device": n.table.device.name,
                   "derive_from": n.derive_from} for n in cluster.nodes}


def make_plan(cluster, objective: str = "latency", workload: Workload = Workload(),
              runtime: str = "exo-current", use_all_nodes: bool = False, solver: str = "auto",
              cluster_file: str | None = None) -> Plan:
    """Solve, predict the plan and each of exo's baselines; raise NoFitError if nothing fits."""
    res = solve(cluster, objective, workload, runtime, use_all_nodes, solver)
    if res.stages is None:
        if use_all_nodes:  # is it the model, or the demand that every node holds a layer?
            free = solve(cluster, objective, workload, runtime, False, solver)
            if free.stages is not None:
                used = {s.node for s in free.stages}
                left = sorted(n.id for n in cluster.nodes if n.id not in used)
                raise NoFitError(
                    f"--use-all-nodes: no split gives every node a layer within its memory "
                    f"(runtime {runtime}); the model fits without {', '.join(left)} "
                    f"(on {', '.join(sorted(used))}): drop --use-all-nodes")
        raise NoFitError(shortfall_message(cluster, workload, runtime))
    pred = predict(cluster, res.stages, workload, runtime).to_dict()
    pred["derived_from"] = "measured cost tables" + (
        " (some nodes roofline-estimated)" if pred["estimated"] else "")
    if objective == "pareto" and "frontier" in res.extra:
        pred["pareto"] = [
            {"stages": [stage_dict(s) for s in p["stages"]],
             "tpot_s": p["tpot_s"], "bottleneck_s": p["bottleneck_s"],
             "throughput_tps": min(workload.streams / p["tpot_s"], 1 / p["bottleneck_s"])}
            for p in res.extra["frontier"]]
    return Plan(model=cluster.model_info(), stages=list(res.stages), predicted=pred,
                runtime=runtime, objective=objective, workload=workload.to_dict(),
                solver=res.to_dict(), baselines=baseline_entries(cluster, workload, runtime),
                cluster_file=cluster_file, nodes=node_entries(cluster))



def make_manual_plan(cluster, spec: str, objective: str = "latency",
                     workload: Workload = Workload(), runtime: str = "exo-current",
                     use_all_nodes: bool = False, solver: str = "auto",
                     cluster_file: str | None = None) -> Plan:
    """The manual split `spec` (`studio:20,mini:12`, execution order as written) as a plan:
    its stages and prediction, recorded as manual (solver.name "manual"); the optimum for the
    same objective and exo's baselines beside it (baselines["optimal"], then the usual ones).
    A manual split that does not fit is predicted all the same (fits: false, shortfalls)."""
    from graphsplit.manual import manual_solver_entry, parse_layers

    stages = parse_layers(spec, cluster.ids, cluster.n_layers)
    pred = predict(cluster, stages, workload, runtime).to_dict()
    pred["derived_from"] = "measured cost tables" + (
        " (some nodes roofline-estimated)" if pred["estimated"] else "")
    try:
        best = make_plan(cluster, objective, workload, runtime, use_all_nodes, solver,
                         cluster_file)
        optimal = {"stages": [stage_dict(s) for s in best.stages],
                   "predicted": best.predicted, "solver": best.solver}
        rest = best.baselines
    except NoFitError as e:
        optimal = {"stages": [], "predicted": {}, "error": str(e)}
        rest = baseline_entries(cluster, workload, runtime)
    return Plan(model=cluster.model_info(), stages=stages, predicted=pred, runtime=runtime,
                objective=objective, workload=workload.to_dict(),
                solver=manual_solver_entry(spec), baselines={"optimal": optimal, **rest},
                cluster_file=cluster_file, nodes=node_entries(cluster))
