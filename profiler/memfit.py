"""Will a profile fit in this machine's memory? An estimate made before MLX is imported.

Problem: `profile-model` with a huge grid (`--prefill-tokens 1000000`) or batch used to run
until MLX failed to allocate (or the process was killed, or segfaulted). The peak of a profile
is known from the config and the options alone, so it is checked first and refused in one line
naming the option to lower.

The estimate is the peak of one measured row (the profiler materialises one block at a time):

    weights  = the largest of: one block, the embedding, the LM head
               (+ the embedding when tied: it is kept until the head is measured)
    prefill  = B*P*(hidden + q/k/v + MLP intermediate x 3) activations
               + B*heads*P*P*4 attention scores (float32 softmax) + B*P*2*kv*head_dim KV
    decode   = B*C*2*kv*head_dim KV cache at the largest context C + B*heads*C*4 scores

    chain    = decode of a block is timed inside a chain of k distinct blocks of its structure
               (profile.py): (k - 1) more blocks' weights and decode KV, with k at most
               `chain_blocks`, the number of blocks, and what a quarter of the limit holds
               (weights + that batch's KV per block, profiler.grids)
    batch    = decode and chain are taken at every batch of the decode batch grid (B x batch
               streams); the largest of them counts
    chunk    = a prefill chunk of c tokens at context C0: B*c*(...) activations as prefill,
               B*heads*c*(C0+c)*4 scores, B*(C0+c) tokens of KV; counts with prefill
    tp       = tensor-parallel shares: k sliced copies of up to the largest share below the
               whole block (their weights live beside the chain's)

peak = weights + max(prefill, chunk, decode + chain at the worst batch) + tp + 64 MiB (the
cache-flush buffer).
Weight bytes per parameter: bits/8 + 4/group_size (a float16 scale and bias per group) when
quantized, else the activation dtype's size. O(1); no MLX.

The limit is what MLX itself would allow: min(available memory, 0.8 x physical memory) on
Linux (MLX's CPU allocator limit), the OS's available memory elsewhere. Read from the OS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from profiler.errors import UserError

GIB = 1 << 30
FLUSH_BYTES = 64 << 20
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def machine_memory() -> tuple[int, int]:
    """(physical bytes, available bytes) from the OS (/proc/meminfo on Linux, sysconf else)."""
    total = avail = 0
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ln.strip()}
        total, avail = info.get("MemTotal", 0), info.get("MemAvailable", 0)
    except (OSError, ValueError, IndexError):
        pass
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 0
    return total, (avail or total)


def memory_limit() -> int:
    """Bytes a profile may use here (see the module docstring); 0 when unknown."""
    total, avail = machine_memory()
    if not total:
        return 0
    import sys
    if sys.platform.startswith("linux"):
        return min(avail, int(0.8 * total))
    return avail


@dataclass
class Estimate:
    weights: int
    prefill: int
    decode: int
    chain: int = 0  # the other blocks of a decode chain (weights + KV)
    tp: int = 0  # sliced tensor-parallel copies of the chain's blocks
    batch: int = 1  # the decode batch (B x grid point) whose decode + chain is the largest

    @property
    def peak(self) -> int:
        return self.weights + max(self.prefill, self.decode + self.chain) + self.tp + \
            FLUSH_BYTES


def _i(config: dict[str, Any], key: str, default: int = 0) -> int:
    v = config.get(key)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else default


def estimate(config: dict[str, Any], prefill_max: int, decode_max: int, batch: int,
             act_bytes: int, bits: int | None, group_size: int, chain_blocks: int = 1,
             limit: int = 0, decode_batch: tuple[int, ...] = (1,), chunk_max: int = 0,
             chunk_context: int = 0, tp_share: float = 0.0) -> Estimate:
    """Peak bytes of a profile (see the module docstring); config values already validated.
    `decode_batch`: the decode batch grid; `chunk_max` / `chunk_context`: the largest prefill
    chunk and the context it is timed at; `tp_share`: the largest tensor-parallel share below
    the whole block, as a fraction of it (0: none)."""
    H = _i(config, "hidden_size", 1)
    heads = _i(config, "num_attention_heads", 1)
    kv = _i(config, "num_key_value_heads", heads)
    hd = _i(config, "head_dim", max(H // heads, 1))
    inter = _i(config, "intermediate_size", 4 * H)
    vocab = _i(config, "vocab_size", 1)
    experts = _i(config, "num_local_experts", _i(config, "num_experts", 1))
    per_param = (bits / 8 + 4 / group_size) if bits else act_bytes
    block = H * hd * (2 * heads + 2 * kv) + 3 * H * inter * experts
    embed = vocab * H
    tied = bool(config.get("tie_word_embeddings", False))
    weights = int(per_param * (max(block, embed) + (embed if tied else 0)))
    B, P, C = batch, prefill_max, decode_max
    kv_tok = 2 * kv * hd * act_bytes
    act_tok = (H + (heads + 2 * kv) * hd + 3 * inter) * act_bytes
    prefill = B * P * act_tok + B * heads * P * P * 4 + B * P * kv_tok
    if chunk_max:
        c, c0 = chunk_max, chunk_context
        prefill = max(prefill, B * c * act_tok + B * heads * c * (c0 + c) * 4
                      + B * (c0 + c) * kv_tok)
    block_bytes = int(per_param * block)
    n_blocks = _i(config, "num_hidden_layers", 1)
    best = None
    for b in sorted(set(decode_batch) | {1}):
        bb = B * b
        decode = bb * C * kv_tok + bb * heads * C * 4 + bb * (H + 3 * inter) * act_bytes
        k = min(max(1, chain_blocks), n_blocks)
        per_block = block_bytes + bb * C * kv_tok
        if limit > 0 and per_block > 0:  # profile._chain_members / grids: a quarter of usable
            k = min(k, max(1, limit // 4 // per_block))
        chain = (k - 1) * per_block
        if best is None or decode + chain > best[0] + best[1]:
            best = (decode, chain, bb)
    k_tp = min(max(1, chain_blocks), n_blocks)
    tp = int(k_tp * tp_share * block_bytes) if tp_share else 0
    return Estimate(weights=weights, prefill=prefill, decode=best[0], chain=best[1], tp=tp,
                    batch=best[2])


def check_fits(config: dict[str, Any], prefill: list[int], decode: list[int], batch: int,
               act_bytes: int, bits: int | None, group_size: int,
               limit: int | None = None, chain_blocks: int = 1,
               decode_batch: list[int] | tuple[int, ...] = (1,),
               chunks: list[int] | tuple[int, ...] = (), chunk_context: int = 0,
               tp_share: float = 0.0) -> Estimate:
    """Raise a one-line UserError naming the option to lower when the estimate exceeds the
    machine's limit (limit: bytes; default `memory_limit()`)."""
    limit = memory_limit() if limit is None else limit
    est = estimate(config, max(prefill), max(decode), batch, act_bytes, bits, group_size,
                   chain_blocks, limit or 0, tuple(decode_batch), max(chunks, default=0),
                   chunk_context, tp_share)
    if not limit or est.peak <= limit:
        return est
    if est.weights + FLUSH_BYTES > limit:
        fix = "use a smaller model or quantize it (--bits 4)"
        what = f"one block's weights ({_gib(est.weights)})"
    elif est.prefill >= est.decode + est.chain:
        fix = f"lower --prefill-tokens (largest {max(prefill)})" + (
            f" or --prefill-chunk (largest {max(chunks)})" if chunks else "") + (
            f" or --batch ({batch})" if batch > 1 else "")
        what = f"prefill of {max([*prefill, *chunks])} tokens x batch {batch}"
    else:
        fix = f"lower --decode-context (largest {max(decode)})" + (
            f" or --batch ({batch})" if batch > 1 else "") + (
            f" or --decode-batch (largest {max(decode_batch)})" if max(decode_batch) > 1
            else "")
        what = f"decode at a {max(decode)}-token KV cache x batch {est.batch}"
    raise UserError(f"this profile needs about {_gib(est.peak)} of memory ({what}; estimated "
                    f"from the config) but this machine allows {_gib(limit)}; {fix}")


def _gib(b: float) -> str:
    return f"{b / GIB:.1f} GiB" if b < 1e6 * GIB else f"{b / GIB:.3g} GiB"
