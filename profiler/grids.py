"""The grids measured beside a row's own prefill and decode: decode batches, prefill chunks and
tensor-parallel shares (cost table version 2 and its tensor_parallel section).

    bt = batch_grid_timings(chain, caches, hidden, dt, method, [1, 2, 4, 8], t1, decode, 1.0)
    tp_rows = tp_share_rows(chain, caches, args, ...)

Every time here is timed as the row's own decode and prefill are (profiler.rows: medians of
the repeats, the cache flushed and the settle idled before each run):

* batch B decode: one step of B streams through the same chain of distinct blocks as batch 1
  (rows.time_decode_chain), each stream with the context's KV cache. The chain is shortened
  only where a pass of fewer blocks already lasts `min_pass_s` (rows.batch_chain_length).
* prefill chunk c: the block alone processes c tokens with `chunk_context` tokens already in
  its KV cache (rows.time_chunks) - the cost of one chunk of a chunked prefill that far into
  the prompt.
* tensor-parallel share k of n KV heads: every block of the chain sliced to one rank's share
  (profiler.tpslice.slice_block: heads [0, k), MLP columns [0, round(I * k / n))), timed as a
  whole block is (rows.time_chain), all-reduces excluded. The share k = n is the whole block:
  its row carries the block's own measurement.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from profiler import build, rows, tpslice
from profiler.measure import Timing


def batch_grid_timings(blocks: list, caches: list, hidden_size: int, dtype, m: rows.Method,
                       batches: list[int], decode_b1: list[Timing], min_pass_s: float,
                       memory: tuple[int, int, int] = (0, 0, 0)
                       ) -> tuple[list[list[Timing]], list[int]]:
    """([context][batch] timings per block, chain length per batch) over `batches` (sorted,
    holding 1): batch 1 is `decode_b1` (the row's own decode), every other batch is timed.
    `memory` = (usable bytes, block bytes, KV bytes per token): a batch's chain holds no more
    blocks than a quarter of usable memory holds with their KV caches at the largest context
    (as profile._chain_members for batch 1; profiler.memfit counts the same)."""
    step = max((t.median_s for t in decode_b1), default=0.0)
    usable, block_bytes, kv_tok = memory
    per_batch, lengths = [], []
    for b in batches:
        if b == 1:
            per_batch.append(decode_b1)
            lengths.append(len(blocks))
            continue
        k = rows.batch_chain_length(len(blocks), b, step, min_pass_s)
        per_block = block_bytes + b * max(m.decode_context) * kv_tok
        if usable > 0 and per_block > 0:
            k = min(k, max(1, usable // 4 // per_block))
        per_batch.append(rows.time_decode_chain(blocks[:k], caches[:k], hidden_size, dtype,
                                                m, b))
        lengths.append(k)
    return [[col[j] for col in per_batch] for j in range(len(m.decode_context))], lengths


def batch_fields(grid: list[list[Timing]]) -> dict[str, Any]:
    """A row's decode_batch_s / decode_batch_spread from [context][batch] timings."""
    return {"decode_batch_s": [[t.median_s for t in col] for col in grid],
            "decode_batch_spread": [[round(t.spread, 4) for t in col] for col in grid]}


def chunk_fields(timings: list[Timing]) -> dict[str, Any]:
    return {"prefill_chunk_s": [t.median_s for t in timings],
            "prefill_chunk_spread": [round(t.spread, 4) for t in timings]}


def tp_section(n_kv_heads: int, q_per_kv: int, grid: list[int], hidden_size: int,
               act_bytes: int) -> dict[str, Any]:
    """An empty tensor_parallel section (format I2): rows are added as blocks are measured.
    Each of a block's two all-reduces (after attention, after the MLP) carries the hidden
    state: hidden_size x activation bytes per token."""
    return {"version": 1, "unit": "kv_head", "n_kv_heads": n_kv_heads, "q_per_kv": q_per_kv,
            "grid_kv_heads": list(grid), "allreduces_per_block": 2,
            "allreduce_bytes_per_token": int(hidden_size * act_bytes), "rows": []}


def tp_share_rows(blocks: list, caches: list, args, grid: list[int], whole: dict[str, Any],
                  hidden_size: int, dtype, m: rows.Method, x1: mx.array,
                  group_size: int | None) -> list[dict[str, Any]]:
    """The tensor_parallel rows of one measured block (the first of `blocks`, timed in the
    chain `blocks`): one per share in `grid`. `whole`: the block's own row fields (name,
    layer, weights, KV bytes, prefill/decode times), carried by the share k = n."""
    n = tpslice.heads(args)[1]
    inter = int(blocks[0].mlp.gate_proj.weight.shape[0])
    out = []
    for k in grid:
        base = {"measured_from": whole["name"], "layers": [whole["layer"]], "kv_heads": k}
        if k == n:
            out.append({**base, "mlp_columns": inter,
                        **{f: whole[f] for f in ("weight_bytes", "kv_bytes_per_token",
                                                 "prefill_s", "prefill_spread", "decode_s",
                                                 "decode_spread")}})
            continue
        cols = tpslice.mlp_columns(inter, k, n, group_size)
        parts = [tpslice.slice_block(b, args, (0, k), (0, cols)) for b in blocks]
        mx.eval([p.parameters() for p in parts])
        wbytes = build.param_bytes(parts[0])
        kvb = rows.kv_bytes_per_token(parts[0], caches[0], x1)
        t_pre, t_dec = rows.time_chain(parts, caches, hidden_size, dtype, m)
        out.append({**base, "mlp_columns": cols, "weight_bytes": int(wbytes),
                    "kv_bytes_per_token": int(kvb),
                    "prefill_s": [t.median_s for t in t_pre],
                    "prefill_spread": [round(t.spread, 4) for t in t_pre],
                    "decode_s": [t.median_s for t in t_dec],
                    "decode_spread": [round(t.spread, 4) for t in t_dec]})
        del parts
        mx.clear_cache()
    return out



def down_group_size(block) -> int | None:
    """The quantization group of a block's down_proj (MLP columns must be cut on its groups),
    None when it is not quantized."""
    down = block.mlp.down_proj
    return int(down.group_size) if "scales" in down else None
