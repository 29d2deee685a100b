"""How each runtime serves B concurrent streams, and the split + micro-batch that serves them best.

Patterns, read from each runtime's source (docs/splitter.md, "Many streams", cites the lines):

* ``exo-current``: **batch-through**. exo's runner (``BatchGenerator.step`` in
  ``src/exo/worker/runner/llm_inference/batch_generator.py``) admits queued requests while fewer
  than ``EXO_MAX_CONCURRENT_REQUESTS`` (``src/exo/shared/constants.py``, default 8) are active,
  and ``ExoBatchGenerator.step`` (``src/exo/worker/engines/mlx/generator/batch_generate.py``)
  calls mlx-lm's ``BatchGenerator.next()``: ONE forward of the whole batch through the model,
  whose pipeline layers (``PipelineFirstLayer`` / ``PipelineLastLayer``,
  ``src/exo/worker/engines/mlx/auto_parallel.py``) receive, run, send and all-gather the
  ``[b, 1, hidden]`` output. The batch crosses every stage in turn, no stage overlaps another.
  With b = min(B, 8)::

      tpot(b) = sum_s T_s(b) + max_s head_s(b)      (the exo-current protocol, at batch b)
      throughput = b / tpot(b)

  Streams beyond 8 wait in exo's queue and hold no KV cache.
* ``exo-legacy``: **micro-batch, m = 1**. Legacy exo (commit e4238f9) never batches: every
  request is its own tensor (``Node.process_inference_result`` forwards each request with its
  own ``asyncio.create_task(self.forward_tensor(...))``) and a node's MLX work runs on one
  thread (``MLXDynamicShardInferenceEngine._mlx_thread``, ``ThreadPoolExecutor(max_workers=1)``),
  so B requests interleave in the ring one token each: the pipeline below with m = 1. Its
  engine keeps at most 3 request caches per node (``poll_state(max_caches=2)`` evicts the oldest
  when more than 2 are held): a 4th concurrent stream evicts another's cache.
* ``mlx-pipeline`` (ours, ``exo-bridge run``): **micro-batch**, B streams in M = ceil(B / m)
  micro-batches of m that fill the ring; the solver chooses m and the split.
* mlx-lm's own server (``mlx_lm/server.py``, ``BatchGenerator(completion_batch_size=
  --decode-concurrency 32)``, ``--pipeline``) is batch-through too: its pipelined models
  (``mlx_lm/models/deepseek_v3.py``, ``DeepseekV3Model.__call__``) recv, run, send and
  all-gather one batch per step. It is not a runtime of the splitter.

The micro-batch pipeline (steady state). M micro-batches circulate in a ring of S stages;
T_s(m) is stage s's time for one micro-batch (compute at batch m + its outgoing transfer of m x
the activation bytes; the last stage's transfer is the ring closure, the m sampled token ids
back to the first stage). A micro-batch's next step can enter stage 1 only when its token has
come back, so it needs R = sum_s T_s(m) per step; every stage serves all M micro-batches once per
step, so a step of all of them needs M x T_s(m) on stage s. The periodic schedule meets the
larger of these bounds (the cycle time of a marked graph is its largest cycle mean: the ring
with M tokens, R / M, against each stage's self-loop, T_s), so::

    cycle(m) = max(sum_s T_s(m), M x max_s T_s(m)),    throughput = B / cycle(m)

the last micro-batch (B - (M - 1) m streams) charged at batch m: exact when m divides B, else an
upper bound on its time. m = 1 is min(B / tpot, 1 / T_max), the model before batching. Every
stage holds the KV of all B streams. Reference: Ramamoorthy & Ho, "Performance evaluation of
asynchronous concurrent systems using Petri nets" (IEEE TSE 1980); GPipe's micro-batches
(Huang et al. 2019) for the pipeline-filling picture.

Search over m (:func:`solve_serving`): for each candidate m (1..B, or the one given) the
exact DP solvers minimise max(sum_s T_s(m) / M, max_s T_s(m)) (the throughput objective with M
in place of B: graphsplit.solve_dp), and throughput = B / (M x that). Candidates are visited in
increasing order of a lower bound on 1 / throughput, max(Lm, M Lm / D) / B with Lm the sum over
blocks of the fastest node's time at batch m (a plan's stage times sum to at least Lm, and its
slowest of at most D stages is at least the mean); the search stops when the bound reaches the
incumbent. Exact over (m, split) with the inner solver's own proof (all orders and subsets, or
the given order).

Stage times at batch b come from the cost table's batch grid (profiler.costtable.decode_seconds,
piecewise-linear in b, extrapolated beyond the grid); a table without one (version 1) is charged
b x its batch-1 time, and `batch_notes` says "extrapolated".
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from profiler import costtable as _ct
from profiler.errors import UserError

EXO_MAX_CONCURRENT_REQUESTS = 8  # exo src/exo/shared/constants.py (env EXO_MAX_CONCURRENT_REQUESTS)
LEGACY_MAX_CACHES = 3  # legacy exo: poll_state(max_caches=2) keeps at most 3 request caches
PATTERNS = ("batch-through", "micro-batch")
PATTERN = {"exo-current": "batch-through", "exo-legacy": "micro-batch",
           "mlx-pipeline": "micro-batch"}
WHY = {
    "exo-current": "exo BatchGenerator.step admits up to EXO_MAX_CONCURRENT_REQUESTS (8) and "
                   "ExoBatchGenerator.step runs one batch through every pipeline rank "
                   "(auto_parallel.py PipelineLastLayer: send, then all_gather), no overlap",
    "exo-legacy": "legacy exo never batches: Node.process_inference_result forwards each "
                  "request alone, one MLX thread per node (ThreadPoolExecutor(max_workers=1)): "
                  "requests interleave in the ring, micro-batch 1",
    "mlx-pipeline": "exo-bridge run (ours): B streams in ceil(B / m) micro-batches of m that "
                    "fill the ring; m chosen by the solver",
}


def max_batch(runtime: str) -> int | None:
    """The most streams a runtime decodes at once (None: no limit of its own)."""
    return EXO_MAX_CONCURRENT_REQUESTS if runtime == "exo-current" else None


def served_streams(runtime: str, streams: int) -> int:
    """Streams that decode at once (and hold KV): exo-current queues those beyond its cap."""
    cap = max_batch(runtime)
    return min(streams, cap) if cap else streams


def decode_seconds(table, row, context: float, batch: int = 1) -> float:
    """Seconds of one decode step of `batch` streams through `row`: the cost table's accessor
    (profiler.costtable.decode_seconds, INTERFACES I1: piecewise-linear in batch, linear
    beyond the grid, b x the batch-1 time for a table without a batch grid), memoised."""
    if batch == 1:
        return table.decode_time(row, context)
    key = (id(table), id(row), context, batch)
    hit = _MEMO.get(key)
    if hit is not None and hit[0] is row:  # the row itself kept: its id is not reused
        return hit[1]
    if len(_MEMO) > 200_000:
        _MEMO.clear()
    v = _ct.decode_seconds(table, row, context, batch)
    _MEMO[key] = (row, v)
    return v


_MEMO: dict[tuple, tuple] = {}  # the solvers ask for the same few (row, context, batch) often
batch_grid = _ct.batch_grid


def batch_notes(cluster, workload) -> list[str]:
    """One line per node whose batch grid the workload's decode batch lies beyond."""
    b = workload.batch
    if b <= 1:
        return []
    notes = []
    for node in sorted(cluster.nodes, key=lambda n: n.id):
        grid = batch_grid(node.table)
        if b > grid[-1]:
            what = ("no batch grid (a version-1 table): charged linearly from batch 1"
                    if grid == [1] else f"beyond the measured batch grid {grid[0]}..{grid[-1]}")
            notes.append(f"{node.id}: decode batch {b} is {what}: extrapolated (profile "
                         f"with --decode-batch covering {b} to measure it)")
    return notes


@dataclass(frozen=True)
class Serving:
    """How the plan serves its streams (the plan's `serving` entry, INTERFACES I5)."""
    pattern: str
    micro_batch: int
    max_batch: int | None
    why: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["max_batch"] is None:
            del d["max_batch"]
        return d


def serving_for(runtime: str, streams: int, micro_batch: int = 1) -> Serving:
    """The serving entry of a runtime at B streams (micro_batch: mlx-pipeline's choice)."""
    cap = max_batch(runtime)
    if runtime == "exo-current":
        m = served_streams(runtime, streams)
    elif runtime == "exo-legacy":
        m = 1
    else:
        m = micro_batch
    why = WHY[runtime]
    if runtime == "exo-legacy" and streams > LEGACY_MAX_CACHES:
        why += (f"; beware: it keeps {LEGACY_MAX_CACHES} request caches per node "
                "(poll_state(max_caches=2)), so a 4th concurrent stream evicts another's cache")
    return Serving(PATTERN[runtime], m, cap, why)


def check_micro_batch(runtime: str, streams: int, micro_batch: int | None) -> None:
    """--micro-batch is mlx-pipeline's choice; the other runtimes fix it from their source."""
    if micro_batch is None:
        return
    if runtime != "mlx-pipeline":
        fixed = serving_for(runtime, streams)
        raise UserError(f"--micro-batch {micro_batch}: runtime {runtime} fixes its batch "
                        f"({fixed.pattern}, batch {fixed.micro_batch}, from its source); use "
                        "--runtime mlx-pipeline to choose it, or drop --micro-batch")
    if micro_batch > streams:
        raise UserError(f"--micro-batch {micro_batch} is larger than --streams {streams}; "
                        f"give at most {streams}")


def serving_workload(workload, runtime: str, micro_batch: int = 1):
    """The workload with its decode batch set by the runtime's pattern."""
    return replace(workload, batch=serving_for(runtime, workload.streams, micro_batch).micro_batch)


def _fastest_sum(cluster, workload, runtime: str) -> float:
    """L_m: sum over blocks of the fastest node's decode time at the workload's batch, plus
    the fastest embedding and head (a lower bound on the sum of a plan's stage times)."""
    from graphsplit.costmodel import protocol
    pr = protocol(cluster, runtime, "decode", workload)
    tabs = [n.table for n in cluster.nodes]
    total = min(pr.block_time(t, t.embed) for t in tabs)
    total += min(pr.head_time(t, workload.sampling_s) for t in tabs)
    for i in range(cluster.n_layers):
        total += min(pr.block_time(t, t.row(f"layers.{i}")) for t in tabs)
    return total


def inverse_throughput(cluster, stages, workload, runtime: str) -> float:
    """1 / throughput of a plan under the workload's batch (the reference cost model)."""
    from graphsplit.costmodel import objective_value, predict
    return objective_value(predict(cluster, stages, workload, runtime), "throughput", workload)


def micro_batch_candidates(cluster, workload, runtime: str, micro_batch: int | None):
    """[(lower bound on 1 / throughput, m)] in increasing order (see the module docstring)."""
    B = workload.streams
    if runtime != "mlx-pipeline":
        ms = [serving_for(runtime, B).micro_batch]
    else:
        ms = [micro_batch] if micro_batch else list(range(1, B + 1))
    D = len(cluster.nodes)
    out = []
    for m in ms:
        wl = replace(workload, batch=m)
        served = min(B, max_batch(runtime) or B)
        M = -(-served // m)
        lm = _fastest_sum(cluster, wl, runtime)
        out.append((max(lm, M * lm / D) / served * (1 - 1e-9), m))
    return sorted(out)


def solve_serving(cluster, workload, runtime: str, micro_batch: int | None = None,
                  use_all_nodes: bool = False, solver: str = "auto", seeds=()):
    """The throughput-optimal split AND micro-batch for B streams under `runtime`'s pattern.

    Problem: min over m and plans of 1 / throughput (module docstring). Method: the inner
    exact solver per candidate m, candidates in increasing order of a lower bound, stopped
    when the bound reaches the incumbent. Complexity: at most B inner solves (one when the
    runtime fixes m or `micro_batch` is given), usually a few. `seeds`: splits (e.g. the
    answer for one stream fewer) evaluated at every m first, a cheap first incumbent that only
    prunes. Returns (SplitResult with fun = 1 / throughput and extra["serving"], the workload
    with its batch set).
    """
    from graphsplit.api import solve
    from graphsplit.result import SplitResult

    t0 = time.perf_counter()
    check_micro_batch(runtime, workload.streams, micro_batch)
    if solver == "milp" and (workload.streams > 1):
        raise UserError("--solver milp models one stream per step; for --objective throughput "
                        "with --streams above 1 use --solver auto, bitmask or fixed-order")
    best = (math.inf, None, None, None)  # (1 / throughput, m, result, workload)
    work, tried, last = 0, 0, None
    cands = micro_batch_candidates(cluster, workload, runtime, micro_batch)
    bar = math.inf  # the seeds' best value: prunes the search; a seed is never returned
    for st in seeds:
        for _, m in cands:
            p = predict_or_none(cluster, st, replace(workload, batch=m), runtime)
            if p is not None:
                bar = min(bar, p)
    for lb, m in cands:
        # a candidate whose bound exceeds a seed's value cannot hold the optimum; one at or
        # below it is solved (so the optimum, maybe the seed's own value, is always found)
        if lb >= best[0] or lb > bar * (1 + 1e-9):
            break
        wl = replace(workload, batch=m)
        r = solve(cluster, "throughput", wl, runtime, use_all_nodes, solver)
        work += r.nit
        tried += 1
        last = r
        if r.stages is None:
            break  # memory does not depend on m: nothing fits at any m
        v = inverse_throughput(cluster, r.stages, wl, runtime)
        if v < best[0] * (1 - 1e-12):
            best = (v, m, r, wl)
    inv, m, r, wl = best
    if r is None:
        return last, replace(workload, batch=serving_for(runtime, workload.streams).micro_batch)
    serving = serving_for(runtime, workload.streams, m)
    what = (f"micro-batch {m} of {workload.streams} stream(s) ({wl.micro_batches} in the ring)"
            if serving.pattern == "micro-batch" else
            f"one batch of {m} through every stage ({runtime} caps it at {serving.max_batch})")
    chosen = "given" if micro_batch or runtime != "mlx-pipeline" else \
        f"best of {tried} micro-batch size(s) tried, the rest bounded out"
    proven = proven_label(r)
    inner = r.message.replace(f"for {wl.micro_batches} stream(s)",
                              f"for {wl.micro_batches} micro-batch(es) in the ring")
    res = SplitResult(r.stages, inv, r.optimal, r.status,
                      f"{inner}; {what}, {chosen}", r.solver, time.perf_counter() - t0,
                      work, {**r.extra, "serving": serving}, proven=proven,
                      lower_bound=inv if proven != "bound" else None,
                      gap=0.0 if proven != "bound" else None)
    return res, wl


def proven_label(r) -> str:
    """The inner solver's I7 label (set by the solver; else from what it searched)."""
    if getattr(r, "proven", ""):
        return r.proven
    if not r.optimal:
        return "bound"
    return "optimal-given-order" if r.solver.startswith("fixed-order") else \
        "optimal-all-orders-subsets"


def predict_or_none(cluster, stages, workload, runtime: str) -> float | None:
    """1 / throughput of a plan when it fits, else None."""
    from graphsplit.costmodel import objective_value, predict
    p = predict(cluster, stages, workload, runtime)
    return objective_value(p, "throughput", workload) if p.fits else None


def best_micro_batch(cluster, stages, workload, runtime: str):
    """The best batch for a fixed split (a baseline's): (workload with it, 1 / throughput)."""
    best = (math.inf, None)
    for _, m in micro_batch_candidates(cluster, workload, runtime, None):
        wl = replace(workload, batch=m)
        v = inverse_throughput(cluster, stages, wl, runtime)
        if v < best[0] * (1 - 1e-12):
            best = (v, wl)
    return best[1], best[0]
