"""`profile-model MODEL`: measure a model layer by layer on this machine, write the cost table.

    profile-model llama-3-8b                       # built-in, defaults, data/profiles/<host>--llama-3-8b.json
    profile-model mlx-community/Llama-3.2-1B-Instruct-4bit --prefill-tokens 16,64,256
    profile-model ./my-model-dir --self-check      # local directory, its own weights
    profile-model llama-3-70b --no-quant --dtype bfloat16   # larger than RAM: streamed

Errors in what the user typed are one line on stderr and exit code 2 (profiler.errors.guard).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

from profiler import options as o
from profiler.errors import UserError, guard


MAX_TOKENS = 1 << 22  # largest grid point accepted at all; memory decides below that


def build_parser() -> argparse.ArgumentParser:
    p = o.OneLineParser(prog="profile-model",
                description="Measure a model layer by layer on this machine and write a cost "
                            "table (JSON) for split-model.")
    p.add_argument("model", type=o.text("model name or path"), help="built-in name (llama-3-8b, ...), exo / Hugging Face repo id, "
                                 "local model directory, or config.json path")
    p.add_argument("--out", type=o.path("cost table file"), help="cost table path (default data/profiles/<host>--<model>"
                                 "[--<variant>].json)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="activation / unquantized weight dtype (auto: bfloat16 on Metal/CUDA, "
                        "float32 for quantized models on the CPU build; a local dir keeps its own)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--bits", type=o.int_choice((2, 3, 4, 5, 6, 8)), default=None,
                   help="quantize weights to this many bits (default 4, as exo's mlx-community "
                        "models; a quantized local dir keeps its own)")
    q.add_argument("--no-quant", action="store_true", help="measure unquantized weights")
    p.add_argument("--group-size", type=o.int_choice((32, 64, 128)), default=64, help="quantization group size (64)")
    p.add_argument("--prefill-tokens", type=o.int_grid(1, MAX_TOKENS), default=None,
                   help="prompt lengths to time, comma-separated (default 16,64)")
    p.add_argument("--decode-context", type=o.int_grid(1, MAX_TOKENS), default=None,
                   help="KV-cache contexts to time decode at (default 64,256)")
    p.add_argument("--decode-batch", type=o.int_grid(1, 4096), default=None,
                   help="batch sizes (streams) to time one decode step at, at every decode "
                        "context, comma-separated; 1 is always measured (default 1,2,4,8)")
    p.add_argument("--prefill-chunk", type=o.int_grid(1, MAX_TOKENS, none=True), default=None,
                   help="chunk sizes to time prefill at, each with the largest decode context "
                        "already in the KV cache (default 16; none: no chunk grid)")
    p.add_argument("--tp-shares", type=o.int_grid(1, 1 << 20, none=True), default=None,
                   help="tensor-parallel shares to time one rank of a block at, in KV heads "
                        "(default 1 and n of the model's n KV heads; none: no "
                        "tensor-parallel grid)")
    p.add_argument("--chain-blocks", type=o.int_in(1, 1024), default=8,
                   help="block decode is timed in a chain of up to this many distinct blocks "
                        "(8; 1 = each block alone)")
    p.add_argument("--warmup", type=o.int_in(0, 100), default=1, help="untimed runs before timing (1)")
    p.add_argument("--repeats", type=o.positive_int(1000), default=3, help="timed runs per point (3)")
    p.add_argument("--max-spread", type=o.float_in(0, 100, lo_open=True), default=0.15,
                   help="re-measure a point when (max-min)/median exceeds this (0.15)")
    p.add_argument("--batch", type=o.positive_int(4096), default=1, help="sequences per step (1)")
    p.add_argument("--clock", default="wall", choices=["wall", "process"],
                   help="wall (default) or process: CPU time of this process, for CPU-backend "
                        "machines shared with other busy processes (equals wall time when idle)")
    p.add_argument("--settle-ms", type=o.float_in(0, 10000), default=None,
                   help="idle this long before each timed run, after its untimed setup "
                        "(default: 20 when this process runs under a CPU quota, else 0): "
                        "under a quota the setup's CPU is otherwise repaid as throttling "
                        "inside the timed run")
    p.add_argument("--decode-steps", type=o.positive_int(1000), default=8,
                   help="block decode: up to this many steps back to back per timed sample, "
                        "until a sample lasts 0.1 s (8; 1 = one step per sample)")
    p.add_argument("--every-layer", action="store_true",
                   help="measure every block (default: identical blocks share one measurement)")
    p.add_argument("--restart", action="store_true",
                   help="discard a table already at --out instead of resuming it")
    p.add_argument("--self-check", action="store_true",
                   help="after profiling, run the whole model end to end and compare predicted "
                        "(sum of rows) with measured time")
    p.add_argument("--json", action="store_true", help="print the cost table JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--no-microbench", action="store_true",
                   help="skip the bandwidth / matmul microbenchmarks (their fields are then 0; "
                        "for quick tests)")
    return p


def default_out(model_name: str, opts) -> Path:
    from profiler.costtable import default_path

    parts = []
    if opts.dtype != "auto":
        parts.append(opts.dtype)
    if opts.bits in (0, None):
        parts.append("fp")
    elif opts.bits != "auto":
        parts.append(f"q{opts.bits}g{opts.group_size}")
    elif opts.group_size != 64:
        parts.append(f"g{opts.group_size}")
    host = socket.gethostname().split(".")[0] or "localhost"
    return default_path(host, model_name, "-".join(parts) or None)


def check_memory(spec, opts) -> None:
    """Refuse, before MLX starts, a grid / batch / model whose peak cannot fit here."""
    from profiler.memfit import DTYPE_BYTES, check_fits

    q = spec.quantization if spec.source == "local" else None
    bits = q["bits"] if q else (4 if opts.bits == "auto" and spec.source != "local"
                                else (opts.bits or None) if opts.bits != "auto" else None)
    group = q["group_size"] if q else int(opts.group_size)
    # dtype auto: float32 on the CPU build (Linux), bfloat16 on Metal / CUDA (see
    # profile.resolve_precision); without MLX here, Linux is taken as the CPU build (the larger)
    act = DTYPE_BYTES.get(opts.dtype) or (2 if sys.platform == "darwin" else 4)
    from profiler.settings import decode_batch_grid, tp_grid

    tp = tp_grid(opts, spec.config, spec.name, group if bits else None)
    n = tp[-1] if tp else 1
    chunks = opts.prefill_chunk or []
    check_fits(spec.config, opts.prefill_tokens, opts.decode_context, opts.batch, act, bits,
               group, chain_blocks=1 if opts.every_layer else opts.chain_blocks,
               decode_batch=decode_batch_grid(opts), chunks=chunks,
               chunk_context=(opts.prefill_chunk_context or max(opts.decode_context))
               if chunks else 0, tp_share=max([k for k in tp if k < n], default=0) / n)


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from profiler.models import resolve_model

    spec = resolve_model(args.model)  # unknown names fail here, before MLX is imported
    from profiler.settings import (DEFAULT_DECODE, DEFAULT_PREFILL, DEFAULT_PREFILL_CHUNK,
                                   ProfileOptions, check_options)

    opts = ProfileOptions(
        dtype=args.dtype,
        bits=0 if args.no_quant else ("auto" if args.bits is None else args.bits),
        group_size=args.group_size,
        prefill_tokens=args.prefill_tokens or list(DEFAULT_PREFILL),
        decode_context=args.decode_context or list(DEFAULT_DECODE),
        warmup=args.warmup, repeats=args.repeats, max_rel_spread=args.max_spread,
        every_layer=args.every_layer, batch=args.batch, restart=args.restart,
        microbench=not args.no_microbench, clock=args.clock,
        settle_s=None if args.settle_ms is None else args.settle_ms / 1e3,
        decode_max_steps=args.decode_steps, decode_batch=args.decode_batch,
        prefill_chunk=list(DEFAULT_PREFILL_CHUNK) if args.prefill_chunk is None
        else args.prefill_chunk, tp_shares=args.tp_shares, chain_blocks=args.chain_blocks)
    check_options(opts)
    check_memory(spec, opts)
    out = Path(args.out) if args.out else default_out(spec.name, opts)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file path ending in .json")
    from profiler.costtable import check_table_output

    check_table_output(out, f"--out {out}")  # before minutes of profiling, not after

    from profiler.profile import profile_model
    from profiler.report import ProgressBar, summary

    bar = ProgressBar(quiet=args.quiet)
    if not args.quiet:
        print(f"profile-model {spec.name} ({spec.source}"
              f"{', ' + spec.repo_id if spec.repo_id else ''}) -> {out}", file=sys.stderr)
    t0 = time.perf_counter()
    table = profile_model(spec, opts, out, progress=bar)
    wall = time.perf_counter() - t0
    if not args.quiet:
        print(summary(table, out), file=sys.stderr)
        print(f"this run: {wall:.1f} s wall (measured)", file=sys.stderr)
    if args.self_check:
        from profiler.selfcheck import format_result, self_check

        res = self_check(spec, table, progress=bar)
        print(format_result(res), file=sys.stderr)
    if args.json:
        json.dump(table.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


main = guard(_main)
"""The console script: `profile-model ...` -> exit code (0 ok, 2 user error, 130 Ctrl-C)."""


if __name__ == "__main__":
    sys.exit(main())
