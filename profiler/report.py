"""What the user sees: a progress bar with ETA on stderr, and the summary table at the end.

Every number printed says whether it was measured or derived:
* measured: times (median of repeats), bandwidth and matmul microbenchmarks, peak memory;
* derived: achieved GB/s (weight bytes / measured decode time), % of the roofline (achieved /
  measured bandwidth), totals (sums of rows), the ETA.
Plain Python: no MLX import.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from profiler.costtable import CostTable, LayerRow


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_secs(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class ProgressBar:
    """profile.Progress that draws `[#####-----] 12/34 rows  layers.10  0:42 elapsed  ETA 1:10
    (derived)` on stderr. The ETA is derived: elapsed measuring time / work done x work left,
    work being parameters x tokens of the rows still to measure."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False, width: int = 28):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.width = width
        self.total = 0.0
        self.done = 0.0
        self.rows_total = 0
        self.rows_done = 0
        self.t0 = time.perf_counter()
        self.current = ""
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def start(self, total_units: float, n_rows: int) -> None:
        self.total = max(total_units, 1e-9)
        self.rows_total = n_rows
        self.t0 = time.perf_counter()
        self._draw()

    def row_started(self, name: str) -> None:
        self.current = name
        self._draw()

    def row_done(self, name: str, units: float, measured: bool) -> None:
        self.done += units
        self.rows_done += 1
        self.current = name + ("" if measured else " (shared)")
        self._draw(newline=not self.tty and measured)

    def note(self, text: str) -> None:
        if not self.quiet:
            self._clear()
            print(text, file=self.stream, flush=True)

    def finish(self) -> None:
        if not self.quiet and self.tty:
            self._draw()
            print(file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.tty and not self.quiet:
            print("\r" + " " * 100 + "\r", end="", file=self.stream)

    def _draw(self, newline: bool = False) -> None:
        if self.quiet or (not self.tty and not newline):
            return
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        fill = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.t0
        eta = "?" if self.done <= 0 else fmt_secs(elapsed / self.done * (self.total - self.done))
        line = (f"[{'#' * fill}{'-' * (self.width - fill)}] {self.rows_done}/{self.rows_total} "
                f"rows  {self.current:<18} {fmt_secs(elapsed)} elapsed  ETA {eta} (derived)")
        if self.tty:
            print("\r" + line[:120], end="\n" if newline else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)


def bytes_read(table: CostTable, row: LayerRow) -> int:
    """Weight bytes a row reads per token (a tied head reads the embed matrix)."""
    if row.kind == "head" and table.model.tie_word_embeddings:
        try:
            return row.weight_bytes + table.embed.weight_bytes
        except KeyError:
            return row.weight_bytes
    return row.weight_bytes


def summary(table: CostTable, out_path=None, wall_s: float | None = None) -> str:
    """The end-of-run table: per row decode ms, prefill ms, achieved GB/s vs the roofline,
    bytes, and totals."""
    d = table.device
    bw = d.memory_bandwidth_gbs
    q = table.quantization
    prec = f"{table.dtype}" + (f", {q['bits']}-bit group {q['group_size']}" if q else
                               ", unquantized")
    p_last = table.prefill_tokens[-1]
    c0 = table.decode_context[0]
    lines = [
        f"model {table.model.name} ({table.model.n_layers} layers, {table.model.source}), {prec}",
        f"device {d.host}: {d.name}, {d.backend}, MLX {d.mlx_version}, memory "
        f"{fmt_bytes(d.memory_total_bytes)} total / {fmt_bytes(d.memory_usable_bytes)} usable",
        f"measured: memory bandwidth {bw:.1f} GB/s, matmul {d.matmul_tflops * 1000:.1f} GFLOPS "
        f"({table.dtype})",
        f"times: median of {table.method.get('repeats', '?')} runs (measured; rows whose 'from' "
        "is another row carry that row's measurement); GB/s = bytes read / decode time and "
        "roofline = GB/s / measured bandwidth (derived); weights, KV/token: array sizes; "
        "peak mem: measured",
        "",
        f"{'row':<11} {'decode ms':>10} {'prefill ms':>11} {'GB/s':>8} {'roofline':>9} "
        f"{'weights':>10} {'KV/token':>9} {'peak mem':>10}  from",
        f"{'':<11} {'@' + str(c0) + ' ctx':>10} {'@' + str(p_last) + ' tok':>11} "
        f"{'derived':>8} {'% derived':>9}",
    ]
    shown_shared = 0
    blocks = table.blocks()
    for r in [table.embed] + blocks + [table.head] if _has(table) else table.rows:
        if r.kind == "block" and r.measured_from != r.name:
            shown_shared += 1
            if shown_shared > 2 and r is not blocks[-1]:
                if shown_shared == 3:
                    lines.append(f"{'...':<11} (blocks sharing a measurement: same numbers)")
                continue
        dec = r.decode_s[0]
        wb = bytes_read(table, r)
        gbs = wb / dec / 1e9 if dec > 0 else 0.0
        roof = f"{100 * gbs / bw:.0f}%" if bw > 0 else "-"
        gbs_s = f"{gbs:>8.2f}"
        if r.kind == "embed":  # a lookup reads one row per token, not the matrix
            gbs_s, roof = f"{'-':>8}", "-"
        lines.append(f"{r.name:<11} {dec * 1e3:>10.2f} {r.prefill_s[-1] * 1e3:>11.1f} "
                     f"{gbs_s} {roof:>9} {fmt_bytes(r.weight_bytes):>10} "
                     f"{fmt_bytes(r.kv_bytes_per_token):>9} "
                     f"{fmt_bytes(r.peak_memory_bytes):>10}  {r.measured_from}")
    if _has(table):
        tot_dec = sum(r.decode_s[0] for r in table.rows)
        tot_pre = sum(r.prefill_s[-1] for r in table.rows)
        tot_w = sum(r.weight_bytes for r in table.rows)
        lines.append(f"{'total':<11} {tot_dec * 1e3:>10.1f} {tot_pre * 1e3:>11.1f} "
                     f"{tot_w / tot_dec / 1e9 if tot_dec else 0:>8.2f} {'':>9} "
                     f"{fmt_bytes(tot_w):>10}   (sums of rows: derived)")
        lines.append(f"derived: {1 / tot_dec:.2f} tokens/s decode at {c0} context, "
                     f"{tot_pre:.2f} s to prefill {p_last} tokens, on this machine alone")
    lines += grid_lines(table)
    rss = table.method.get("peak_rss_bytes")
    wall = wall_s if wall_s is not None else table.method.get("profile_wall_s")
    extra = []
    if rss:
        extra.append(f"peak resident memory {fmt_bytes(rss)} (measured)")
    if wall:
        extra.append(f"profiling wall time {fmt_secs(wall)} (measured)")
    if extra:
        lines.append(", ".join(extra))
    if out_path:
        lines.append(f"cost table: {out_path}")
    return "\n".join(lines)


def grid_lines(table: CostTable) -> list[str]:
    """The batch, chunk and tensor-parallel grids of the first measured block, one line each
    (times measured; per stream and share of the whole block: derived)."""
    blocks = [r for r in table.blocks() if r.measured_from == r.name]
    if not blocks:
        return []
    b, c0, out = blocks[0], table.decode_context[0], []
    if len(table.decode_batch) > 1 and b.decode_batch_s:
        steps = " / ".join(f"{t * 1e3:.1f}" for t in b.decode_batch_s[0])
        per = " / ".join(f"{t * 1e3 / n:.1f}" for t, n in zip(b.decode_batch_s[0],
                                                              table.decode_batch))
        out.append(f"{b.name} decode step at batch {','.join(map(str, table.decode_batch))} "
                   f"@{c0} ctx: {steps} ms (measured); per stream {per} ms (derived)")
    if table.prefill_chunk and b.prefill_chunk_s:
        ch = ", ".join(f"{c} tok {t * 1e3:.1f} ms" for c, t in zip(table.prefill_chunk,
                                                                  b.prefill_chunk_s))
        out.append(f"{b.name} prefill chunk @{table.prefill_chunk_context} ctx: {ch} (measured)")
    tp = table.tensor_parallel
    if tp:
        shares = sorted((r for r in tp["rows"] if r["measured_from"] == b.name),
                        key=lambda r: r["kv_heads"])
        n = tp["n_kv_heads"]
        parts = [f"{r['kv_heads']}/{n} heads {r['decode_s'][0] * 1e3:.1f} ms decode, "
                 f"{r['prefill_s'][-1] * 1e3:.0f} ms prefill" for r in shares]
        out.append(f"{b.name} one tensor-parallel rank (all-reduces excluded; "
                   f"{fmt_bytes(tp['allreduce_bytes_per_token'])}/token each, 2 per block): "
                   + "; ".join(parts) + " (measured)")
    return out


def _has(table: CostTable) -> bool:
    names = {r.name for r in table.rows}
    return "embed" in names and "head" in names
