"""exo's own splitting rules, re-implemented as baselines (memory-only, speed- and link-blind).

* ``exo-legacy`` (RingMemoryWeightedPartitioningStrategy + map_partitions_to_shards, the rules in
  `graphsplit.exo_rules`): nodes weighted by TOTAL memory in whole MB (``total // 2**20``, what
  legacy exo's DeviceCapabilities reports), sorted by (memory, node id) descending; node i gets
  the fraction [start, round(start + mem_i / total, 5)); fractions map to layers by truncation,
  empty shards dropped. Returned here as half-open Stages.
* ``exo-current`` (master/placement.py, placement_utils.py): the smallest set ("cycle") of nodes
  whose summed AVAILABLE memory holds the model's storage size (among sets of that size: the
  most available memory, ties to the cluster file's order), layers proportional to available
  memory with largest-remainder rounding (floors, leftovers to the largest remainders, ties to
  the earlier node; a node left with 0 layers takes one from the node with the most, ties to the
  earlier). Layers follow the cycle's node order (here: the cluster file's order). Where exo
  refuses to place, so does the baseline, with "exo would refuse: ..." and exo's reason: no set
  of nodes holds the storage size ("No cycles found with sufficient memory"), or a node's share
  of the storage (``storage * layers // n_layers``) exceeds its available memory
  (``_allocate_and_validate_layers``: "Node i (id) has insufficient memory").
* ``exo-current-tensor`` (master/placement.py place_instance with Sharding.Tensor,
  placement_utils.get_shard_assignments_for_tensor_parallel): among the sets whose available
  memory holds the storage size, only those whose size divides hidden_size and
  num_key_value_heads ("No tensor sharding found ..." otherwise); the smallest of them (most
  available memory, ties to file order); every rank runs ALL layers with an equal share. A set
  of one node is placed as a one-node Pipeline (exo: "Single-node: force Pipeline"). Predicted
  with graphsplit.hybrid's cost model (needs the nodes' tensor-parallel profiles and the
  group's measured all-reduce).
* ``even``: every node in file order, n // D layers each, the first n % D nodes one more
  (mlx-lm's own even pipeline split).
"""

from __future__ import annotations

import itertools

from graphsplit.exo_rules import (exo_legacy_fractions, exo_truncation_map, memory_mb,
                                  proportional_counts)
from graphsplit.plan import Stage
from profiler.errors import UserError


class ExoWouldRefuse(UserError):
    """exo's own placement refuses this cluster; the message starts "exo would refuse: "."""


def _check(nodes, n_layers):
    if not nodes:
        raise UserError("baseline: no nodes")
    if n_layers < 1:
        raise UserError("baseline: the model has no layers")


def exo_legacy_partition(nodes: list[tuple[str, int]], n_layers: int) -> list[Stage]:
    """Legacy exo's ring memory-weighted split of `n_layers` over (node_id, TOTAL memory in MB)."""
    _check(nodes, n_layers)
    if sum(m for _, m in nodes) <= 0:
        raise UserError("exo-legacy baseline: the nodes report no memory")
    return [Stage(nid, a, b + 1)
            for nid, a, b in exo_truncation_map(exo_legacy_fractions(nodes), n_layers)]


def largest_remainder(n_layers: int, weights: list[float]) -> list[int]:
    """Integer layer counts proportional to weights (graphsplit.exo_rules.proportional_counts),
    refusing what current exo refuses: more nodes than layers, no memory at all."""
    n = len(weights)
    if n > n_layers:
        raise UserError(f"cannot give {n} nodes at least one of {n_layers} layers each")
    if float(sum(weights)) <= 0:
        raise UserError("exo-current baseline: the nodes report no available memory")
    return proportional_counts(n_layers, weights)


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
    model (most available memory among sets of that size; ties to file order). Raises
    ExoWouldRefuse when no set does (exo: "No cycles found with sufficient memory").

    Complexity: O(2^N) subsets in the worst case (N nodes; exo enumerates its cycles likewise)."""
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
    have = sum(n.available_bytes for n in nodes)
    raise ExoWouldRefuse(
        f"exo would refuse: no set of nodes has the model's {_gb(need)} of storage available "
        f"(all {len(nodes)} together have {_gb(have)}; exo: \"No cycles found with sufficient "
        "memory\")")


def _gb(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def exo_current_memory_check(nodes: list[tuple[str, int]], stages: list[Stage],
                             storage_bytes: int, n_layers: int) -> None:
    """exo's per-node check after allocating layers: a node's share of the storage,
    `storage * layers // n_layers`, must not exceed its available memory."""
    avail = dict(nodes)
    for i, s in enumerate(stages):
        need = storage_bytes * s.n_layers // n_layers
        if need > avail[s.node]:
            raise ExoWouldRefuse(
                f"exo would refuse: node {i} ({s.node}) needs {_gb(need)} for {s.n_layers} "
                f"layers but has {_gb(avail[s.node])} available (exo: \"has insufficient "
                "memory\")")


def exo_legacy_stages(cluster) -> list[Stage]:
    return exo_legacy_partition([(n.id, memory_mb(n.total_bytes)) for n in cluster.nodes],
                                cluster.n_layers)


def exo_current_stages(cluster) -> list[Stage]:
    cyc = exo_current_cycle(cluster)
    if len(cyc) > cluster.n_layers:
        raise ExoWouldRefuse(f"exo would refuse: cannot distribute {cluster.n_layers} layers "
                             f"across {len(cyc)} nodes (needs at least 1 layer per node)")
    nodes = [(n.id, int(n.available_bytes)) for n in cyc]
    stages = exo_current_partition(nodes, cluster.n_layers)
    exo_current_memory_check(nodes, stages, model_storage_bytes(cluster.nodes[0].table),
                             cluster.n_layers)
    return stages


def exo_current_tensor_stages(cluster) -> list[Stage]:
    """Current exo's Tensor placement (module docstring); ExoWouldRefuse with exo's reason."""
    from graphsplit.hybrid.shares import equal_cut_problem, tensor_stage

    need = model_storage_bytes(cluster.nodes[0].table)
    m = cluster.nodes[0].table.model
    kv, hidden, L = m.num_key_value_heads, m.hidden_size, cluster.n_layers
    if not kv:  # an older table: from its tensor-parallel section
        from graphsplit.hybrid.costs import model_dims
        kv = model_dims(cluster)[0]
    for k in range(1, len(cluster.nodes) + 1):
        best = None
        for combo in itertools.combinations(cluster.nodes, k):
            s = sum(n.available_bytes for n in combo)
            if s >= need and (k == 1 or equal_cut_problem(k, kv, hidden) is None) and (
                    best is None or s > best[0]):
                best = (s, combo)
        if best is not None:
            ids = [n.id for n in best[1]]
            if k == 1:
                return [Stage(ids[0], 0, L)]
            from graphsplit.hybrid.costs import model_dims
            return [tensor_stage(ids, [kv // k] * k, 0, L, model_dims(cluster)[1])]
    raise ExoWouldRefuse(
        f"exo would refuse: no set of nodes holds the model's {_gb(need)} with a size that "
        f"divides hidden_size {hidden} and num_key_value_heads {kv} (exo: \"No tensor sharding "
        "found\" / \"No cycles found with sufficient memory\")")


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
             "exo-current-tensor": exo_current_tensor_stages, "even": even_stages}
