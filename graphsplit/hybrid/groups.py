"""Dense costs of every candidate stage kind for the hybrid search.

A candidate is (group G, first member h, last member t): a plain node (G = {d}, h = t = d) or a
tensor group whose all_sum was measured (the cluster's `collectives`), 2 <= |G| <= n_kv_heads,
every member profiled at tensor-parallel shares. Its cost matrix C[a, b] is the stage time of
blocks [a, b) without the outgoing transfer (graphsplit.hybrid.costs, the same formulas, here as
arrays over all ranges), minimised over

* the share vectors (every composition of n_kv_heads into |G| positive parts, or the equal one
  with --tp-shares equal) whose every member fits its memory, and
* the order of the interior members of the chain h -> ... -> t (it only sets entry_s),

both independent of everything outside the stage, so the minimum is exact. +inf where nothing
fits. Building costs O(sum_G (#shares x |G| x L^2 + |G|^2 (|G|-2)! L)) time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from graphsplit.costmodel import ChainCosts, Workload, protocol
from graphsplit.hybrid import tables
from graphsplit.hybrid.costs import model_dims, pass_x
from graphsplit.hybrid.shares import share_vectors
from profiler.errors import UserError

INF = np.inf


@dataclass
class Candidate:
    group: tuple[str, ...]  # sorted member ids
    mask: int  # bit set of member indices (in `ids`)
    head: int  # index of the first member (receives from the previous stage)
    tail: int  # index of the last member (sends to the next stage)
    C: np.ndarray  # (L+1, L+1) stage time without the outgoing transfer
    shares: np.ndarray | None  # (L+1, L+1) index into `share_list` of the best shares
    share_list: list[tuple[int, ...]]  # share vectors, aligned with `group`
    orders: list[tuple[str, ...]]  # best chain order per start block a (tensor groups)
    blocks: np.ndarray | None = None  # (L+1, L+1) blocks + all-reduces only (tensor groups)


@dataclass
class HybridCosts:
    ids: list[str]
    L: int
    cc: ChainCosts  # plain-stage costs, links, closure (graphsplit.costmodel)
    cands: list[Candidate]
    skipped: list[str]  # groups left out, and why (one phrase each)
    n_kv: int
    intermediate: int


def candidate_groups(cluster, n_kv: int, max_group: int | None) -> tuple[list, list[str]]:
    """The measured groups a tensor stage can use, sorted, and the ones left out with why."""
    out, skipped = [], []
    ids = set(cluster.ids)
    for (group, op) in sorted(cluster.collectives):
        if op != "all_sum" or not set(group) <= ids:
            continue
        if len(group) > n_kv:
            skipped.append(f"{'+'.join(group)} (more ranks than the {n_kv} KV heads)")
            continue
        if max_group is not None and len(group) > max_group:
            skipped.append(f"{'+'.join(group)} (larger than --max-group {max_group})")
            continue
        try:
            for m in group:
                tables.section(cluster.node(m))
        except UserError as e:
            skipped.append(f"{'+'.join(group)} ({e})")
            continue
        out.append(group)
    return out, skipped


def _pass_arrays(cluster, node, k: int, passes, L: int) -> np.ndarray:
    """Per-block seconds of one rank of `node` at k KV heads, summed over the passes."""
    out = np.zeros(L)
    for p in passes:
        phase, x = pass_x(p)
        out += p.count * np.array([tables.tp_seconds(node, i, k, phase, x)[0] for i in range(L)])
    return out


def _tensor_candidates(cluster, group, ids, cc: ChainCosts, workload: Workload, metric: str,
                       n_kv: int, inter: int, tp_shares: str) -> list[Candidate]:
    L = cc.L
    pr = protocol(cluster, "mlx-pipeline", metric, workload)
    idx = [ids.index(m) for m in group]
    nodes = [cluster.node(m) for m in group]
    col = cluster.collective(group, "all_sum")
    A = tables.allreduce_bytes_per_token(nodes[0])
    ar = sum(p.count * 2 * col.time(A * p.tokens) for p in pr.passes)
    shares = share_vectors(n_kv, len(group), tp_shares)
    if not shares:
        return []
    kvt = workload.kv_tokens * workload.streams
    valid = np.arange(L + 1)[:, None] < np.arange(L + 1)[None, :]
    times, mems = {}, {}
    for j, node in enumerate(nodes):
        d = idx[j]
        t = node.table
        rows = [t.row(f"layers.{i}") for i in range(L)]
        wpre = np.concatenate([[0.0], np.cumsum([r.weight_bytes for r in rows])])
        kpre = np.concatenate([[0.0], np.cumsum([r.kv_bytes_per_token for r in rows])])
        rest = cc.mem[d] - (wpre[None, :] - wpre[:, None]) - kvt * (kpre[None, :] - kpre[:, None])
        for k in sorted({s[j] for s in shares}):
            times[j, k] = _pass_arrays(cluster, node, k, pr.passes, L)
            b = [tables.tp_bytes(node, i, k) for i in range(L)]
            w = np.concatenate([[0.0], np.cumsum([x[0] for x in b])])
            kv = np.concatenate([[0.0], np.cumsum([x[1] for x in b])])
            mem = (w[None, :] - w[:, None]) + kvt * (kv[None, :] - kv[:, None]) + rest
            mems[j, k] = np.floor(mem + 1e-6) <= node.memory_bytes
    best = np.full((L + 1, L + 1), INF)
    arg = np.full((L + 1, L + 1), -1)
    for si, s in enumerate(shares):
        per = np.max([times[j, k] for j, k in enumerate(s)], axis=0) + ar
        pre = np.concatenate([[0.0], np.cumsum(per)])
        c = pre[None, :] - pre[:, None]
        fit = valid.copy()
        for j, k in enumerate(s):
            fit &= mems[j, k]
        c[~fit] = INF
        better = c < best
        best[better], arg[better] = c[better], si
    out = []
    e = np.array([tables_cut(nodes, j, L) for j in range(len(nodes))])  # (g, L+1) bytes/token
    for h, t in itertools.permutations(range(len(group)), 2):
        inner = [j for j in range(len(group)) if j not in (h, t)]
        entry = np.full(L + 1, INF)
        orders: list = [None] * (L + 1)
        for perm in itertools.permutations(inner):
            chain = (h,) + perm + (t,)
            for a in range(L):
                x = sum(p.count * sum(cluster.link(group[u], group[v]).time(e[h, a] * p.tokens)
                                      for u, v in zip(chain, chain[1:])) for p in pr.passes)
                if x < entry[a]:
                    entry[a], orders[a] = x, tuple(group[u] for u in chain)
        C = best + entry[:, None]
        C[0, :] += cc.t_embed[idx[h]]
        C[:, L] += cc.t_head[idx[t]]
        mask = sum(1 << d for d in idx)
        out.append(Candidate(tuple(group), mask, idx[h], idx[t], C, arg, shares, orders, best))
    return out


def tables_cut(nodes, j: int, L: int) -> list[float]:
    """Activation bytes per token entering block a (a = 0..L) on member j's table."""
    t = nodes[j].table
    return [t.embed.activation_bytes_per_token] + [
        t.row(f"layers.{i}").activation_bytes_per_token for i in range(L)]


def build(cluster, workload: Workload, metric: str, tp_shares: str = "any",
          max_group: int | None = None) -> HybridCosts:
    """Every candidate stage kind of `cluster` for one metric (mlx-pipeline's protocol)."""
    ids = sorted(cluster.ids)
    cc = ChainCosts(cluster, workload, "mlx-pipeline", metric, ids)
    n_kv, inter, _ = model_dims(cluster) if cluster.collectives else (0, 0, 0)
    cands = [Candidate((d,), 1 << i, i, i, cc.comp[i], None, [], [])
             for i, d in enumerate(ids)]
    groups, skipped = candidate_groups(cluster, n_kv, max_group) if cluster.collectives \
        else ([], [])
    for g in groups:
        cands += _tensor_candidates(cluster, g, ids, cc, workload, metric, n_kv, inter,
                                    tp_shares)
    return HybridCosts(ids, cc.L, cc, cands, skipped, n_kv, inter)
