"""exo's own splitting rules, re-implemented as baselines (memory-only, speed- and link-blind).

* ``exo-legacy`` (RingMemoryWeightedPartitioningStrategy + map_partitions_to_shards): nodes
  sorted by (TOTAL memory, node id) descending; node i gets the fraction
  [start, round(start + mem_i / total, 5)); fractions map to layers by truncation:
  start_layer = int(start * n), end_layer = int(end * n) - 1 (inclusive), the last shard forced to
  end at n - 1, empty shards dropped. Returned here as half-open Stages.
* ``exo-current`` (master/placement.py): the smallest set ("cycle") of nodes whose summed
  AVAILABLE memory holds the model's storage size (among sets of that size: the most available
  memory, ties to the cluster file's order), layers proportional to available memory with
  largest-remainder rounding (floors, leftovers to the largest remainders, ties to the earlier
  node; a node left with 0 layers takes one from the node with the most, ties to the earlier).
  Layers follow the cycle's node order (here: the cluster file's order).
* ``even``: every node in file order, n // D layers each, the first n % D nodes one more
  (mlx-lm's own even pipeline split).
"""

from __future__ import annotations

import itertools

from graphsplit.plan import Stage
from profiler.errors import UserError


def _check(nodes, n_layers):
    if not nodes:
        raise UserError("baseline: no nodes")
    if n_layers < 1:
        raise UserError("baseline: the model has no layers")


def exo_legacy_fractions(nodes: list[tuple[str, float]]) -> list[tuple[str, float, float]]:
    """Legacy exo's RingMemoryWeighted fractions: nodes sorted by (memory, id) descending, each
    [start, round(start + mem / total, 5)). With no memory reported at all, equal shares."""
    order = sorted(nodes, key=lambda x: (x[1], x[0]), reverse=True)
    total = sum(m for _, m in order)
    parts = []
    start = 0.0
    for nid, mem in order:
        share = mem / total if total > 0 else 1.0 / len(order)
        end = round(start + share, 5)
        parts.append((nid, start, end))
        start = end
    return parts


def exo_truncation_map(parts: list[tuple[str, float, float]],
                       n_layers: int) -> list[tuple[str, int, int]]:
    """Legacy exo's fraction -> layer rule (`map_partitions_to_shards`): (node, start, END
    INCLUSIVE) with start = int(start * n), end = int(end * n) - 1, the last partition forced to
    end at n - 1, empty ones dropped. Truncation, not rounding: k / n can land on layer k - 1."""
    out: list[tuple[str, int, int]] = []
    for i, (nid, s, e) in enumerate(parts):
        a = int(s * n_layers)
        b = int(e * n_layers) - 1
        if i == len(parts) - 1:
            b = n_layers - 1
        if a <= b:
            out.append((nid, a, b))
    if out and out[-1][2] < n_layers - 1:
        nid, a, _ = out[-1]
        out[-1] = (nid, a, n_layers - 1)
    return out


def exo_legacy_partition(nodes: list[tuple[str, int]], n_layers: int) -> list[Stage]:
    """Legacy exo's ring memory-weighted split of `n_layers` over (node_id, TOTAL memory)."""
    _check(nodes, n_layers)
    if sum(m for _, m in nodes) <= 0:
        raise UserError("exo-legacy baseline: the nodes report no memory")
    return [Stage(nid, a, b + 1)
            for nid, a, b in exo_truncation_map(exo_legacy_fractions(nodes), n_layers)]


def largest_remainder(n_layers: int, weights: list[float]) -> list[int]:
    """Integer layer counts proportional to weights: floors, leftovers to the largest remainders
    (ties to the earlier), then every count >= 1 (taken from the largest, ties to the earlier)."""
    n = len(weights)
    if n > n_layers:
        raise UserError(f"cannot give {n} nodes at least one of {n_layers} layers each")
    total = float(sum(weights))
    if total <= 0:
        raise UserError("exo-current baseline: the nodes report no available memory")
    raw = [w / total * n_layers for w in weights]
    counts = [int(r) for r in raw]
    rem = [r - c for r, c in zip(raw, counts)]
    left = n_layers - sum(counts)
    for i in sorted(range(n), key=lambda i: -rem[i])[:left]:
        counts[i] += 1
    for i in range(n):
        if counts[i] == 0:
            j = max(range(n), key=lambda k: (counts[k], -k))
            counts[j] -= 1
            counts[i] = 1
    return counts


def exo_current_partition(nodes: list[tuple[str, int]], n_layers: int) -> list[Stage]:
    """Current exo's split of `n_layers` over (node_id, AVAILABLE memory), in the given order."""
    _check(nodes, n_layers)
    counts = largest_remainder(n_layers, [m for _, m in nodes])
    out, a = [], 0
    for (nid, _), k in zip(nodes, counts):
        out.append(Stage(nid, a, a + k))
        a += k
    return out


def model_storage_bytes(table) -> int:
    """The model's weight bytes (what exo compares with the cycle's memory)."""
    return int(sum(r.weight_bytes for r in table.rows))


def exo_current_cycle(cluster) -> list:
    """The nodes exo-current would place on: the smallest set whose available memory holds the
    model (most available memory among sets of that size; ties to file order)."""
    need = model_storage_bytes(cluster.nodes[0].table)
    nodes = cluster.nodes
    for k in range(1, len(nodes) + 1):
        best = None
        for combo in itertools.combinations(nodes, k):
            s = sum(n.available_bytes for n in combo)
            if s >= need and (best is None or s > best[0]):
                best = (s, combo)
        if best is not None:
            return list(best[1])
    return list(nodes)  # nothing holds it: exo would refuse; show the all-node split


def exo_legacy_stages(cluster) -> list[Stage]:
    return exo_legacy_partition([(n.id, int(n.total_bytes)) for n in cluster.nodes],
                                cluster.n_layers)


def exo_current_stages(cluster) -> list[Stage]:
    cyc = exo_current_cycle(cluster)
    cyc = cyc[:cluster.n_layers]
    return exo_current_partition([(n.id, int(n.available_bytes)) for n in cyc], cluster.n_layers)


def even_stages(cluster) -> list[Stage]:
    n, ids = cluster.n_layers, cluster.ids[:cluster.n_layers]
    D = len(ids)
    out, a = [], 0
    for i, nid in enumerate(ids):
        k = n // D + (1 if i < n % D else 0)
        out.append(Stage(nid, a, a + k))
        a += k
    return out


BASELINES = {"exo-legacy": exo_legacy_stages, "exo-current": exo_current_stages,
             "even": even_stages}
