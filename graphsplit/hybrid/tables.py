"""What a tensor-parallel rank costs: the cost table's `tensor_parallel` section, per node.

The section (INTERFACES I2, written by `profile-model --tp-shares`) holds, per measured share of
k whole KV heads, one rank's block time EXCLUDING its all-reduces (prefill over the table's
`grids.prefill_tokens`, decode over `grids.decode_context`), its weight bytes and KV bytes per
token, plus `allreduce_bytes_per_token` (hidden size x activation bytes). Read through
`profiler.costtable.tp_block_seconds` / `tp_block_bytes` (shares between measured ones linear
in k, marked derived). A roofline-derived (`chip`) node's table carries its base's section
unscaled: it is read here through a copy scaled by the table's own factors, decode times by the
bandwidth ratio and prefill times by the compute ratio, as `graphsplit.cluster.derive_table`
scales the rows.
"""

from __future__ import annotations

import copy
from typing import Any

from profiler import costtable as ct
from profiler.errors import UserError


class NoTensorProfile(UserError):
    """A node's cost table has no tensor-parallel section."""


def _table(node):
    """The table whose section prices this node (a scaled copy for a derived node)."""
    t = node.table
    cached = getattr(t, "_hybrid_tp_table", None)
    if cached is not None:
        return cached
    sec = getattr(t, "tensor_parallel", None)
    if not isinstance(sec, dict) or not sec.get("rows"):
        raise NoTensorProfile(
            f"node {node.id}: cost table {node.profile or t.device.host} has no tensor_parallel "
            "section, so its share of a tensor-parallel stage cannot be priced; re-run "
            "`profile-model MODEL --tp-shares 1,2,4,8` there")
    out = t
    if node.estimated:
        kp, kd = t.method.get("prefill_scale", 1.0), t.method.get("decode_scale", 1.0)
        out = copy.copy(t)
        out.tensor_parallel = dict(sec, rows=[
            dict(r, prefill_s=[x * kp for x in r["prefill_s"]],
                 decode_s=[x * kd for x in r["decode_s"]]) for r in sec["rows"]])
    t._hybrid_tp_table = out  # read once per table
    return out


def section(node) -> dict[str, Any]:
    """The node's `tensor_parallel` section, or NoTensorProfile naming the file."""
    return _table(node).tensor_parallel


def n_kv_heads(node) -> int:
    return int(section(node)["n_kv_heads"])


def allreduce_bytes_per_token(node) -> float:
    return float(section(node)["allreduce_bytes_per_token"])


def tp_seconds(node, layer: int, kv_heads: int, phase: str, x: float) -> tuple[float, bool]:
    """Seconds of one rank holding `kv_heads` KV heads of block `layer` (all-reduces excluded):
    phase "prefill" (x = tokens) or "decode" (x = KV context); (seconds, derived)."""
    return ct.tp_block_seconds(_table(node), layer, kv_heads, phase, x)


def tp_bytes(node, layer: int, kv_heads: int) -> tuple[float, float]:
    """(weight bytes, KV bytes per token) one rank holds for block `layer` at `kv_heads`."""
    return ct.tp_block_bytes(_table(node), layer, kv_heads)
