"""The cost table: what `profile-model` measured on one machine for one model, as versioned JSON.

This module is the contract between the profiler (which writes tables) and the splitter (which
reads them). It is plain Python: no MLX import, so `split-model` runs anywhere.

Format "mlx-split/cost-table", version 1 (docs/profiler.md, "The cost table", explains it field by field)::

    {
      "format": "mlx-split/cost-table", "version": 1,
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
      "grids": {"prefill_tokens": [16, 64, 256], "decode_context": [128, 1024]},
      "method": {"warmup": 2, "repeats": 7, "statistic": "median", "max_rel_spread": 0.15, ...},
      "rows": [
        {"name": "embed", "kind": "embed", "layer": null, ...},
        {"name": "layers.0", "kind": "block", "layer": 0,
         "weight_bytes": 109051904, "activation_bytes_per_token": 8192,
         "kv_bytes_per_token": 4096, "peak_memory_bytes": 150000000,
         "prefill_s": [..one per prefill_tokens..], "prefill_spread": [...],
         "decode_s": [..one per decode_context..], "decode_spread": [...],
         "measured_from": "layers.0"},
        ...,
        {"name": "head", "kind": "head", "layer": null, ...}   # final norm + LM head
      ]
    }

Times are seconds (median of the repeats); spread is (max - min) / median of the kept repeats.
`prefill_s[i]` is the time for the layer to process a prompt of `prefill_tokens[i]` tokens
from an empty cache; `decode_s[j]` is the time for one new token with the KV cache holding
`decode_context[j]` tokens. `measured_from` names the row whose measurement a row carries
(its own name when measured itself; blocks of identical structure may share one).
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
           "lock_table", "interpolate"]

FORMAT = "mlx-split/cost-table"
VERSION = 1
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
        return {
            "format": FORMAT,
            "version": VERSION,
            "complete": self.complete,
            "created": self.created or now_iso(),
            "model": asdict(self.model),
            "dtype": self.dtype,
            "quantization": self.quantization,
            "device": asdict(self.device),
            "grids": {"prefill_tokens": list(self.prefill_tokens),
                      "decode_context": list(self.decode_context)},
            "method": self.method,
            "rows": [asdict(r) for r in self.rows],
        }


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
    return from_dict(data, source=str(p), allow_partial=allow_partial)


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
    "measured_from": _NAME}, required=tuple(LayerRow.__dataclass_fields__),
    name="an object (one row)")
TABLE = F.Obj({
    "format": _STR, "version": F.Int(), "complete": F.Bool(), "created": _STR,
    "model": MODEL, "dtype": _NAME, "quantization": QUANT, "device": DEVICE,
    "grids": F.Obj({"prefill_tokens": _GRID, "decode_context": _GRID},
                   required=("prefill_tokens", "decode_context")),
    "method": METHOD, "rows": F.List(ROW)},
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
    if data.get("version") != VERSION or isinstance(data.get("version"), bool):
        raise bad(f"version {F.shown(data.get('version'))} is not supported (this reader knows "
                  f"version {VERSION}); re-run profile-model with this release to rewrite it")
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
    for key in ("prefill_tokens", "decode_context"):
        g = grids[key]
        if any(b <= a for a, b in zip(g, g[1:])):
            raise bad(f"grids.{key}: {g} is not strictly increasing; list each size once, "
                      "smallest first")
        grid_lens[key] = len(g)
    _check_rows(data["rows"], n_layers, grid_lens, bad)
    if not allow_partial:
        names = {r["name"] for r in data["rows"]}
        expected = {"embed", "head"} | {f"layers.{i}" for i in range(n_layers)}
        missing = sorted(expected - names, key=_row_order)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                              else "")
            raise bad(f"rows missing: {shown}; re-run profile-model to complete it")


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
