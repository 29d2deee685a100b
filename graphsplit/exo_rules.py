"""Legacy exo's own splitting rules, the one implementation (plain Python, standard library only).

Legacy exo (the Python node, 2024 to early 2025, last commit e4238f9) splits a model in two steps:

* ``RingMemoryWeightedPartitioningStrategy.partition``: nodes sorted by (memory in MB, node id)
  descending; node i gets the fraction [start, round(start + mem_i / total, 5)).
  ``DeviceCapabilities.memory`` is TOTAL memory in MB (``total_bytes // 2**20``).
* ``map_partitions_to_shards``: fraction -> layers by truncation, start = int(start * n),
  end = int(end * n) - 1 (INCLUSIVE), the last partition forced to end at n - 1, and a partition
  with start > end DROPPED. exo then indexes the shard list by the partition's POSITION
  (``Node.get_current_shard``), so a dropped shard shifts every later node onto the wrong layers.

This module imports nothing outside the standard library: `exo-bridge exo-legacy install` ships
it inside the strategy that runs in legacy exo's own process.
"""

from __future__ import annotations

MB = 2 ** 20


def memory_mb(total_bytes: int) -> int:
    """What legacy exo reports for a node: total memory in whole MB (``total // 2**20``)."""
    return int(total_bytes) // MB


def exo_legacy_fractions(nodes):
    """Legacy exo's RingMemoryWeighted fractions over `[(node_id, memory_MB)]`: nodes sorted by
    (memory, id) descending, each [start, round(start + mem / total, 5)). With no memory reported
    at all, equal shares (exo would divide by zero)."""
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


def exo_truncation_map(parts, n_layers: int):
    """Legacy exo's fraction -> layer rule (`map_partitions_to_shards`) on
    `[(node, start, end)]`: `[(node, start_layer, END_LAYER_INCLUSIVE)]`, empty shards dropped.
    Truncation, not rounding: k / n can land on layer k - 1."""
    out = []
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


def proportional_counts(n_layers: int, weights) -> list:
    """Integer layer counts proportional to `weights` (len(weights) <= n_layers): floors,
    leftovers to the largest remainders (ties to the earlier), then every count >= 1 (taken from
    the largest, ties to the earlier). All-zero weights give equal shares. The rounding current
    exo's placement uses (largest remainder), and the whole-layer fallback of the legacy
    strategy."""
    n = len(weights)
    total = float(sum(weights))
    raw = [(w / total if total > 0 else 1.0 / n) * n_layers for w in weights]
    counts = [int(r) for r in raw]
    for i in sorted(range(n), key=lambda i: -(raw[i] - counts[i]))[:n_layers - sum(counts)]:
        counts[i] += 1
    for i in range(n):
        if counts[i] == 0:
            j = max(range(n), key=lambda k: (counts[k], -k))
            counts[j] -= 1
            counts[i] = 1
    return counts
