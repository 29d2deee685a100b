"""Node classes (interchangeable nodes), sub-clusters and set partitions: the structure the
replica search enumerates (graphsplit.replicas)."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Sequence


def subcluster(cluster, ids: Sequence[str]):
    """The cluster restricted to the nodes `ids` (links kept)."""
    keep = set(ids)
    return replace(cluster, nodes=[n for n in cluster.nodes if n.id in keep])


def node_classes(cluster) -> dict[str, int]:
    """Node id -> class index; nodes of one class are interchangeable (module docstring)."""
    ids = sorted(cluster.ids)

    def same(u: str, v: str) -> bool:
        nu, nv = cluster.node(u), cluster.node(v)
        if nu.table is not nv.table and _costs(nu.table) != _costs(nv.table):
            return False
        if nu.memory_bytes != nv.memory_bytes or cluster.link(u, v) != cluster.link(v, u):
            return False
        return all(cluster.link(u, x) == cluster.link(v, x) and
                   cluster.link(x, u) == cluster.link(x, v) for x in ids if x not in (u, v))

    cls: dict[str, int] = {}
    reps: list[str] = []
    for u in ids:
        for c, r in enumerate(reps):
            if same(u, r):
                cls[u] = c
                break
        else:
            cls[u] = len(reps)
            reps.append(u)
    return cls


def _costs(table) -> tuple:
    """Everything of a table the cost model reads (not the host's name): rows with every
    measured field (batch grids included), the grids, the model, the device's numbers."""
    d = table.device
    return (repr([sorted(vars(r).items()) for r in table.rows]), table.prefill_tokens,
            table.decode_context, repr(getattr(table, "decode_batch", None)),
            repr(table.model), d.memory_bandwidth_gbs, d.matmul_tflops,
            d.memory_usable_bytes, d.memory_total_bytes)


def set_partitions(items: Sequence[str]) -> Iterator[list[list[str]]]:
    """Every set partition of `items` (restricted growth strings), blocks in first-item order."""
    n = len(items)
    if n == 0:
        yield []
        return
    a = [0] * n

    def rec(i: int, k: int):
        if i == n:
            blocks = [[] for _ in range(k)]
            for x, b in zip(items, a):
                blocks[b].append(x)
            yield blocks
            return
        for b in range(k + 1):
            a[i] = b
            yield from rec(i + 1, max(k, b + 1))

    yield from rec(1, 1) if n > 1 else iter([[list(items)]])
