"""The cost model of a plan with tensor-parallel stages (direct sums: the reference).

A stage s runs blocks [a, b) on a group G = (m_1, ..., m_g) in chain order, member m_j holding
k_j whole KV heads (a plain stage is g = 1 and costs exactly as graphsplit.costmodel). For one
pass p of the runtime's protocol (graphsplit.costmodel.protocol: tokens x_p, KV context c_p,
count n_p), all times derived from the measured tables:

    blocks_s = sum_{i in [a, b)} max_j tp_{m_j}(i, k_j, p)           (I2: one rank, no all-reduce)
    ar_s     = 2 (b - a) AR_G(A x_p)                                 (I3: the group's measured
                                                                      all_sum, A = all-reduce
                                                                      bytes per token; as the
                                                                      runtime sums: exo-current
                                                                      MLX's all_sum, ours the
                                                                      entry's `seconds`)
    entry_s  = sum_{j < g} link(m_j -> m_{j+1}).time(e x_p)          (mlx-pipeline only)
    compute_s = blocks_s + ar_s + entry_s [+ embed] [+ head + sampling]

Every block ends in an all-reduce, a barrier: the slowest member sets each block's pace, hence
the max inside the sum (equal to "the slowest member's compute" when blocks are alike).
The runtimes (graphsplit.hybrid.shares says which plans each can run):

* ``mlx-pipeline`` (ours, exo_bridge/runner/tensor.py): the activation reaches a group's first
  member over the link from the previous stage's LAST member (the one that ends the stage) and is
  forwarded along the chain (entry_s); the first stage's first member embeds, the last stage's
  last member runs norm + head + sampling and sends the token id back to the first (closure,
  also when a single group is the whole plan).
* ``exo-current``: one Tensor instance, every rank all layers, equal shares; every rank embeds,
  runs the head and samples (exo's tensor_auto_parallel shards only the blocks), so the slowest
  rank's embed and head set the pace; no links besides the all-reduces.

Memory of member m_j (must fit its usable memory)::

    sum_i w_{m_j}(i, k_j) + kv_tokens x streams x sum_i kv_{m_j}(i, k_j) + buffers + embed + head

with buffers as for a whole block (an upper bound: a rank's activations are at most the whole
block's) and embedding + head resident on every member (mlx-lm's `shard()` and exo keep them
whole on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from graphsplit.costmodel import (Pass, Prediction, Protocol, Workload, check_runtime, protocol,
                                  stage_memory)
from graphsplit.hybrid import tables
from graphsplit.hybrid.shares import check_runtime_can_run
from graphsplit.plan import Stage, check_stages
from profiler.errors import UserError


class UnmeasuredGroup(UserError):
    """A tensor group whose all-reduce was never measured."""


@dataclass
class HybridPrediction(Prediction):
    """Prediction plus, per tensor stage (keyed by its node), what its group costs."""
    tensor: dict[str, dict[str, Any]] = field(default_factory=dict)
    derived_shares: bool = False  # a rank's time interpolated between measured shares / sizes


def model_dims(cluster) -> tuple[int, int, int]:
    """(n_kv_heads, intermediate_size, hidden_size) of the cluster's model: the tables' model
    info, else the first node's tensor_parallel section."""
    m = cluster.nodes[0].table.model
    kv, inter = m.num_key_value_heads, m.intermediate_size
    if not kv:
        kv = tables.n_kv_heads(cluster.nodes[0])
    if not inter:  # an older table: the MLP columns of a measured share, scaled to all heads
        r = tables.section(cluster.nodes[0])["rows"][0]
        inter = round(r["mlp_columns"] * kv / r["kv_heads"])
    return int(kv), int(inter), int(m.hidden_size)


def collective(cluster, group: Sequence[str], runtime: str = "mlx-pipeline"):
    """The group's measured all_sum as `runtime` runs it (exo-current: MLX's own all_sum where
    the entry keeps it beside the runner's neighbour chain), or one line saying how to measure
    it."""
    c = cluster.collective(group, "all_sum")
    if c is not None and runtime == "exo-current" and c.mlx_all_sum is not None:
        return c.mlx_all_sum
    if c is None:
        where = f" in {cluster.path}" if cluster.path else ""
        raise UnmeasuredGroup(
            f"group {'+'.join(group)}: no measured all_sum over exactly these nodes{where}; "
            f"measure it with `profile-link collective --nodes {','.join(group)} "
            f"--cluster {cluster.path or 'CLUSTER.json'} --hostfile HOSTS.json --rank R` on "
            "each member (or leave the group out)")
    return c


def pass_x(p: Pass) -> tuple[str, float]:
    return ("prefill", p.tokens) if p.metric == "prefill" else ("decode", p.context)


def cut_bytes(node, layer_end: int) -> float:
    """Activation bytes per token leaving block layer_end - 1 (the embedding at 0)."""
    t = node.table
    return (t.embed if layer_end == 0 else t.row(f"layers.{layer_end - 1}")
            ).activation_bytes_per_token


def chain_time(cluster, members: Sequence[str], nbytes: float) -> float:
    """The activation forwarded along the group's chain m_1 -> m_2 -> ... (k - 1 hops)."""
    return sum(cluster.link(a, b).time(nbytes) for a, b in zip(members, members[1:]))


@dataclass
class GroupTime:
    compute: float  # blocks + all-reduces + entry (+ embed / head where charged here)
    blocks: float
    allreduce: float
    entry: float
    per_member: list[float]  # each member's own block time, summed over the passes
    derived: bool


def group_time(cluster, st: Stage, passes: Sequence[Pass], runtime: str, first: bool,
               last: bool, sampling_s: float) -> GroupTime:
    """A tensor stage's time summed over `passes` (see the module docstring)."""
    t = st.tensor
    nodes = [cluster.node(m) for m in t.nodes]
    col = collective(cluster, t.nodes, runtime)
    A = tables.allreduce_bytes_per_token(nodes[0])
    blocks = ar = entry = 0.0
    own = [0.0] * len(nodes)
    derived = False
    for p in passes:
        phase, x = pass_x(p)
        for i in range(st.start_layer, st.end_layer):
            ts = []
            for j, (n, k) in enumerate(zip(nodes, t.kv_heads)):
                s, d = tables.tp_seconds(n, i, k, phase, x)
                derived = derived or d
                ts.append(s)
                own[j] += p.count * s
            blocks += p.count * max(ts)
        ar += p.count * 2 * st.n_layers * col.time(A * p.tokens)
        if runtime == "mlx-pipeline":
            entry += p.count * chain_time(cluster, t.nodes,
                                          cut_bytes(nodes[0], st.start_layer) * p.tokens)
    pr = _rows_protocol(passes, runtime)
    extra = 0.0
    if runtime == "mlx-pipeline":
        if first:
            extra += pr.block_time(nodes[0].table, nodes[0].table.embed)
        if last:
            extra += pr.head_time(nodes[-1].table, sampling_s)
    elif first:  # exo-current: every rank embeds; the pace of the head is charged by the caller
        extra += max(pr.block_time(n.table, n.table.embed) for n in nodes)
    return GroupTime(blocks + ar + entry + extra, blocks, ar, entry, own, derived)


def _rows_protocol(passes, runtime) -> Protocol:
    """The runtime's protocol restricted to `passes` (for embedding / head rows)."""
    return Protocol(runtime, tuple(passes), head_on_every_rank=runtime == "exo-current",
                    token_closure=runtime != "exo-current")


def member_memory(cluster, st: Stage, j: int, workload: Workload, runtime: str, first: bool,
                  last: bool) -> int:
    """Bytes member j of a tensor stage holds (see the module docstring)."""
    node = cluster.node(st.tensor.nodes[j])
    k = st.tensor.kv_heads[j]
    w = kv = 0.0
    for i in range(st.start_layer, st.end_layer):
        a, b = tables.tp_bytes(node, i, k)
        w, kv = w + a, kv + b
    whole = stage_memory(node, st.start_layer, st.end_layer, workload, runtime, first, last)
    t = node.table
    rows = [t.row(f"layers.{i}") for i in range(st.start_layer, st.end_layer)]
    whole_w = sum(r.weight_bytes for r in rows)
    whole_kv = workload.kv_tokens * workload.streams * sum(r.kv_bytes_per_token for r in rows)
    rest = whole - whole_w - whole_kv  # buffers + resident embedding / head, as a whole stage
    return int(w + workload.kv_tokens * workload.streams * kv + rest)


def check_tensor_plan(cluster, stages: Sequence[Stage], runtime: str) -> None:
    """Shares, members and runtime: everything a tensor plan must satisfy before it is priced."""
    kv, inter, hidden = model_dims(cluster)
    check_stages(list(stages), cluster.n_layers, "stages", kv, inter or None)
    known = set(cluster.ids)
    for st in stages:
        for m in st.members:
            if m not in known:
                raise UserError(f"stage node {m!r} is not in the cluster (nodes: "
                                f"{', '.join(cluster.ids)})")
    check_runtime_can_run(stages, runtime, kv, hidden)
    for st in stages:
        if st.tensor is not None:
            collective(cluster, st.tensor.nodes)
            for m in st.tensor.nodes:
                tables.section(cluster.node(m))


def _plain_time(cluster, st: Stage, pr, first: bool, last: bool, sampling_s: float) -> float:
    t = cluster.node(st.node).table
    c = sum(pr.block_time(t, t.row(f"layers.{i}")) for i in range(st.start_layer, st.end_layer))
    if first:
        c += pr.block_time(t, t.embed)
    if last:
        c += pr.head_time(t, sampling_s)
    return c


def protocol_time_hybrid(cluster, stages: Sequence[Stage], workload: Workload, runtime: str,
                         metric: str):
    """(total, per-stage compute, per-stage out transfer, head pace, tensor details)."""
    pr = protocol(cluster, runtime, metric, workload)
    S = len(stages)
    comp, link, info = [], [], {}
    pace = 0.0
    for s, st in enumerate(stages):
        first, last = s == 0, s == S - 1
        if st.tensor is None:
            c = _plain_time(cluster, st, pr, first, last, workload.sampling_s)
        else:
            g = group_time(cluster, st, pr.passes, runtime, first, last, workload.sampling_s)
            c = g.compute
            info[st.node] = g
            if runtime == "exo-current":  # every rank runs the head: the slowest sets the pace
                pace = max(pr.head_time(cluster.node(m).table, workload.sampling_s)
                           for m in st.tensor.nodes)
        tail = st.members[-1]
        if S == 1 and tail == st.node:
            o = 0.0
        elif s < S - 1:
            nxt = stages[s + 1].node
            o = pr.cut_time(cluster.link(tail, nxt), cluster.link(nxt, tail),
                            cut_bytes(cluster.node(tail), st.end_layer))
        else:
            o = pr.closure_time(cluster.link(tail, stages[0].node), workload.token_bytes)
        comp.append(c)
        link.append(o)
    return sum(comp) + sum(link) + pace, comp, link, pace, info


def predict_hybrid(cluster, stages: Sequence[Stage], workload: Workload = Workload(),
                   runtime: str = "mlx-pipeline") -> HybridPrediction:
    """graphsplit.costmodel.predict for plans with tensor stages (the hook calls this)."""
    check_runtime(runtime)
    stages = list(stages)
    check_tensor_plan(cluster, stages, runtime)
    if workload.prefill_chunks > 1:
        raise UserError("prefill_chunks > 1 is not modelled for tensor-parallel stages; use 1")
    tpot, comp, out, pace, info = protocol_time_hybrid(cluster, stages, workload, runtime,
                                                       "decode")
    ttft, pcomp, _, _, _ = protocol_time_hybrid(cluster, stages, workload, runtime, "prefill")
    bott = tpot if runtime == "exo-current" else max(c + o for c, o in zip(comp, out))
    mem, cap, tensor = {}, {}, {}
    roof, est, derived = 0.0, False, False
    S = len(stages)
    for s, st in enumerate(stages):
        first, last = s == 0, s == S - 1
        for j, m in enumerate(st.members):
            node = cluster.node(m)
            est = est or node.estimated
            mem[m] = (member_memory(cluster, st, j, workload, runtime, first, last)
                      if st.tensor is not None else
                      stage_memory(node, st.start_layer, st.end_layer, workload, runtime,
                                   first, last))
            cap[m] = int(node.memory_bytes)
        roof += _roofline(cluster, st, first, last)
        if st.tensor is not None:
            g = info[st.node]
            derived = derived or g.derived
            tensor[st.node] = {"nodes": list(st.tensor.nodes),
                               "kv_heads": list(st.tensor.kv_heads),
                               "member_compute_s": dict(zip(st.tensor.nodes, g.per_member)),
                               "blocks_s": g.blocks, "allreduce_s": g.allreduce,
                               "entry_s": g.entry, "derived_shares": g.derived}
    thr = min(workload.streams / tpot, 1.0 / bott) if tpot > 0 else float("inf")
    short = {n: mem[n] - cap[n] for n in mem if mem[n] > cap[n]}
    names = [st.node for st in stages]
    return HybridPrediction(
        tpot_s=tpot, ttft_s=ttft, throughput_tps=thr, bottleneck_s=bott,
        stage_memory_bytes=mem, stage_capacity_bytes=cap,
        stage_compute_s=dict(zip(names, comp)), stage_link_s=dict(zip(names, out)),
        stage_prefill_s=dict(zip(names, pcomp)), roofline_tpot_s=roof, estimated=est,
        shortfalls=short, protocol=runtime, head_pace_s=pace, tensor=tensor,
        derived_shares=derived,
        # tensor-parallel shares are profiled at decode batch 1: B streams are B micro-batches
        # of one (costmodel.objective_value reads these; min(B / tpot, 1 / bottleneck) above)
        decode_batch=1, micro_batches=workload.streams, served_streams=workload.streams,
        cycle_s=max(tpot, workload.streams * bott))


def _roofline(cluster, st: Stage, first: bool, last: bool) -> float:
    """Weights each member reads per token over its memory bandwidth; the slowest member."""
    out = []
    for j, m in enumerate(st.members):
        node = cluster.node(m)
        t = node.table
        if st.tensor is None:
            wb = sum(t.row(f"layers.{i}").weight_bytes for i in range(st.start_layer,
                                                                        st.end_layer))
        else:
            wb = sum(tables.tp_bytes(node, i, st.tensor.kv_heads[j])[0]
                     for i in range(st.start_layer, st.end_layer))
        wb += (t.embed.weight_bytes if first else 0) + (t.head.weight_bytes if last else 0)
        bw = t.device.memory_bandwidth_gbs * 1e9
        out.append(wb / bw if bw > 0 else float("inf"))
    return max(out)
