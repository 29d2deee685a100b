"""Benchmark the profiler on a llama-3-8b-shaped model: time per layer, wall time, peak memory.

    python bench/bench_profiler.py                       # llama-3-8b, the profile-model defaults
    python bench/bench_profiler.py --model llama-3.2-1b --every-layer
    python bench/bench_profiler.py --no-quant --dtype bfloat16 --layers 4

Prints a table (one line per measured row: prefill and decode ms per grid point, weight bytes,
peak MLX memory while it ran) and, at the end, the profiling wall time, the peak resident
memory of the process (ru_maxrss) and MLX's peak memory. All numbers are measured.
`--layers N` profiles the first N blocks only (a shorter run of the same layer shapes).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--bits", type=int, default=None)
    ap.add_argument("--no-quant", action="store_true")
    ap.add_argument("--prefill-tokens", default="16,64")
    ap.add_argument("--decode-context", default="64,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every-layer", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="profile only the first N blocks")
    ap.add_argument("--out", default=None, help="keep the cost table here (default: temp file)")
    a = ap.parse_args()

    import mlx.core as mx

    from profiler.device import peak_rss_bytes
    from profiler.models import resolve_model
    from profiler.profile import ProfileOptions, profile_model
    from profiler.report import fmt_bytes

    spec = resolve_model(a.model)
    if a.layers:
        spec = copy.deepcopy(spec)
        spec.config["num_hidden_layers"] = a.layers
        spec.name = f"{spec.name}-first{a.layers}"
    opts = ProfileOptions(
        dtype=a.dtype, bits=0 if a.no_quant else ("auto" if a.bits is None else a.bits),
        prefill_tokens=[int(v) for v in a.prefill_tokens.split(",")],
        decode_context=[int(v) for v in a.decode_context.split(",")],
        repeats=a.repeats, every_layer=a.every_layer, restart=True)
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp()) / "bench.json"
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    table = profile_model(spec, opts, out)
    wall = time.perf_counter() - t0

    q = table.quantization
    prec = f", {q['bits']}-bit g{q['group_size']}" if q else ", unquantized"
    print(f"# bench_profiler: {spec.name}, {table.dtype}{prec}, "
          f"{table.device.name} ({table.device.backend}, MLX {table.device.mlx_version})")
    hdr = (["row"] + [f"prefill@{p} ms" for p in table.prefill_tokens]
           + [f"decode@{c} ms" for c in table.decode_context] + ["weights", "peak mem", "from"])
    print(" | ".join(hdr))
    print(" | ".join("---" for _ in hdr))
    shown = 0
    for r in table.rows:
        if r.measured_from != r.name:
            shown += 1
            continue
        cells = ([r.name] + [f"{t * 1e3:.1f}" for t in r.prefill_s]
                 + [f"{t * 1e3:.2f}" for t in r.decode_s]
                 + [fmt_bytes(r.weight_bytes), fmt_bytes(r.peak_memory_bytes), "measured"])
        print(" | ".join(cells))
    if shown:
        print(f"({shown} more blocks carry the measurement of an identical block)")
    tot_dec = sum(r.decode_s[0] for r in table.rows)
    print(f"\nsum of rows, decode @{table.decode_context[0]}: {tot_dec * 1e3:.1f} ms/token "
          f"(derived)")
    print(f"profiling wall time: {wall:.1f} s (measured)")
    print(f"peak resident memory: {fmt_bytes(peak_rss_bytes())} (ru_maxrss, measured)")
    print(f"peak MLX memory: {fmt_bytes(mx.get_peak_memory())} (measured)")
    print(f"model weights: {fmt_bytes(sum(r.weight_bytes for r in table.rows))}")
    print(f"cost table: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
