"""`split-model --hybrid`: the best plan with tensor-parallel stages allowed, per runtime.

The hybrid search runs only when asked (`--hybrid`, or `--tp-shares`, which implies it): a
cluster file with measured collectives alone does not change what `split-model` does, so pure
pipeline planning keeps its solvers and its speed. By runtime (graphsplit.hybrid.shares):

* ``mlx-pipeline``: the exact hybrid DP (graphsplit.hybrid.search), unequal shares unless
  `--tp-shares equal`.
* ``exo-current``: exo runs one Tensor instance (every rank all layers, equal shares, a group
  size dividing the KV heads and hidden size) or a Pipeline; both are searched exactly: the
  pipeline solvers' optimum against every measured group as one equal-share Tensor stage.
* ``exo-legacy``: refused (no tensor parallelism in legacy exo).

The plan's baselines add the pure-pipeline optimum ("pipeline") beside exo's placements.
"""

from __future__ import annotations

import time

from graphsplit.costmodel import Workload, objective_value, predict
from graphsplit.hybrid.costs import model_dims
from graphsplit.hybrid.shares import TP_SHARES, equal_cut_problem, tensor_stage
from graphsplit.plan import Plan, stage_dict
from graphsplit.result import SplitResult
from profiler.errors import UserError


def _exo_current(cluster, objective: str, workload: Workload, use_all_nodes: bool,
                 pipeline: SplitResult) -> SplitResult:
    """exo-current: the pipeline optimum or the best single equal-share Tensor group."""
    t0 = time.perf_counter()
    kv, inter, hidden = model_dims(cluster)
    best, best_st, n, why = pipeline.fun, pipeline.stages, 0, []
    for (group, op) in sorted(cluster.collectives):
        if op != "all_sum" or not set(group) <= set(cluster.ids):
            continue
        if use_all_nodes and len(group) != len(cluster.ids):
            continue
        prob = equal_cut_problem(len(group), kv, hidden)
        if prob:
            why.append(f"{'+'.join(group)}: {prob}")
            continue
        st = [tensor_stage(group, [kv // len(group)] * len(group), 0, cluster.n_layers, inter)]
        try:
            pr = predict(cluster, st, workload, "exo-current")
        except UserError as e:
            why.append(f"{'+'.join(group)}: {e}")
            continue
        n += 1
        if not pr.fits:
            continue
        v = objective_value(pr, objective, workload)
        if best_st is None or v < best * (1 - 1e-9):
            best, best_st = v, st
    exact = pipeline.optimal
    msg = (f"current exo's space: the pipeline optimum ({pipeline.solver}) against {n} "
           f"equal-share Tensor groups" + (f"; not placeable: {'; '.join(why)}" if why else ""))
    res = SplitResult(best_st, best, exact, 0 if best_st else 2, msg, "hybrid-exo-current",
                      pipeline.solve_s + time.perf_counter() - t0, pipeline.nit + n)
    res.proven = "optimal-all-orders-subsets" if exact else "bound"
    res.lower_bound = best if exact else getattr(pipeline, "lower_bound", None)
    res.gap = 0.0 if exact else getattr(pipeline, "gap", None)
    return res


def solve(cluster, objective: str, workload: Workload, runtime: str, use_all_nodes: bool,
          tp_shares: str, solver: str = "auto", max_group: int | None = None) -> tuple:
    """(hybrid result, pure-pipeline result) for `runtime`."""
    from graphsplit import api
    from graphsplit.hybrid.search import solve_hybrid

    if objective == "pareto":
        raise UserError("--hybrid: --objective pareto is not searched with tensor-parallel "
                        "stages; use latency, ttft or throughput")
    if tp_shares not in TP_SHARES:
        raise UserError(f"--tp-shares {tp_shares!r}: must be one of {', '.join(TP_SHARES)}")
    if runtime == "exo-legacy":
        raise UserError("--hybrid --runtime exo-legacy: legacy exo has no tensor parallelism "
                        "(a shard is one node's layer range); use --runtime mlx-pipeline (run "
                        "with `exo-bridge run`) or --runtime exo-current, or drop --hybrid")
    try:
        pipe = api.solve(cluster, objective, workload, runtime, use_all_nodes, solver)
    except UserError as e:  # more nodes than layers: no pipeline, but groups may hold them all
        if not use_all_nodes or len(cluster.nodes) <= cluster.n_layers:
            raise
        pipe = SplitResult(None, float("inf"), True, 2, str(e), "pipeline")
    if runtime == "exo-current":
        return _exo_current(cluster, objective, workload, use_all_nodes, pipe), pipe
    return solve_hybrid(cluster, objective, workload, use_all_nodes, tp_shares, max_group,
                        seed=pipe), pipe


def make_hybrid_plan(cluster, objective: str = "latency", workload: Workload = Workload(),
                     runtime: str = "mlx-pipeline", use_all_nodes: bool = False,
                     tp_shares: str = "any", solver: str = "auto",
                     cluster_file: str | None = None, max_group: int | None = None) -> Plan:
    """The hybrid plan with its prediction, the pipeline optimum and exo's baselines."""
    from graphsplit import api

    res, pipe = solve(cluster, objective, workload, runtime, use_all_nodes, tp_shares, solver,
                      max_group)
    if res.stages is None:
        raise api.NoFitError(api.shortfall_message(cluster, workload, runtime))
    pred = predict(cluster, res.stages, workload, runtime).to_dict()
    pred["derived_from"] = "measured cost tables and measured collectives" + (
        " (some nodes roofline-estimated)" if pred["estimated"] else "") + (
        " (some tensor-parallel shares or sizes interpolated between measured ones)"
        if pred.get("derived_shares") else "")
    base = {}
    if pipe.stages is not None:
        base["pipeline"] = {"stages": [stage_dict(s) for s in pipe.stages],
                            "predicted": predict(cluster, pipe.stages, workload,
                                                 runtime).to_dict(),
                            "solver": pipe.to_dict()}
    else:
        base["pipeline"] = {"stages": [], "predicted": {}, "error": "no pipeline plan fits"}
    base.update(api.baseline_entries(cluster, workload, runtime))
    kv, inter, _ = model_dims(cluster)
    model = dict(cluster.model_info(), n_kv_heads=kv)
    if inter:
        model["intermediate_size"] = inter
    return Plan(model=model, stages=list(res.stages), predicted=pred, runtime=runtime,
                objective=objective, workload=workload.to_dict(), solver=res.to_dict(),
                baselines=base, cluster_file=cluster_file, nodes=api.node_entries(cluster))
