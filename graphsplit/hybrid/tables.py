"""What a tensor-parallel rank costs: the cost table's `tensor_parallel` section, per node.

The section (INTERFACES I2, written by `profile-model`) holds, per measured share of k whole KV
heads, one rank's block time EXCLUDING its all-reduces (prefill over the table's
`grids.prefill_tokens`, decode over `grids.decode_context`), its weight bytes and its KV bytes
per token, plus `allreduce_bytes_per_token` (hidden size x activation bytes). Shares between
measured points are interpolated linearly in k (beyond them extrapolated from the nearest two)
and marked derived; times in tokens / context exactly as whole blocks
(`profiler.costtable.interpolate`).

`profiler.costtable.tp_block_seconds` / `tp_block_bytes` are used when the table carries the
section (grids' accessors); a table read by a release whose reader drops the section is read
again from its file (the node's `profile`). A derived (`chip`) node scales its base's section
by the table's own roofline factors, as `graphsplit.cluster.derive_table` scales its rows.
"""

from __future__ import annotations

from typing import Any

from profiler import costtable as ct
from profiler.errors import UserError
from profiler.files import read_json


class NoTensorProfile(UserError):
    """A node's cost table has no tensor-parallel section (or not the share asked for)."""


def section(node) -> dict[str, Any]:
    """The node's `tensor_parallel` section (dict), or NoTensorProfile naming the file."""
    t = node.table
    cached = getattr(t, "_hybrid_tp", None)
    if cached is not None:
        return cached
    sec = getattr(t, "tensor_parallel", None)
    if sec is not None and not isinstance(sec, dict):
        sec = getattr(sec, "__dict__", None)
    if sec is None and node.profile:
        try:
            data = read_json(node.profile, f"cost table {node.profile}", error=UserError)
        except UserError:
            data = {}
        sec = data.get("tensor_parallel") if isinstance(data, dict) else None
        if sec is not None and node.estimated:
            sec = _scaled(sec, t.method.get("prefill_scale", 1.0),
                          t.method.get("decode_scale", 1.0))
    if not isinstance(sec, dict) or not sec.get("rows"):
        raise NoTensorProfile(
            f"node {node.id}: cost table {node.profile or t.device.host} has no tensor_parallel "
            "section, so its share of a tensor-parallel stage cannot be priced; re-run "
            "profile-model there with its tensor-parallel grid (--tp-shares ...)")
    t._hybrid_tp = sec  # read once per table
    return sec


def _scaled(sec: dict, kp: float, kd: float) -> dict:
    out = dict(sec)
    out["rows"] = [dict(r, prefill_s=[x * kp for x in r["prefill_s"]],
                        decode_s=[x * kd for x in r["decode_s"]]) for r in sec["rows"]]
    return out


def n_kv_heads(node) -> int:
    return int(section(node)["n_kv_heads"])


def allreduce_bytes_per_token(node) -> float:
    return float(section(node)["allreduce_bytes_per_token"])


def _rows_for(node, layer: int) -> dict[int, dict]:
    """kv_heads -> the section's row that covers `layer`."""
    sec = section(node)
    out = {}
    for r in sec["rows"]:
        if layer in r["layers"]:
            out[int(r["kv_heads"])] = r
    if not out:
        raise NoTensorProfile(f"node {node.id}: cost table {node.profile}: tensor_parallel has "
                              f"no row for layer {layer}; re-run profile-model with --tp-shares")
    return out


def _in_k(by_k: dict[int, Any], k: int, value) -> tuple[float, bool]:
    """value(row) at share k: measured at k, else linear in k between (or beyond) the nearest
    two measured shares, never below 0 (derived)."""
    if k in by_k:
        return value(by_k[k]), False
    ks = sorted(by_k)
    if len(ks) == 1:
        return value(by_k[ks[0]]) * k / ks[0], True
    lo = [x for x in ks if x < k]
    hi = [x for x in ks if x > k]
    if lo and hi:
        a, b = lo[-1], hi[0]
    elif hi:
        a, b = hi[0], hi[1]
    else:
        a, b = lo[-2], lo[-1]
    ya, yb = value(by_k[a]), value(by_k[b])
    return max(ya + (yb - ya) * (k - a) / (b - a), 0.0), True


def tp_seconds(node, layer: int, kv_heads: int, phase: str, x: float) -> tuple[float, bool]:
    """Seconds of one rank holding `kv_heads` KV heads of block `layer` (all-reduces excluded):
    phase "prefill" (x = tokens) or "decode" (x = KV context); (seconds, derived)."""
    t = node.table
    fn = getattr(ct, "tp_block_seconds", None)
    if fn is not None and getattr(t, "tensor_parallel", None) is not None and not node.estimated:
        return fn(t, layer, kv_heads, phase, x)
    if phase == "prefill":
        grid, key, origin = t.prefill_tokens, "prefill_s", True
    else:
        grid, key, origin = t.decode_context, "decode_s", False
    return _in_k(_rows_for(node, layer), kv_heads,
                 lambda r: ct.interpolate(grid, r[key], x, through_origin=origin))


def tp_bytes(node, layer: int, kv_heads: int) -> tuple[float, float]:
    """(weight bytes, KV bytes per token) one rank holds for block `layer` at `kv_heads`."""
    t = node.table
    fn = getattr(ct, "tp_block_bytes", None)
    if fn is not None and getattr(t, "tensor_parallel", None) is not None:
        return fn(t, layer, kv_heads)
    rows = _rows_for(node, layer)
    w, _ = _in_k(rows, kv_heads, lambda r: float(r["weight_bytes"]))
    kv, _ = _in_k(rows, kv_heads, lambda r: float(r["kv_bytes_per_token"]))
    return w, kv
