"""The cost table: what `profile-model` measured on one machine for one model, as versioned JSON.

This module is the contract between the profiler (which writes tables) and the splitter (which
reads them). It is plain Python: no MLX import, so `split-model` runs anywhere.

Format "mlx-split/cost-table", version 2 (docs/profiler.md, "The cost table", explains it field
by field; version 1 tables still read: they have no batch grid, i.e. `decode_batch` = [1])::

    {
      "format": "mlx-split/cost-table", "version": 2,
      "complete": true,                 # false while a run is in progress (resume file)
      "created": "2026-11-22T10:00:00Z",
      "model": {"name": "llama-3-8b", "repo_id": "mlx-community/Meta-Llama-3-8B-Instruct-4bit",
                "source": "builtin", "model_type": "llama", "config_hash": "sha256:...",
                "n_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
                "vocab_size": 128256, "tie_word_embeddings": false},
      "dtype": "bfloat16",               # activation / unquantized weight dtype
      "quantization": {"bits": 4, "group_size": 64} | null,
      "device": {"host": "studio", "name": "Apple M2 Ultra", "backend": "metal",
                 "mlx_version": "0.32.4", "platform": "Darwin-arm64",
                 "memory_total_bytes": ..., "memory_usable_bytes": ...,
                 "memory_bandwidth_gbs": 610.2, "matmul_tflops": 21.3,
                 "microbench": {...how both were measured...}},
      "grids": {"prefill_tokens": [16, 64, 256], "decode_context": [128, 1024],
                "decode_batch": [1, 2, 4, 8],          # v2: always holds 1
                "prefill_chunk": [16], "prefill_chunk_context": 1024},   # optional
      "method": {"warmup": 2, "repeats": 7, "statistic": "median", "max_rel_spread": 0.15, ...},
      "rows": [
        {"name": "embed", "kind": "embed", "layer": null, ...},
        {"name": "layers.0", "kind": "block", "layer": 0,
         "weight_bytes": 109051904, "activation_bytes_per_token": 8192,
         "kv_bytes_per_token": 4096, "peak_memory_bytes": 150000000,
         "prefill_s": [..one per prefill_tokens..], "prefill_spread": [...],
         "decode_s": [..one per decode_context..], "decode_spread": [...],
         "decode_batch_s": [[..one per decode_batch..] per decode_context], # [j][0] = decode_s[j]
         "decode_batch_spread": [[...]],
         "prefill_chunk_s": [..one per prefill_chunk..], "prefill_chunk_spread": [...],
         "measured_from": "layers.0"},
        ...,
        {"name": "head", "kind": "head", "layer": null, ...}   # final norm + LM head
      ],
      "tensor_parallel": {...}           # optional: one rank of a tensor-parallel block
    }

Times are seconds (median of the repeats); spread is (max - min) / median of the kept repeats.
`prefill_s[i]` is the time for the layer to process a prompt of `prefill_tokens[i]` tokens
from an empty cache; `decode_s[j]` is the time for one new token with the KV cache holding
`decode_context[j]` tokens. `measured_from` names the row whose measurement a row carries
(its own name when measured itself; blocks of identical structure may share one).
`decode_batch_s[j][b]` is one decode step of `decode_batch[b]` streams, each with
`decode_context[j]` tokens of KV cache; `prefill_chunk_s[i]` is a chunk of `prefill_chunk[i]`
tokens prefilled with `prefill_chunk_context` tokens already in the cache.

The "tensor_parallel" section (its own "version": 1) holds, per block structure and share of
k of the n KV heads, one tensor-parallel rank's block times (all-reduces excluded; see
profiler/tpslice.py) over the same prefill and decode grids, and the bytes each all-reduce
carries per token (`TP_SECTION` below lists its fields).

Readers: `decode_seconds(table, row, context, batch)`, `batch_grid(table)`,
`tp_block_seconds(table, layer, kv_heads, phase, x)`, `tp_block_bytes(table, layer, kv_heads)`.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from profiler import fields as F
from profiler.errors import UserError
from profiler.files import atomic_write_json, check_output, locked, read_json

__all__ = ["CostTable", "CostTableError", "DeviceInfo", "LayerRow", "ModelInfo", "read_table",
           "write_table", "validate", "from_dict", "default_path", "atomic_write_json",
           "lock_table", "interpolate", "decode_seconds", "batch_grid", "tp_block_seconds",
           "tp_block_bytes"]

FORMAT = "mlx-split/cost-table"
VERSION = 2
READS = (1, 2)  # versions this reader accepts (1: no batch grid, read as decode_batch = [1])
TP_VERSION = 1
ROW_KINDS = ("embed", "block", "head")
DEFAULT_DIR = Path("data") / "profiles"


class CostTableError(UserError):
    """A cost table that cannot be used: the message names the file and what is wrong."""


@dataclass
class ModelInfo:
    name: str
    config_hash: str
    n_layers: int
    hidden_size: int
    model_type: str = "llama"
    repo_id: str | None = None
    source: str = "builtin"  # builtin | local | config
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    tie_word_embeddings: bool = False


@dataclass
class DeviceInfo:
    host: str
    name: str
    backend: str  # cpu | metal | cuda
    mlx_version: str
    memory_total_bytes: int
    memory_usable_bytes: int
    memory_bandwidth_gbs: float  # measured by the microbenchmark
    matmul_tflops: float  # measured, in the profiled dtype
    platform: str = ""
    microbench: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerRow:
    name: str  # "embed", "layers.<i>", "head"
    kind: str  # embed | block | head
    layer: int | None  # block index for blocks, None otherwise
    weight_bytes: int
    activation_bytes_per_token: int  # bytes leaving this layer per token
    kv_bytes_per_token: int  # true KV-cache bytes per token (0 for embed/head)
    peak_memory_bytes: int  # peak MLX memory while the layer ran, weights included
    prefill_s: list[float]
    prefill_spread: list[float]
    decode_s: list[float]
    decode_spread: list[float]
    measured_from: str  # name of the row whose measurement this row carries
    # v2: [context][batch] seconds and spreads over grids.decode_batch (None: batch 1 only)
    decode_batch_s: list[list[float]] | None = None
    decode_batch_spread: list[list[float]] | None = None
    # optional: seconds per chunk of grids.prefill_chunk tokens at prefill_chunk_context
    prefill_chunk_s: list[float] | None = None
    prefill_chunk_spread: list[float] | None = None


@dataclass
class CostTable:
    model: ModelInfo
    dtype: str
    quantization: dict[str, int] | None
    device: DeviceInfo
    prefill_tokens: list[int]
    decode_context: list[int]
    rows: list[LayerRow]
    method: dict[str, Any] = field(default_factory=dict)
    complete: bool = True
    created: str = ""
    decode_batch: list[int] = field(default_factory=lambda: [1])
    prefill_chunk: list[int] = field(default_factory=list)
    prefill_chunk_context: int | None = None
    tensor_parallel: dict[str, Any] | None = None  # the section as written (see TP_SECTION)
    source: str = field(default="", compare=False)  # the file it was read from (messages)

    # -- access ---------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.model.n_layers

    def row(self, name: str) -> LayerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def embed(self) -> LayerRow:
        return self.row("embed")

    @property
    def head(self) -> LayerRow:
        return self.row("head")

    def blocks(self) -> list[LayerRow]:
        """Block rows ordered by layer index."""
        return sorted((r for r in self.rows if r.kind == "block"), key=lambda r: r.layer)

    def prefill_time(self, row: LayerRow, tokens: float) -> float:
        """Seconds for `row` to prefill `tokens` tokens: piecewise-linear in the measured grid,
        linear extrapolation beyond it (derived from measurements)."""
        return interpolate(self.prefill_tokens, row.prefill_s, tokens, through_origin=True)

    def decode_time(self, row: LayerRow, context: float) -> float:
        """Seconds for `row` to decode one token at KV context `context` (derived, as above)."""
        return interpolate(self.decode_context, row.decode_s, context, through_origin=False)

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        grids = {"prefill_tokens": list(self.prefill_tokens),
                 "decode_context": list(self.decode_context),
                 "decode_batch": list(self.decode_batch)}
        if self.prefill_chunk:
            grids["prefill_chunk"] = list(self.prefill_chunk)
            grids["prefill_chunk_context"] = self.prefill_chunk_context
        out = {
            "format": FORMAT,
            "version": VERSION,
            "complete": self.complete,
            "created": self.created or now_iso(),
            "model": asdict(self.model),
            "dtype": self.dtype,
            "quantization": self.quantization,
            "device": asdict(self.device),
            "grids": grids,
            "method": self.method,
            "rows": [_row_dict(r) for r in self.rows],
        }
        if self.tensor_parallel is not None:
            out["tensor_parallel"] = self.tensor_parallel
        return out


def _row_dict(r: LayerRow) -> dict[str, Any]:
    """A row as written: the batch grid always (batch 1 only: the decode_s column), the chunk
    grid when measured."""
    d = asdict(r)
    if d["decode_batch_s"] is None:
        d["decode_batch_s"] = [[t] for t in r.decode_s]
        d["decode_batch_spread"] = [[t] for t in r.decode_spread]
    if d["prefill_chunk_s"] is None:
        d.pop("prefill_chunk_s")
        d.pop("prefill_chunk_spread")
    return d


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def interpolate(xs: list[int], ys: list[float], x: float, through_origin: bool) -> float:
    """Piecewise-linear interpolation of measured points (xs strictly increasing).

    Inside the grid: the straight line between the two neighbouring measurements. Beyond the
    largest point: extrapolated from the last two points with a slope clipped at zero, so
    timing noise that makes two points decrease never extrapolates a cost towards zero
    (time never falls as the prompt or the context grows). Below the smallest point: for
    prefill (`through_origin`) the fixed-plus-linear cost implied by the first two points, never
    below the proportional share of the first point; for decode, the first point. With a single
    point: proportional to x for prefill, constant for decode. Derived, not measured.
    """
    if len(xs) == 1:
        return ys[0] * (x / xs[0]) if through_origin else ys[0]
    if x <= xs[0]:
        if not through_origin:
            return ys[0]
        b = max((ys[1] - ys[0]) / (xs[1] - xs[0]), 0.0)
        return max(ys[0] - b * (xs[0] - x), ys[0] * x / xs[0], 0.0)
    if x >= xs[-1]:
        slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
        return ys[-1] + slope * (x - xs[-1])
    i = max(k for k in range(len(xs) - 1) if xs[k] <= x)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)


def batch_grid(table: CostTable) -> list[int]:
    """The batch sizes decode was measured at (`grids.decode_batch`; [1] for version 1)."""
    return list(table.decode_batch or [1])


def decode_seconds(table: CostTable, row: LayerRow, context: float, batch: int = 1) -> float:
    """Seconds for `row` to make one decode step of `batch` streams, each with `context`
    tokens of KV cache. Derived from the measurements: in context as `interpolate` does for
    decode (piecewise-linear, the first point below the grid, the last slope clipped at zero
    beyond it), then piecewise-linear in batch between grid points and linear beyond the last
    two (slope clipped at zero). With a single batch point (version-1 tables, `--decode-batch
    1`) B streams cost B single steps: no batching gain is claimed without a measurement.
    At batch 1 this equals `table.decode_time(row, context)`."""
    if batch < 1:
        raise ValueError(f"batch {batch} must be >= 1")
    grid = batch_grid(table)
    cols = row.decode_batch_s or [[t] for t in row.decode_s]
    if len(grid) > 1 and len(cols[0]) == 1:  # a row measured at batch 1 only
        grid = [1]
    at_ctx = [interpolate(table.decode_context, [c[b] for c in cols], context,
                          through_origin=False) for b in range(len(grid))]
    return interpolate(grid, at_ctx, batch, through_origin=True)


def _tp(table: CostTable) -> dict[str, Any]:
    tp = table.tensor_parallel
    if not tp:
        where = table.source or f"the cost table of {table.model.name} on {table.device.host}"
        raise CostTableError(f"cost table {where}: has no tensor_parallel section; re-run "
                             "`profile-model MODEL --tp-shares 1,2,4,8` (KV-head shares) on "
                             "that machine to measure tensor-parallel ranks")
    return tp


def _tp_rows(table: CostTable, layer: int, kv_heads: int) -> list[dict[str, Any]]:
    """The measured shares of `layer`'s structure, by kv_heads (validated: no duplicates)."""
    tp = _tp(table)
    n = int(tp["n_kv_heads"])
    if not isinstance(kv_heads, int) or isinstance(kv_heads, bool) or not 1 <= kv_heads <= n:
        raise ValueError(f"kv_heads {kv_heads!r} must be a whole number of KV heads from 1 to "
                         f"{n}")
    rows = sorted((r for r in tp["rows"] if layer in r["layers"]), key=lambda r: r["kv_heads"])
    if not rows:
        raise CostTableError(f"cost table {table.source or table.model.name}: "
                             f"tensor_parallel has no row for layer {layer}; re-run "
                             "profile-model with --tp-shares to measure it")
    return rows


def _between(rows: list[dict[str, Any]], k: int, values) -> tuple[float, bool]:
    """(value at share k, derived): a measured share's own value, else linear in kv_heads
    between the neighbouring shares (fixed-plus-linear below the first, the last slope beyond
    the last, as `interpolate`)."""
    ks = [r["kv_heads"] for r in rows]
    ys = [values(r) for r in rows]
    if k in ks:
        return ys[ks.index(k)], False
    return interpolate(ks, ys, k, through_origin=True), True


def tp_block_seconds(table: CostTable, layer: int, kv_heads: int, phase: str,
                     x: float) -> tuple[float, bool]:
    """(seconds, derived) for ONE tensor-parallel rank holding `kv_heads` of the KV heads of
    block `layer` (their query heads and round(intermediate * k / n) MLP columns), all-reduces
    excluded: phase "prefill" (x = prompt tokens from an empty cache) or "decode" (x = KV
    context, one token). `derived` is False only for a measured share at a measured grid
    point; shares between grid points are linear in kv_heads, grid points in x as
    `interpolate` (prefill through the origin, decode flat below the grid)."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase {phase!r} must be 'prefill' or 'decode'")
    rows = _tp_rows(table, layer, kv_heads)
    grid = table.prefill_tokens if phase == "prefill" else table.decode_context
    key = "prefill_s" if phase == "prefill" else "decode_s"
    on_grid = x in grid
    secs, derived = _between(rows, kv_heads, lambda r: interpolate(
        grid, r[key], x, through_origin=phase == "prefill"))
    return secs, derived or not on_grid


def tp_block_bytes(table: CostTable, layer: int, kv_heads: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes per token) of one tensor-parallel rank holding `kv_heads`
    KV heads of block `layer`: measured shares as measured, others linear in kv_heads."""
    rows = _tp_rows(table, layer, kv_heads)
    w, _ = _between(rows, kv_heads, lambda r: float(r["weight_bytes"]))
    kv, _ = _between(rows, kv_heads, lambda r: float(r["kv_bytes_per_token"]))
    return int(round(w)), int(round(kv))


# -- paths and writing -------------------------------------------------------------------------

def slug(text: str) -> str:
    """File-name-safe form of a host or model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unnamed"


def default_path(host: str, model: str, variant: str | None = None,
                 directory: str | os.PathLike = DEFAULT_DIR) -> Path:
    """`data/profiles/<host>--<model>[--<variant>].json`, relative to the working directory."""
    name = f"{slug(host)}--{slug(model)}" + (f"--{slug(variant)}" if variant else "")
    return Path(directory) / f"{name}.json"


def _make_parents(path: str | os.PathLike) -> bool:
    """Only the default directory (data/profiles/) is created; a missing parent of a path the
    user gave is refused, as any tool would."""
    return Path(path).parent == DEFAULT_DIR


def write_table(table: CostTable, path: str | os.PathLike) -> Path:
    """Validate and write atomically (profiler.files). A partial table (complete=False) may
    lack rows. Bad paths and failed writes raise one UserError line; the old file is kept."""
    data = table.to_dict()
    validate(data, source=str(path), allow_partial=not table.complete)
    atomic_write_json(path, data, what=f"cost table {path}", make_parents=_make_parents(path))
    return Path(path)


def lock_table(path: str | os.PathLike):
    """One writer per table: a context manager held for a whole `profile-model` run; a second
    run of the same table refuses at once in one line naming the first (profiler.files.locked).
    Also refuses at once an output path that cannot be written."""
    what = f"cost table {path}"
    check_table_output(path, what)
    return locked(path, what, wait_s=0, make_parents=_make_parents(path))


def check_table_output(path: str | os.PathLike, what: str) -> Path:
    """Refuse at once a table path that cannot be written (profiler.files.check_output); only
    the default directory is created."""
    return check_output(path, what, make_parents=_make_parents(path))


# -- reading and validation ----------------------------------------------------------------

def read_table(path: str | os.PathLike, allow_partial: bool = False) -> CostTable:
    """Read and validate a cost table; any problem raises CostTableError with one clear line."""
    p = Path(path)
    data = read_json(p, f"cost table {p}", error=CostTableError,
                     missing="run `profile-model MODEL` on that machine first",
                     invalid="re-run profile-model to rewrite it")
    table = from_dict(data, source=str(p), allow_partial=allow_partial)
    table.source = str(p)
    return table


def from_dict(data: Any, source: str = "<dict>", allow_partial: bool = False) -> CostTable:
    validate(data, source=source, allow_partial=allow_partial)
    g = data["grids"]
    return CostTable(
        model=ModelInfo(**_known(ModelInfo, data["model"])),
        dtype=data["dtype"],
        quantization=data.get("quantization"),
        device=DeviceInfo(**_known(DeviceInfo, data["device"])),
        prefill_tokens=list(g["prefill_tokens"]),
        decode_context=list(g["decode_context"]),
        rows=[LayerRow(**_known(LayerRow, r)) for r in data["rows"]],
        method=data.get("method", {}),
        complete=bool(data.get("complete", True)),
        created=data.get("created", ""),
        decode_batch=list(g.get("decode_batch", [1])),
        prefill_chunk=list(g.get("prefill_chunk", [])),
        prefill_chunk_context=g.get("prefill_chunk_context"),
        tensor_parallel=data.get("tensor_parallel"),
        source=source if source != "<dict>" else "",
    )


def _known(cls, d: dict) -> dict:
    names = cls.__dataclass_fields__.keys()
    return {k: v for k, v in d.items() if k in names}


def _required(cls) -> tuple[str, ...]:
    """The dataclass fields without a default: a table must carry them."""
    from dataclasses import MISSING

    return tuple(k for k, f in cls.__dataclass_fields__.items()
                 if f.default is MISSING and f.default_factory is MISSING)


_STR = F.Str()
_NAME = F.Str(nonempty=True)
_TIMES = F.List(F.SECONDS, nonempty=True)
_GRID = F.List(F.Int(gt=0, le=10**9), nonempty=True)

MODEL = F.Obj({
    "name": _NAME, "config_hash": _NAME, "n_layers": F.Int(gt=0, le=100_000),
    "hidden_size": F.Int(gt=0, le=10**7), "model_type": _STR, "repo_id": F.Opt(_STR),
    "source": _STR, "num_attention_heads": F.Int(ge=0, le=10**6),
    "num_key_value_heads": F.Int(ge=0, le=10**6), "head_dim": F.Int(ge=0, le=10**6),
    "intermediate_size": F.Int(ge=0, le=10**9), "vocab_size": F.Int(ge=0, le=10**9),
    "tie_word_embeddings": F.Bool()}, required=_required(ModelInfo))
DEVICE = F.Obj({
    "host": _NAME, "name": _STR, "backend": _STR, "mlx_version": _STR, "platform": _STR,
    "memory_total_bytes": F.BYTES, "memory_usable_bytes": F.BYTES,
    "memory_bandwidth_gbs": F.Num(ge=0), "matmul_tflops": F.Num(ge=0),
    "microbench": F.Obj(name="an object (how the microbenchmarks ran; informational)")},
    required=_required(DeviceInfo))
QUANT = F.Opt(F.Obj({"bits": F.Int(gt=0, le=64), "group_size": F.Int(gt=0, le=1 << 20),
                     "mode": _STR}, name="an object {bits, group_size}"))
# method: what the run did. Fields a reader acts on are typed; the prose ones are strings.
METHOD = F.Obj({
    "warmup": F.Int(ge=0), "repeats": F.Int(gt=0), "statistic": _STR,
    "max_rel_spread": F.Num(ge=0), "max_rounds": F.Int(gt=0), "batch": F.Int(gt=0),
    "every_layer": F.Bool(), "clock": F.Str(choices=("wall", "process")),
    "flush_caches": F.Bool(), "settle_s": F.SECONDS, "decode_min_sample_s": F.SECONDS,
    "decode_max_steps": F.Int(gt=0), "peak_rss_bytes": F.BYTES, "profile_wall_s": F.SECONDS,
    "load_average_at_end": F.Num(ge=0), "seed": F.Int(), "tied_head": F.Opt(_STR),
    **{k: _STR for k in ("remeasure", "weights", "prefill", "decode", "sharing", "timing",
                         "cache_flush", "settle", "decode_steps", "profiler")}})
ROW = F.Obj({
    "name": _NAME, "kind": F.Str(choices=ROW_KINDS), "layer": F.Opt(F.Int(ge=0)),
    "weight_bytes": F.BYTES, "activation_bytes_per_token": F.BYTES,
    "kv_bytes_per_token": F.BYTES, "peak_memory_bytes": F.BYTES,
    "prefill_s": _TIMES, "prefill_spread": _TIMES, "decode_s": _TIMES, "decode_spread": _TIMES,
    "measured_from": _NAME, "decode_batch_s": F.List(_TIMES, nonempty=True),
    "decode_batch_spread": F.List(_TIMES, nonempty=True), "prefill_chunk_s": _TIMES,
    "prefill_chunk_spread": _TIMES}, required=_required(LayerRow),
    name="an object (one row)")
TP_ROW = F.Obj({
    "measured_from": _NAME, "layers": F.List(F.Int(ge=0), nonempty=True),
    "kv_heads": F.Int(gt=0, le=10**6), "mlp_columns": F.Int(gt=0, le=10**9),
    "weight_bytes": F.BYTES, "kv_bytes_per_token": F.BYTES, "prefill_s": _TIMES,
    "prefill_spread": _TIMES, "decode_s": _TIMES, "decode_spread": _TIMES},
    required=("measured_from", "layers", "kv_heads", "mlp_columns", "weight_bytes",
              "kv_bytes_per_token", "prefill_s", "prefill_spread", "decode_s", "decode_spread"),
    name="an object (one rank's share of a block)")
# The tensor-parallel section (format I2): one rank of a block at each measured share.
TP_SECTION = F.Obj({
    "version": F.Int(), "unit": F.Str(choices=("kv_head",)), "n_kv_heads": F.Int(gt=0),
    "q_per_kv": F.Int(gt=0), "grid_kv_heads": _GRID, "allreduces_per_block": F.Int(ge=0),
    "allreduce_bytes_per_token": F.BYTES, "rows": F.List(TP_ROW)},
    required=("version", "unit", "n_kv_heads", "q_per_kv", "grid_kv_heads",
              "allreduces_per_block", "allreduce_bytes_per_token", "rows"),
    name="an object (the tensor_parallel section)")
TABLE = F.Obj({
    "format": _STR, "version": F.Int(), "complete": F.Bool(), "created": _STR,
    "model": MODEL, "dtype": _NAME, "quantization": QUANT, "device": DEVICE,
    "grids": F.Obj({"prefill_tokens": _GRID, "decode_context": _GRID, "decode_batch": _GRID,
                    "prefill_chunk": _GRID, "prefill_chunk_context": F.Int(ge=0, le=10**9)},
                   required=("prefill_tokens", "decode_context")),
    "method": METHOD, "rows": F.List(ROW), "tensor_parallel": TP_SECTION},
    required=("model", "dtype", "device", "grids", "rows"))


def validate(data: Any, source: str = "<dict>", allow_partial: bool = False) -> None:
    """Check every field and everything the splitter relies on. Raises CostTableError (one
    line: the file, the field, what is wrong, how to fix it) on the first problem: wrong format
    or version, a missing field, a field of the wrong type or out of range (NaN, negative,
    infinite, a string for a number...), grids that are not increasing, row lists that do not
    match them, missing or duplicate rows."""

    def bad(msg: str) -> CostTableError:
        return CostTableError(f"cost table {source}: {msg}")

    if not isinstance(data, dict):
        raise bad("top level is not a JSON object; this is not a cost table")
    if data.get("format") != FORMAT:
        raise bad(f"format is {F.shown(data.get('format'))}, expected {FORMAT!r}; this is not "
                  "a cost table written by profile-model")
    if data.get("version") not in READS or isinstance(data.get("version"), bool):
        raise bad(f"version {F.shown(data.get('version'))} is not supported (this reader knows "
                  f"versions {', '.join(map(str, READS))}); re-run profile-model with this "
                  "release to rewrite it")
    try:
        F.check(data, TABLE)
    except F.FieldError as e:
        raise bad(f"{e.path}: {e.problem}; fix that field or re-run profile-model to rewrite "
                  "the table") from None
    if not data.get("complete", True) and not allow_partial:
        raise bad("the run that wrote it did not finish (complete=false); re-run the same "
                  "profile-model command to resume it")
    n_layers = data["model"]["n_layers"]
    grids = data["grids"]
    grid_lens = {}
    for key in ("prefill_tokens", "decode_context", "decode_batch", "prefill_chunk"):
        g = grids.get(key)
        if g is None:
            continue
        if any(b <= a for a, b in zip(g, g[1:])):
            raise bad(f"grids.{key}: {g} is not strictly increasing; list each size once, "
                      "smallest first")
        grid_lens[key] = len(g)
    _check_grids_v2(data, grids, bad)
    _check_rows(data["rows"], n_layers, grid_lens, bad)
    for i, r in enumerate(data["rows"]):
        _check_row_grids(r, f"rows[{i}] ({r['name']})", grids, data["version"], bad)
    if "tensor_parallel" in data:
        _check_tp(data["tensor_parallel"], n_layers, grids, bad)
    if not allow_partial:
        names = {r["name"] for r in data["rows"]}
        expected = {"embed", "head"} | {f"layers.{i}" for i in range(n_layers)}
        missing = sorted(expected - names, key=_row_order)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                              else "")
            raise bad(f"rows missing: {shown}; re-run profile-model to complete it")


def _check_grids_v2(data: dict, grids: dict, bad) -> None:
    """The batch grid (version 2: required, holds 1; version 1: none) and the chunk grid (its
    context with it)."""
    if data["version"] >= 2 and "decode_batch" not in grids:
        raise bad("grids.decode_batch: is missing (a version-2 table lists its batch sizes, "
                  "at least [1]); re-run profile-model to rewrite the table")
    if data["version"] < 2 and ("decode_batch" in grids or "prefill_chunk" in grids):
        raise bad("grids: a version-1 table has no decode_batch / prefill_chunk grid; write "
                  "version 2 or drop them")
    if "decode_batch" in grids and 1 not in grids["decode_batch"]:
        raise bad(f"grids.decode_batch: {grids['decode_batch']} does not hold 1 (the batch-1 "
                  "column is decode_s); re-run profile-model to rewrite the table")
    if ("prefill_chunk" in grids) != ("prefill_chunk_context" in grids):
        raise bad("grids: prefill_chunk and prefill_chunk_context come together (the chunk "
                  "sizes and the context they were measured at)")


def _check_row_grids(r: dict, where: str, grids: dict, version: int, bad) -> None:
    """A row's batch and chunk lists against the grids; the batch-1 column equals decode_s."""
    nb = len(grids.get("decode_batch", [1]))
    if "decode_batch_s" not in r:
        if version >= 2 and r["kind"] != "embed":
            raise bad(f"{where}.decode_batch_s: is missing (a version-2 block or head row "
                      "holds one list per decode context over grids.decode_batch)")
    else:
        b1 = grids.get("decode_batch", [1]).index(1)
        for key in ("decode_batch_s", "decode_batch_spread"):
            v = r.get(key)
            if v is None:
                raise bad(f"{where}.{key}: is missing (decode_batch_s and "
                          "decode_batch_spread come together)")
            if len(v) != len(r["decode_s"]) or any(len(c) != nb for c in v):
                raise bad(f"{where}.{key}: must hold one list of {nb} values (grids."
                          f"decode_batch) per decode context ({len(r['decode_s'])}); the "
                          "grids do not match")
        for j, (col, d) in enumerate(zip(r["decode_batch_s"], r["decode_s"])):
            if abs(col[b1] - d) > 1e-9 * max(abs(d), 1e-30):
                raise bad(f"{where}.decode_batch_s[{j}][{b1}]: {col[b1]!r} differs from "
                          f"decode_s[{j}] {d!r}; the batch-1 column is decode_s")
    nc = len(grids.get("prefill_chunk", []))
    for key in ("prefill_chunk_s", "prefill_chunk_spread"):
        if key in r and len(r[key]) != nc:
            raise bad(f"{where}.{key}: has {len(r[key])} values but grids.prefill_chunk has "
                      f"{nc}; the grids do not match")


def _check_tp(tp: dict, n_layers: int, grids: dict, bad) -> None:
    """The tensor_parallel section: its version, shares within the heads, one row per
    (layer, share), list lengths matching the grids."""
    if tp["version"] != TP_VERSION:
        raise bad(f"tensor_parallel.version {F.shown(tp['version'])} is not supported (this "
                  f"reader knows version {TP_VERSION}); re-run profile-model --tp-shares")
    n = tp["n_kv_heads"]
    seen = set()
    for i, r in enumerate(tp["rows"]):
        where = f"tensor_parallel.rows[{i}]"
        if r["kv_heads"] > n:
            raise bad(f"{where}.kv_heads: {r['kv_heads']} is more than n_kv_heads {n}")
        for layer in r["layers"]:
            if layer >= n_layers:
                raise bad(f"{where}.layers: {layer} is outside 0..{n_layers - 1} "
                          "(model.n_layers)")
            if (layer, r["kv_heads"]) in seen:
                raise bad(f"{where}: layer {layer} at {r['kv_heads']} KV heads appears twice")
            seen.add((layer, r["kv_heads"]))
        for key, grid in (("prefill_s", "prefill_tokens"), ("prefill_spread", "prefill_tokens"),
                          ("decode_s", "decode_context"), ("decode_spread", "decode_context")):
            if len(r[key]) != len(grids[grid]):
                raise bad(f"{where}.{key}: has {len(r[key])} values but grids.{grid} has "
                          f"{len(grids[grid])}; the grids do not match")


def _check_rows(rows: list[dict], n_layers: int, grid_lens: dict[str, int], bad) -> None:
    """Names, kinds, layer indices, list lengths and measured_from of the (typed) rows."""
    names = set()
    measured = set()
    for i, r in enumerate(rows):
        where = f"rows[{i}] ({r['name']})"
        if r["name"] in names:
            raise bad(f"{where}.name: duplicate row name {r['name']!r}; each row appears once")
        names.add(r["name"])
        if r["kind"] == "block":
            if r["layer"] is None or not 0 <= r["layer"] < n_layers:
                raise bad(f"{where}.layer: {F.shown(r['layer'])} is outside 0..{n_layers - 1} "
                          "(model.n_layers)")
            if r["name"] != f"layers.{r['layer']}":
                raise bad(f"{where}.name: a block row of layer {r['layer']} must be named "
                          f"layers.{r['layer']}")
        else:
            if r["layer"] is not None:
                raise bad(f"{where}.layer: an {r['kind']} row has no layer; write null")
            if r["name"] != r["kind"]:
                raise bad(f"{where}.name: an {r['kind']} row must be named {r['kind']!r}")
        for key, grid in (("prefill_s", "prefill_tokens"), ("prefill_spread", "prefill_tokens"),
                          ("decode_s", "decode_context"), ("decode_spread", "decode_context")):
            if len(r[key]) != grid_lens[grid]:
                raise bad(f"{where}.{key}: has {len(r[key])} values but grids.{grid} has "
                          f"{grid_lens[grid]}; the grids do not match")
        if r["measured_from"] == r["name"]:
            measured.add(r["name"])
    for i, r in enumerate(rows):
        if r["measured_from"] not in measured:
            raise bad(f"rows[{i}] ({r['name']}).measured_from: {r['measured_from']!r} is not a "
                      "row that was measured itself")


def _row_order(name: str) -> tuple[int, int]:
    if name == "embed":
        return (0, 0)
    if name == "head":
        return (2, 0)
    return (1, int(name.split(".")[1]))
