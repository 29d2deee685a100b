"""What a profile run measures and how: `ProfileOptions`, its defaults, and the checks that
refuse impossible options in one line before anything is measured. Plain Python: no MLX import
(the command line checks options here before MLX starts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from profiler.errors import UserError

DEFAULT_PREFILL = [16, 64]
DEFAULT_DECODE = [64, 256]
DEFAULT_DECODE_BATCH = [1, 2, 4, 8]
DEFAULT_PREFILL_CHUNK = [16]


SETTLE_UNDER_QUOTA_S = 0.02


@dataclass
class ProfileOptions:
    """What to measure and how. `dtype="auto"` and `bits="auto"` pick the defaults described in
    `resolve_precision`; `bits=0` (or None) measures unquantized weights."""

    dtype: str = "auto"
    bits: int | str | None = "auto"
    group_size: int = 64
    prefill_tokens: list[int] = field(default_factory=lambda: list(DEFAULT_PREFILL))
    decode_context: list[int] = field(default_factory=lambda: list(DEFAULT_DECODE))
    warmup: int = 1
    repeats: int = 3
    max_rel_spread: float = 0.15
    max_rounds: int = 2
    every_layer: bool = False
    batch: int = 1
    restart: bool = False
    microbench: bool = True
    seed: int = 0
    clock: str = "wall"  # wall | process (CPU backend only; see measure.time_fn)
    # idle before each timed run, after its untimed setup (see measure.time_fn): long enough
    # for a CPU quota to repay the setup's overrun (up to one 4 ms tick at 0.2 of a core).
    # None = auto: SETTLE_UNDER_QUOTA_S when this process runs under a CPU quota, else 0 (with
    # no quota the idle only adds wake-up cost: qwen2.5-0.5b decode self-check +6..+11% with a
    # 20 ms idle against -2..+2% without, same machine, same session)
    settle_s: float | None = None
    # block decode: steps back to back per timed sample (up to 8, until it lasts 0.1 s): a
    # short run after an idle borrows up to a tick of CPU from its quota (see measure.time_fn)
    decode_min_sample_s: float = 0.1
    decode_max_steps: int = 8
    # block decode is timed inside a chain of up to this many distinct blocks of its structure
    # (one graph, one mx.eval, one pass after the settle; per block = chain / k), as a stage
    # and the whole model run it (docs/profiler.md, "Chain of distinct blocks"); 1 = each
    # block alone (tables before this option). Prefill is timed per block alone.
    chain_blocks: int = 8
    # decode batch grid (cost table v2): None = DEFAULT_DECODE_BATCH at batch 1, [1] with
    # --batch > 1 (that option times every row at one batch instead); always holds 1
    decode_batch: list[int] | None = None
    # a batch-B decode chain keeps fewer blocks where a pass already lasts this long
    # (rows.batch_chain_length); 0 = always the whole chain
    batch_chain_s: float = 1.0
    # prefill chunk grid, timed with prefill_chunk_context tokens already in the KV cache
    # (None = the largest decode context); [] = none
    prefill_chunk: list[int] = field(default_factory=lambda: list(DEFAULT_PREFILL_CHUNK))
    prefill_chunk_context: int | None = None
    # tensor-parallel shares in KV heads (default_tp_shares when None); [] = none
    tp_shares: list[int] | None = None


def default_tp_shares(n_kv_heads: int) -> list[int]:
    """1 and n KV heads (n alone when n == 1): the two ends of the share range. A rank's work is
    affine in its share (norms and residual fixed; q/k/v/o rows, KV reads and MLP columns in
    proportion to k), so the line through the two ends is the reader's interpolation for the
    shares between (marked derived); measuring more shares (`--tp-shares 1,2,4,8`) checks that
    line at the cost of k/n of a block's measurement per share. The default costs 1/n of one
    block's measurement on top of it (the n share is the block's own)."""
    return sorted({1, n_kv_heads})


def check_grids(prefill: list[int], decode: list[int], batch: list[int] | None = None,
                chunk: list[int] | None = None) -> None:
    for name, g in (("--prefill-tokens", prefill), ("--decode-context", decode),
                    ("--decode-batch", batch), ("--prefill-chunk", chunk)):
        if g is None or (not g and name in ("--decode-batch", "--prefill-chunk")):
            continue
        if not g or any((not isinstance(v, int)) or v <= 0 for v in g):
            raise UserError(f"{name} {g} must be positive integers, e.g. 16,64")
        if any(b <= a for a, b in zip(g, g[1:])):
            raise UserError(f"{name} {g} must be strictly increasing, e.g. 16,64")


def decode_batch_grid(opts: ProfileOptions) -> list[int]:
    """The batch grid a run measures: always holds 1 (the row's own decode)."""
    grid = opts.decode_batch if opts.decode_batch is not None else (
        DEFAULT_DECODE_BATCH if opts.batch == 1 else [1])
    return sorted({1, *grid})


def check_options(opts: ProfileOptions) -> None:
    """Reject impossible options with one line each, before anything is measured."""
    check_grids(opts.prefill_tokens, opts.decode_context, opts.decode_batch, opts.prefill_chunk)
    if opts.repeats < 1 or opts.warmup < 0 or opts.batch < 1:
        raise UserError("--repeats and --batch must be >= 1 and --warmup >= 0")
    if opts.batch > 1 and decode_batch_grid(opts) != [1]:
        raise UserError(f"--batch {opts.batch} times every row at {opts.batch} sequences; "
                        f"--decode-batch {','.join(map(str, decode_batch_grid(opts)))} times "
                        "decode at each batch from 1: give one of them, not both")
    if opts.bits not in ("auto", None, 0) and int(opts.bits) not in (2, 3, 4, 5, 6, 8):
        raise UserError(f"--bits {opts.bits} is not supported; use 2, 3, 4, 5, 6 or 8, or "
                        "--no-quant")
    if int(opts.group_size) not in (32, 64, 128):
        raise UserError(f"--group-size {opts.group_size} is not supported; use 32, 64 or 128")
    if opts.clock not in ("wall", "process"):
        raise UserError(f"--clock {opts.clock} is not known; use wall or process")
    if not opts.max_rel_spread > 0:
        raise UserError("--max-spread must be > 0, e.g. 0.15")
    if opts.chain_blocks < 1:
        raise UserError(f"--chain-blocks {opts.chain_blocks} must be >= 1 (1: each block "
                        "alone)")
    if opts.tp_shares is not None and any(
            not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in opts.tp_shares):
        raise UserError(f"--tp-shares {opts.tp_shares}: each share is a whole number of KV "
                        "heads >= 1, e.g. 1,2,4")


def tp_grid(opts: ProfileOptions, config: dict[str, Any], model: str,
            group_size: int | None = None) -> list[int]:
    """The tensor-parallel shares a run measures (KV heads; the whole block's n included when
    any share is), or a one-line UserError naming --tp-shares for a share that cannot be cut:
    0, more than the model's KV heads, a model whose heads are not whole KV-head groups, or
    (quantized, `group_size`) a share whose o_proj columns k x q_per_kv x head_dim are not
    whole quantization groups. The default grid (`default_tp_shares`) drops such shares
    instead, and is empty when fewer than two shares remain."""
    heads = int(config.get("num_attention_heads") or 0)
    n = int(config.get("num_key_value_heads") or heads)
    if opts.tp_shares is not None and not opts.tp_shares:
        return []
    groups = n > 0 and heads % n == 0
    hd = int(config.get("head_dim") or (int(config.get("hidden_size", 0)) // heads
                                        if heads else 0))

    def cuttable(k: int) -> bool:
        return k == n or not group_size or (k * (heads // n) * hd) % group_size == 0

    if opts.tp_shares is None:
        grid = [k for k in default_tp_shares(n) if cuttable(k)] if n > 1 and groups else []
        return grid if len(grid) > 1 else []
    shares = ",".join(map(str, opts.tp_shares))
    bad = [k for k in opts.tp_shares if not 1 <= k <= n]
    if bad:
        raise UserError(f"--tp-shares {shares}: a share of {bad[0]} KV heads cannot be cut "
                        f"from {model}'s {n} KV heads; give whole KV heads from 1 to {n} (e.g. "
                        f"--tp-shares {','.join(map(str, default_tp_shares(n)))}), or "
                        "--tp-shares none")
    if not groups:
        raise UserError(f"--tp-shares: {model}'s {heads} attention heads are not whole groups "
                        f"of its {n} KV heads, so no share can be cut; use --tp-shares none")
    uncut = [k for k in opts.tp_shares if not cuttable(k)]
    if uncut:
        raise UserError(f"--tp-shares {shares}: a share of {uncut[0]} KV heads cuts o_proj "
                        f"after {uncut[0] * (heads // n) * hd} columns, not a multiple of the "
                        f"quantization group {group_size}; give shares whose query heads x "
                        f"head_dim is a multiple of {group_size}, or --no-quant")
    return sorted({*opts.tp_shares, n})
