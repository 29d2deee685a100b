"""The model's compute as a networkx DiGraph with measured per-device costs.

Nodes (operations): ``embed``, ``layers.<i>`` (or ``layers.<i>.attn`` and ``layers.<i>.mlp`` with
``sub_blocks=True``), ``head`` (final norm + LM head + sampling). Node attributes:

* ``kind`` (embed | block | attn | mlp | head), ``layer`` (block index or None), ``order``
  (a topological index);
* ``decode_s`` / ``prefill_s``: {device id: seconds} at the workload's context / prompt length
  (interpolated from the device's measured table; sampling added to ``head``);
* ``weight_bytes``, ``kv_bytes`` (for context x streams), ``buffer_bytes`` (peak - weights);
* ``estimated``: True for sub-blocks (a block's measured numbers split between attention and MLP
  in proportion to their parameter counts; KV entirely in attention).

Edges carry ``bytes_per_token``: the activation bytes per token leaving the source.
With sub-blocks each block is  x -> attn -> mlp  plus the residual edge x -> mlp: not a chain.
"""

from __future__ import annotations

import networkx as nx

from graphsplit.costmodel import Workload


def _attn_fraction(model) -> float:
    h = model.hidden_size
    nh, nkv, hd, inter = (model.num_attention_heads, model.num_key_value_heads, model.head_dim,
                          model.intermediate_size)
    if not (h and nh and hd and inter):
        return 1 / 3
    nkv = nkv or nh
    attn = h * nh * hd * 2 + h * nkv * hd * 2
    mlp = 3 * h * inter
    return attn / (attn + mlp)


def build_graph(cluster, workload: Workload = Workload(), sub_blocks: bool = False) -> nx.DiGraph:
    """DiGraph of embed -> blocks -> head with per-device times from `cluster`'s tables.

    O(V D) with V = L (+ L with sub-blocks) + 2 operations and D devices.
    """
    P, C = workload.prompt_tokens, workload.context_tokens
    kvt = workload.kv_tokens * workload.streams
    t0 = cluster.nodes[0].table
    g = nx.DiGraph(model=cluster.model, n_layers=cluster.n_layers, sub_blocks=sub_blocks)
    frac = _attn_fraction(t0.model)

    def costs(row, share=1.0, extra=0.0):
        dec, pre = {}, {}
        for n in cluster.nodes:
            r = n.table.row(row)
            dec[n.id] = n.table.decode_time(r, C) * share + extra
            pre[n.id] = n.table.prefill_time(r, P) * share + extra
        return dec, pre

    order = 0

    def add(name, row, kind, layer, share=1.0, kv_share=1.0, extra=0.0, estimated=False):
        nonlocal order
        r = t0.row(row)
        dec, pre = costs(row, share, extra)
        g.add_node(name, kind=kind, layer=layer, order=order, decode_s=dec, prefill_s=pre,
                   weight_bytes=r.weight_bytes * share,
                   kv_bytes=kvt * r.kv_bytes_per_token * kv_share,
                   buffer_bytes=max(0, r.peak_memory_bytes - r.weight_bytes),
                   activation_bytes_per_token=r.activation_bytes_per_token,
                   estimated=estimated)
        order += 1

    add("embed", "embed", "embed", None)
    prev = "embed"
    for i in range(cluster.n_layers):
        row = f"layers.{i}"
        if not sub_blocks:
            add(row, row, "block", i)
            g.add_edge(prev, row, bytes_per_token=g.nodes[prev]["activation_bytes_per_token"])
            prev = row
            continue
        a, m = f"{row}.attn", f"{row}.mlp"
        add(a, row, "attn", i, share=frac, kv_share=1.0, estimated=True)
        add(m, row, "mlp", i, share=1 - frac, kv_share=0.0, estimated=True)
        e = g.nodes[prev]["activation_bytes_per_token"]
        g.add_edge(prev, a, bytes_per_token=e)
        g.add_edge(a, m, bytes_per_token=e)
        g.add_edge(prev, m, bytes_per_token=e)  # the residual stream
        prev = m
    add("head", "head", "head", None, extra=workload.sampling_s)
    g.add_edge(prev, "head", bytes_per_token=g.nodes[prev]["activation_bytes_per_token"])
    return g


def is_chain(g: nx.DiGraph) -> bool:
    """True when the graph is a simple path (each node at most one predecessor and successor)."""
    return all(g.in_degree(v) <= 1 and g.out_degree(v) <= 1 for v in g) and \
        nx.is_weakly_connected(g)
