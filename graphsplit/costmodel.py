"""The cost model of pipelined LLM inference, from measured cost tables.

Notation: stages s = 1..S in execution order, stage s runs blocks [a_s, b_s) on node d_s; the first
stage also runs the embedding, the last the final norm + LM head and the sampling. All times are
derived from the measured tables (interpolated in prompt length / KV context); nothing is assumed.

Per stage (decode, one token of one stream at KV context C)::

    compute_s = sum_{i in [a_s, b_s)} decode_{d_s}(i, C)  [+ embed if s = 1] [+ head + sampling if s = S]
    out_s     = alpha(d_s, d_{s+1}) + e_{b_s - 1} / beta(d_s, d_{s+1})        for s < S
    out_S     = alpha(d_S, d_1) + token_bytes / beta(d_S, d_1)                  (ring closure; 0 if S = 1)
    T_s       = compute_s + out_s        (a stage is busy while it sends: synchronous send)

where e_i is the measured activation bytes per token leaving block i. Then

* time per output token (one stream):  tpot = sum_s T_s
* bottleneck (B streams in flight):    T_max = max_s T_s
* throughput for B streams:             min(B / tpot, 1 / T_max) tokens/s  (a ring of S stages
  with B requests in flight is either latency bound or bound by its slowest stage)
* time to first token for P prompt tokens: the same sum with prefill times at P tokens and
  P x e bytes crossing each link; with K chunks (`prefill_chunks`):
  sum_s U_s + (K - 1) max_s U_s, U_s the stage time for P/K tokens.

That is the ring protocol (``mlx-pipeline``, ours). Each runtime's own per-token protocol, read
from its source (:func:`protocol`, details in docs/splitter.md):

* ``exo-legacy``: the same pattern over gRPC; every message (activation, token id back) also
  pays the measured per-message overhead m of the cluster file's ``runtimes`` section.
* ``exo-current``: activation to the next rank, then the last hidden state ALL-GATHERED every
  decode step (MLX's ring all-gather: S - 1 steps towards the left neighbour, so the last rank's
  slice reaches rank 0 over the S - 1 backward hops: each cut also pays alpha + e / beta of
  d_{s+1} -> d_s), no token closure, and norm + head + sampling on EVERY rank:
  ``tpot = sum_s T_s + max_s head_{d_s}`` (the slowest rank's head sets the pace; an upper
  bound, exact when the first rank's head is the slowest). Bottleneck = tpot (the all-gather
  is a barrier). TTFT as exo's prefill: prompt[:-1] and prompt[-1] without the all-gather, the
  caches trimmed by 2, then two decode steps with it.

Memory of a stage (must fit the node's usable memory)::

    weights (blocks) + KV (max(C, P) x B x sum kv_bytes_per_token) + buffers + resident embed/head

buffers = max over the rows the stage runs of (measured peak memory - weights). Resident
embedding / head by runtime: ``exo-current`` and ``mlx-pipeline`` keep embedding, norm and head on
EVERY rank; ``exo-legacy`` loads the embedding on the first shard and the norm + head on the last
(and the embedding again on the last when the model ties them).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from graphsplit.plan import RUNTIMES, Stage, check_stages
from profiler.errors import UserError

OBJECTIVES = ("latency", "ttft", "throughput", "pareto")


@dataclass(frozen=True)
class Workload:
    """What the cluster is asked to do. context_tokens is the KV length a decode step sees."""
    prompt_tokens: int = 512
    context_tokens: int = 1024
    streams: int = 1
    sampling_s: float = 0.0  # extra per-token time on the last stage (the head row is measured)
    prefill_chunks: int = 1
    token_bytes: int = 4  # the sampled token id sent back to the first node

    def __post_init__(self):
        for k in ("prompt_tokens", "context_tokens", "streams", "prefill_chunks"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"workload: {k} is {v!r}; it must be a positive integer")
        if self.sampling_s < 0:
            raise UserError("workload: sampling_s must be >= 0")

    @property
    def kv_tokens(self) -> int:
        return max(self.context_tokens, self.prompt_tokens)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise UserError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")


# ------------------------------------------------------------------ per-token protocols


@dataclass(frozen=True)
class Pass:
    """One pass of tokens through the pipeline, as a runtime's protocol runs it.

    metric "decode" (block times at `context` KV tokens) or "prefill" (block times at `tokens`
    prompt tokens); `tokens` also sets the bytes per transfer (tokens x activation bytes);
    `count` how many such passes; `gather`: the last rank's hidden state is all-gathered back
    (exo-current's decode), which charges every cut its backward hop.
    """
    metric: str
    tokens: int
    context: int
    count: int = 1
    gather: bool = False


@dataclass(frozen=True)
class Protocol:
    """What a runtime sends per token, who runs the head (see the module docstring)."""
    runtime: str
    passes: tuple[Pass, ...]
    head_on_every_rank: bool  # exo-current: the slowest rank's head sets the pace
    token_closure: bool  # the last rank sends the token id back to the first
    message_overhead_s: float = 0.0  # added to every transfer (exo-legacy, measured)

    def block_time(self, table, row) -> float:
        """Compute of one row (block, embedding or head) summed over the passes."""
        return sum(p.count * (table.prefill_time(row, p.tokens) if p.metric == "prefill"
                              else table.decode_time(row, p.context)) for p in self.passes)

    def head_time(self, table, sampling_s: float) -> float:
        return sum(p.count * ((table.prefill_time(table.head, p.tokens) if p.metric == "prefill"
                               else table.decode_time(table.head, p.context)) + sampling_s)
                   for p in self.passes)

    def cut_time(self, fwd, back, nbytes_per_token: float) -> float:
        """Transfers over one cut (fwd: this stage -> next, back: next -> this), all passes."""
        t = 0.0
        for p in self.passes:
            x = p.tokens * nbytes_per_token
            one = fwd.time(x) + self.message_overhead_s
            if p.gather:
                one += back.time(x)
            t += p.count * one
        return t

    def closure_time(self, link, token_bytes: int) -> float:
        if not self.token_closure:
            return 0.0
        return sum(p.count * (link.time(token_bytes) + self.message_overhead_s)
                   for p in self.passes)


def message_overhead_s(cluster, runtime: str) -> float:
    """The runtime's measured per-message overhead from the cluster file's `runtimes` section
    (seconds; 0 when none was measured)."""
    sec = (getattr(cluster, "runtimes", None) or {}).get(runtime) or {}
    return float(sec.get("message_overhead_ms", 0.0)) / 1e3


def protocol(cluster, runtime: str, metric: str, workload: "Workload") -> Protocol:
    """The passes a runtime runs for one decode token (metric "decode") or up to the first
    token (metric "prefill"). Read from the runtimes' source (see the module docstring)."""
    check_runtime(runtime)
    P, C = workload.prompt_tokens, workload.context_tokens
    if runtime == "exo-current":
        if metric == "decode":
            passes = (Pass("decode", 1, C, 1, gather=True),)
        else:  # prompt[:-1] (no gather), prompt[-1] (no gather), trim 2, then 2 decode steps
            passes = (Pass("prefill", max(P - 1, 1), P), Pass("decode", 1, P, 1),
                      Pass("decode", 1, P, 2, gather=True))
        return Protocol(runtime, passes, head_on_every_rank=True, token_closure=False)
    one = (Pass("decode", 1, C),) if metric == "decode" else (Pass("prefill", P, P),)
    m = message_overhead_s(cluster, runtime) if runtime == "exo-legacy" else 0.0
    return Protocol(runtime, one, head_on_every_rank=False, token_closure=True,
                    message_overhead_s=m)


def protocol_time(cluster, stages: Sequence[Stage], workload: "Workload", runtime: str,
                  metric: str):
    """Direct sums of a protocol over a plan: (total, per-stage compute, per-stage transfers,
    head pace). total = sum(compute) + sum(transfers) + pace, pace = max over the stages of
    the head time when every rank runs the head (exo-current), else 0 (the head is in the last
    stage's compute)."""
    pr = protocol(cluster, runtime, metric, workload)
    S = len(stages)
    comp, link, heads = [], [], []
    for s, st in enumerate(stages):
        t = cluster.node(st.node).table
        rows = [t.row(f"layers.{i}") for i in range(st.start_layer, st.end_layer)]
        c = sum(pr.block_time(t, r) for r in rows)
        if s == 0:
            c += pr.block_time(t, t.embed)
        h = pr.head_time(t, workload.sampling_s)
        if pr.head_on_every_rank:
            heads.append(h)
        elif s == S - 1:
            c += h
        if S == 1:
            o = 0.0
        elif s < S - 1:
            nxt = stages[s + 1].node
            o = pr.cut_time(cluster.link(st.node, nxt), cluster.link(nxt, st.node),
                            rows[-1].activation_bytes_per_token)
        else:
            o = pr.closure_time(cluster.link(st.node, stages[0].node), workload.token_bytes)
        comp.append(c)
        link.append(o)
    pace = max(heads) if heads else 0.0
    return sum(c + o for c, o in zip(comp, link)) + pace, comp, link, pace


def resident_bytes(table, runtime: str, first: bool, last: bool) -> int:
    """Embedding / norm / head weight bytes a stage keeps resident under `runtime`."""
    e, h = table.embed.weight_bytes, table.head.weight_bytes
    if runtime in ("exo-current", "mlx-pipeline"):
        return int(e + h)
    out = 0
    if first:
        out += e
    if last:
        out += h
        if table.model.tie_word_embeddings and not first:
            out += e
    return int(out)


def stage_memory(node, start: int, end: int, workload: Workload, runtime: str,
                 first: bool, last: bool) -> int:
    """Bytes a stage over blocks [start, end) needs on `node` (see the module docstring)."""
    t = node.table
    rows = [t.row(f"layers.{i}") for i in range(start, end)]
    run = rows + ([t.embed] if first else []) + ([t.head] if last else [])
    weights = sum(r.weight_bytes for r in rows)
    kv = workload.kv_tokens * workload.streams * sum(r.kv_bytes_per_token for r in rows)
    buffers = max((max(0, r.peak_memory_bytes - r.weight_bytes) for r in run), default=0)
    return int(weights + kv + buffers + resident_bytes(t, runtime, first, last))


@dataclass
class Prediction:
    """Predicted numbers for one plan (all derived from measured cost tables)."""
    tpot_s: float
    ttft_s: float
    throughput_tps: float
    bottleneck_s: float
    stage_memory_bytes: dict[str, int]
    stage_capacity_bytes: dict[str, int]
    stage_compute_s: dict[str, float]  # decode compute per stage at the context length
    stage_link_s: dict[str, float]  # outgoing transfer per decode token (closure for the last)
    stage_prefill_s: dict[str, float]  # prefill compute per stage at the prompt length
    roofline_tpot_s: float  # sum of (stage weights / node memory bandwidth): the memory roofline
    estimated: bool  # some stage runs on a node whose table is a roofline estimate
    shortfalls: dict[str, int] = field(default_factory=dict)  # node -> bytes over its memory
    protocol: str = "mlx-pipeline"  # the runtime whose per-token protocol was charged
    head_pace_s: float = 0.0  # exo-current: max over ranks of the head (every rank runs it)
    gather_s: float = 0.0  # exo-current: the all-gather's backward hops per decode token
    message_overhead_s: float = 0.0  # exo-legacy: measured overhead added to every message

    @property
    def fits(self) -> bool:
        return not self.shortfalls

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fits"] = self.fits
        return d


def predict(cluster, stages: Sequence[Stage], workload: Workload = Workload(),
            runtime: str = "exo-current") -> Prediction:
    """Evaluate a plan with the cost model above (direct sums: the reference the solvers match).
    A plan with tensor-parallel stages is priced by graphsplit.hybrid.costs.predict_hybrid."""
    check_runtime(runtime)
    stages = list(stages)
    if any(st.tensor is not None for st in stages):  # tensor-parallel stages: their own model
        from graphsplit.hybrid.costs import predict_hybrid
        return predict_hybrid(cluster, stages, workload, runtime)
    check_stages(stages, cluster.n_layers, "stages")
    known = set(cluster.ids)
    for st in stages:
        if st.node not in known:
            raise UserError(f"stage node {st.node!r} is not in the cluster (nodes: "
                            f"{', '.join(cluster.ids)})")
    tpot, comp, out, pace = protocol_time(cluster, stages, workload, runtime, "decode")
    ttft, pcomp, pout, _ = protocol_time(cluster, stages, workload, runtime, "prefill")
    if runtime == "exo-current":
        bott = tpot  # the all-gather is a barrier every step: no two steps overlap
        gather = sum(cluster.link(b.node, a.node).time(
            cluster.node(a.node).table.row(f"layers.{a.end_layer - 1}").activation_bytes_per_token)
            for a, b in zip(stages, stages[1:]))
    else:
        bott = max(c + o for c, o in zip(comp, out))
        gather = 0.0
        if workload.prefill_chunks > 1:
            ttft = _chunked_ttft(cluster, stages, workload, runtime)
    mem, cap = {}, {}
    roof = 0.0
    est = False
    S = len(stages)
    for s, st in enumerate(stages):
        node = cluster.node(st.node)
        t = node.table
        est = est or node.estimated
        first, last = s == 0, s == S - 1
        mem[st.node] = stage_memory(node, st.start_layer, st.end_layer, workload, runtime,
                                    first, last)
        cap[st.node] = int(node.memory_bytes)
        rows = [t.row(f"layers.{i}") for i in range(st.start_layer, st.end_layer)]
        run = ([t.embed] if first else []) + rows + ([t.head] if last else [])
        bw = t.device.memory_bandwidth_gbs * 1e9
        wb = sum(r.weight_bytes for r in run)
        roof += wb / bw if bw > 0 else float("inf")
    thr = min(workload.streams / tpot, 1.0 / bott) if tpot > 0 else float("inf")
    short = {n: mem[n] - cap[n] for n in mem if mem[n] > cap[n]}
    names = [st.node for st in stages]
    return Prediction(tpot_s=tpot, ttft_s=ttft, throughput_tps=thr, bottleneck_s=bott,
                      stage_memory_bytes=mem, stage_capacity_bytes=cap,
                      stage_compute_s=dict(zip(names, comp)), stage_link_s=dict(zip(names, out)),
                      stage_prefill_s=dict(zip(names, pcomp)), roofline_tpot_s=roof,
                      estimated=est, shortfalls=short, protocol=runtime, head_pace_s=pace,
                      gather_s=gather,
                      message_overhead_s=protocol(cluster, runtime, "decode",
                                                  workload).message_overhead_s)


def _chunked_ttft(cluster, stages, workload: Workload, runtime: str) -> float:
    """TTFT with the prompt in K chunks through a pipeline (ring runtimes):
    sum_s U_s + (K - 1) max_s U_s, U_s the stage time (compute + transfer) for P / K tokens."""
    K = workload.prefill_chunks
    pr = protocol(cluster, runtime, "prefill", workload)
    pr = Protocol(runtime, (Pass("prefill", workload.prompt_tokens / K,
                                 workload.prompt_tokens),),
                  pr.head_on_every_rank, pr.token_closure, pr.message_overhead_s)
    S = len(stages)
    U = []
    for s, st in enumerate(stages):
        t = cluster.node(st.node).table
        rows = [t.row(f"layers.{i}") for i in range(st.start_layer, st.end_layer)]
        run = ([t.embed] if s == 0 else []) + rows
        u = sum(pr.block_time(t, r) for r in run)
        if s == S - 1:
            u += pr.head_time(t, workload.sampling_s)
        if S > 1 and s < S - 1:
            nxt = stages[s + 1].node
            u += pr.cut_time(cluster.link(st.node, nxt), cluster.link(nxt, st.node),
                             rows[-1].activation_bytes_per_token)
        elif S > 1:
            u += pr.closure_time(cluster.link(st.node, stages[0].node), workload.token_bytes)
        U.append(u)
    return sum(U) + (K - 1) * max(U)


def objective_value(pred: Prediction, objective: str, workload: Workload) -> float:
    """The scalar a solver minimises: tpot, ttft, or 1 / throughput (= max(tpot / B, T_max))."""
    if objective == "latency":
        return pred.tpot_s
    if objective == "ttft":
        return pred.ttft_s
    if objective == "throughput":
        return max(pred.tpot_s / workload.streams, pred.bottleneck_s)
    raise UserError(f"objective {objective!r} is not one of latency, ttft, throughput")


class ChainCosts:
    """Dense per-node cost arrays of the chain model, for the DP solvers.

    For node index d (in `ids` order), with L blocks, summed over the runtime's passes
    (:func:`protocol`):

    * ``comp[d, b, c]``: compute of stage [b, c) on d (embedding at b = 0; head + sampling at
      c = L unless every rank runs the head), +inf where b >= c or the stage does not fit d's
      memory (runtime-aware);
    * ``out[d, q, c]``: the transfers over the cut at c (0 < c < L) from d to q: the activation
      d -> q, the all-gather's backward hop q -> d (exo-current), the per-message overhead
      (exo-legacy);
    * ``close[d, f]``: the ring closure d -> f (token id), 0 when d = f or the runtime has none;
    * ``pace[d]``: the head time of d when every rank runs it (exo-current; else 0). A plan
      then costs sum of stage times + max over its nodes of pace: not additive, so the solvers
      enumerate that maximum (see graphsplit.solve_dp).

    `metric` "decode" is one output token; "prefill" everything up to the first token. Stage
    time T = comp + out (or + close for the last stage), exactly as :func:`predict`.
    Building costs O(D L^2) time and memory plus O(D^2 L) for links.
    """

    def __init__(self, cluster, workload: Workload, runtime: str = "exo-current",
                 metric: str = "decode", ids: Sequence[str] | None = None):
        check_runtime(runtime)
        self.ids = list(ids) if ids is not None else sorted(cluster.ids)
        self.cluster, self.workload, self.runtime, self.metric = cluster, workload, runtime, metric
        self.protocol = pr = protocol(cluster, runtime, metric, workload)
        L = self.L = cluster.n_layers
        D = self.D = len(self.ids)
        inf = np.inf
        self.comp = np.full((D, L + 1, L + 1), inf)
        self.mem = np.zeros((D, L + 1, L + 1))
        self.cap = np.zeros(D)
        self.out = np.full((D, D, L + 1), inf)
        self.close = np.zeros((D, D))
        self.prefix = np.zeros((D, L + 1))  # prefix sums of block times (no memory masking)
        self.t_embed = np.zeros(D)
        self.t_head = np.zeros(D)  # head + sampling when the last stage runs it, else 0
        self.pace = np.zeros(D)  # head + sampling when every rank runs it, else 0
        mins = np.full(L, inf)
        min_e = min_h = inf
        valid = np.arange(L + 1)[:, None] < np.arange(L + 1)[None, :]
        for d, nid in enumerate(self.ids):
            node = cluster.node(nid)
            t = node.table
            blocks = [t.row(f"layers.{i}") for i in range(L)]
            tt = np.array([pr.block_time(t, r) for r in blocks])
            te, th = pr.block_time(t, t.embed), pr.head_time(t, workload.sampling_s)
            if pr.head_on_every_rank:
                self.pace[d], th = th, 0.0
            mins = np.minimum(mins, tt)
            min_e, min_h = min(min_e, te), min(min_h, th)
            pre = np.concatenate([[0.0], np.cumsum(tt)])
            self.prefix[d], self.t_embed[d], self.t_head[d] = pre, te, th
            comp = pre[None, :] - pre[:, None]
            comp[0, :] += te
            comp[:, L] += th
            mem = self._stage_memory(node, blocks, runtime)
            self.cap[d] = node.memory_bytes
            # integer-exact memory test (the same rounding as predict: int() of the sum)
            fits = np.floor(mem + 1e-6) <= node.memory_bytes
            comp[~(valid & fits)] = inf
            self.comp[d] = comp
            self.mem[d] = np.where(valid, mem, 0)
            e = np.array([r.activation_bytes_per_token for r in blocks], dtype=float)
            for q, qid in enumerate(self.ids):
                if q == d:
                    continue
                fwd, back = cluster.link(nid, qid), cluster.link(qid, nid)
                self.out[d, q, 1:L] = [pr.cut_time(fwd, back, x) for x in e[:L - 1]]
                self.close[d, q] = pr.closure_time(fwd, workload.token_bytes)
        # lower bound on the sum of stage times of blocks b..L-1 (fastest node per block, no
        # links), shrunk by a relative 1e-9 so rounding never prunes an optimal plan
        suf = np.concatenate([np.cumsum(mins[::-1])[::-1], [0.0]]) + min_h
        suf[0] += min_e
        suf[L] = 0.0
        self.lower_bound = suf * (1 - 1e-9)

    def _stage_memory(self, node, blocks, runtime: str) -> np.ndarray:
        """mem[b, c]: bytes of the stage [b, c) on `node` (as :func:`stage_memory`)."""
        t, L, wl = node.table, self.L, self.workload
        w = np.array([r.weight_bytes for r in blocks], dtype=float)
        kv = np.array([r.kv_bytes_per_token for r in blocks], dtype=float)
        buf = np.array([max(0, r.peak_memory_bytes - r.weight_bytes) for r in blocks],
                       dtype=float)
        wpre = np.concatenate([[0.0], np.cumsum(w)])
        kvpre = np.concatenate([[0.0], np.cumsum(kv)])
        mem = (wpre[None, :] - wpre[:, None]) + wl.kv_tokens * wl.streams * (
            kvpre[None, :] - kvpre[:, None])
        # range max of buffers: bm[b, c] = max(buf[b:c])
        bm = np.zeros((L + 1, L + 1))
        for b in range(L):
            bm[b, b + 1:] = np.maximum.accumulate(buf[b:])
        bm[0, :] = np.maximum(bm[0, :], max(0, t.embed.peak_memory_bytes - t.embed.weight_bytes))
        bm[:, L] = np.maximum(bm[:, L], max(0, t.head.peak_memory_bytes - t.head.weight_bytes))
        mem += bm
        if runtime in ("exo-current", "mlx-pipeline"):
            mem += resident_bytes(t, runtime, False, False)
        else:
            mem[0, :] += t.embed.weight_bytes
            mem[:, L] += t.head.weight_bytes
            if t.model.tie_word_embeddings:
                mem[1:, L] += t.embed.weight_bytes
        return mem

    def without_nodes_above(self, pace_max: float) -> "ChainCosts":
        """A copy in which the nodes whose pace exceeds `pace_max` cannot run a stage."""
        cc = copy.copy(self)
        cc.comp = self.comp.copy()
        cc.comp[self.pace > pace_max] = np.inf
        return cc


def extrapolation_notes(cluster, workload: Workload) -> list[str]:
    """Where the workload lies outside a node's measured grids, one line per node and grid.

    Inside the grids a time is interpolated between measurements; outside it is extrapolated
    (see profiler.costtable.interpolate), which the user should know before trusting it:
    re-profile with a wider `--prefill-tokens` / `--decode-context` grid to measure it instead.
    """
    notes = []
    for node in sorted(cluster.nodes, key=lambda n: n.id):
        t = node.table
        for what, value, grid, flag in (
                ("prompt", workload.prompt_tokens, t.prefill_tokens, "--prefill-tokens"),
                ("context", workload.context_tokens, t.decode_context, "--decode-context")):
            if not grid[0] <= value <= grid[-1]:
                notes.append(f"{node.id}: {what} {value} tokens is outside the measured grid "
                             f"{grid[0]}..{grid[-1]}: extrapolated (profile with {flag} "
                             f"covering {value} to measure it)")
    return notes
