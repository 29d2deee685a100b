"""The layer-streaming profiling loop: one row at a time, written after every row, resumable.

    spec = resolve_model("llama-3-8b")
    table = profile_model(spec, ProfileOptions(), "data/profiles/host--llama-3-8b.json")

Order: embed, layers.0 .. layers.N-1, head. Only the row being measured is materialised (plus,
for a tied head, the embedding it reads): a block's weights are generated (built-in models) or
read from the directory (local), quantized if asked, timed, then every reference is dropped
before the next. Blocks whose structure equals an already measured block carry that block's
measurement (`measured_from` names it) unless `every_layer` is set.

After every finished row the table is written atomically with complete=false; a rerun with the
same identity (config hash, dtype, quantization, grids, batch, host and device) skips the rows
it already has. A different partial or complete table at the path is refused (UserError) unless
`restart` is set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from profiler import build, costtable, device, grids, rows, tpslice
from profiler.costtable import CostTable, LayerRow, ModelInfo
from profiler.errors import UserError
from profiler.models import ModelSpec, config_hash
# options and their checks live in profiler/settings.py; re-exported here for callers
from profiler.settings import (DEFAULT_DECODE, DEFAULT_DECODE_BATCH, DEFAULT_PREFILL,
                               DEFAULT_PREFILL_CHUNK, SETTLE_UNDER_QUOTA_S, ProfileOptions,
                               check_grids, check_options, decode_batch_grid, tp_grid)

__all__ = ["profile_model", "ProfileOptions", "Progress", "CallbackProgress",
           "resolve_precision", "check_options", "check_grids", "decode_batch_grid", "tp_grid",
           "identity", "model_info", "DEFAULT_PREFILL", "DEFAULT_DECODE",
           "DEFAULT_DECODE_BATCH", "DEFAULT_PREFILL_CHUNK", "SETTLE_UNDER_QUOTA_S"]


class Progress:
    """What the loop reports while it runs (report.ProgressBar draws it). All no-ops here."""

    def start(self, total_units: float, n_rows: int) -> None: ...

    def row_started(self, name: str) -> None: ...

    def row_done(self, name: str, units: float, measured: bool) -> None: ...

    def note(self, text: str) -> None: ...

    def finish(self) -> None: ...


class CallbackProgress(Progress):
    """Adapts a plain function `fn(event: dict)` to Progress. Events: {"event": "start",
    "rows": n}, {"event": "row_done", "name": ..., "measured": bool, "rows_done": k,
    "rows": n}, {"event": "note", "text": ...}, {"event": "finish"}."""

    def __init__(self, fn):
        self.fn = fn
        self.n = 0
        self.k = 0

    def start(self, total_units, n_rows):
        self.n = n_rows
        self.fn({"event": "start", "rows": n_rows})

    def row_done(self, name, units, measured):
        self.k += 1
        self.fn({"event": "row_done", "name": name, "measured": measured, "rows_done": self.k,
                 "rows": self.n})

    def note(self, text):
        self.fn({"event": "note", "text": text})

    def finish(self):
        self.fn({"event": "finish"})


def resolve_precision(spec: ModelSpec, opts: ProfileOptions, kind: str,
                      local_dtype: str | None = None) -> tuple[str, dict[str, int] | None]:
    """(activation dtype, quantization) of the run.

    Quantization: a quantized local directory keeps its own (bits must agree); otherwise
    bits="auto" means 4-bit, group 64 - what exo runs (mlx-community "-4bit" conversions);
    bits=0/None means unquantized.

    dtype "auto": a local directory keeps the dtype of its weights; built-in models use
    bfloat16 (the dtype of exo's models) on Metal and CUDA, and on the CPU build float32 when
    quantized (MLX's CPU quantized kernels with bfloat16 / float16 scales are 9x / far slower:
    1.4 s vs 0.16 s per 8B block decode, measured) and bfloat16 when not.
    """
    own = spec.quantization if spec.source == "local" else None
    bits = opts.bits
    if own:
        if bits not in ("auto", None) and int(bits) != own["bits"] or \
                (bits == 0):
            raise UserError(f"{spec.path} is stored {own['bits']}-bit (group "
                            f"{own['group_size']}); it is profiled as stored, drop --bits / "
                            "--no-quant or quantize from an unquantized directory")
        quant = dict(own)
    elif bits == "auto":
        quant = dict(spec.quantization) if (spec.source != "local" and spec.quantization) \
            else ({"bits": 4, "group_size": int(opts.group_size)} if spec.source != "local"
                  else None)
        if quant and spec.source != "local" and opts.group_size != 64:
            quant["group_size"] = int(opts.group_size)
    elif bits in (None, 0):
        quant = None
    else:
        if int(bits) not in (2, 3, 4, 5, 6, 8):
            raise UserError(f"--bits {bits} is not supported; use 2, 3, 4, 5, 6 or 8, or "
                            "--no-quant")
        quant = {"bits": int(bits), "group_size": int(opts.group_size)}
    if quant and quant["group_size"] not in (32, 64, 128):
        raise UserError(f"--group-size {quant['group_size']} is not supported; use 32, 64 "
                        "or 128")
    if opts.dtype != "auto":
        build.mx_dtype(opts.dtype)
        return opts.dtype, quant
    if spec.source == "local" and local_dtype:
        return local_dtype, quant
    if kind == "cpu":
        return ("float32" if quant else "bfloat16"), quant
    return "bfloat16", quant


def model_info(spec: ModelSpec, args) -> ModelInfo:
    c = spec.config
    heads = int(c.get("num_attention_heads", 0) or 0)
    hidden = int(c["hidden_size"])
    return ModelInfo(
        name=spec.name, config_hash=config_hash(c), n_layers=int(c["num_hidden_layers"]),
        hidden_size=hidden, model_type=str(c.get("model_type", "")), repo_id=spec.repo_id,
        source=spec.source, num_attention_heads=heads,
        num_key_value_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or (hidden // heads if heads else 0)),
        intermediate_size=int(c.get("intermediate_size", 0) or 0),
        vocab_size=int(c.get("vocab_size", 0) or 0),
        tie_word_embeddings=bool(getattr(args, "tie_word_embeddings",
                                         c.get("tie_word_embeddings", False))),
    )


def identity(t: CostTable) -> dict[str, Any]:
    """What must match for a table at the output path to be resumed."""
    return {"config_hash": t.model.config_hash, "dtype": t.dtype,
            "quantization": t.quantization, "prefill_tokens": list(t.prefill_tokens),
            "decode_context": list(t.decode_context), "batch": t.method.get("batch", 1),
            "clock": t.method.get("clock", "wall"),
            "settle_s": float(t.method.get("settle_s", 0.0)),  # tables before it: no idle
            "decode_max_steps": int(t.method.get("decode_max_steps", 1)),
            "chain_blocks": int(t.method.get("chain_blocks", 1)),  # before it: alone
            # prefill in a chain of short passes (tables before it: each block alone)
            "prefill_chain_s": float(t.method.get("prefill_chain_s", 0.0)),
            "decode_batch": costtable.batch_grid(t),  # version 1: [1]
            "batch_chain_s": float(t.method.get("batch_chain_s", 0.0))
            if len(costtable.batch_grid(t)) > 1 else 0.0,
            "prefill_chunk": list(t.prefill_chunk),
            "prefill_chunk_context": t.prefill_chunk_context if t.prefill_chunk else None,
            "tp_shares": list((t.tensor_parallel or {}).get("grid_kv_heads", [])),
            "host": t.device.host, "device": t.device.name, "backend": t.device.backend}


def _load_existing(out_path: Path) -> CostTable | None:
    """The table already at the output path: a partial one (complete=false) may lack rows, a
    complete one must pass the full check (a bad table is refused, not silently resumed)."""
    if not out_path.exists():
        return None
    import json

    try:
        partial = json.loads(out_path.read_text()).get("complete", True) is False
    except (ValueError, AttributeError):
        partial = False  # read_table reports it properly
    return costtable.read_table(out_path, allow_partial=partial)


def _row_from(t_prefill, t_decode, **kw) -> LayerRow:
    return LayerRow(prefill_s=[t.median_s for t in t_prefill],
                    prefill_spread=[round(t.spread, 4) for t in t_prefill],
                    decode_s=[t.median_s for t in t_decode],
                    decode_spread=[round(t.spread, 4) for t in t_decode], **kw)


def profile_model(spec: ModelSpec, opts: ProfileOptions | None, out_path,
                  progress=None) -> CostTable:
    """One run per table: the table's lock is held for the whole run (costtable.lock_table: a
    second run of the same table refuses at once; an unwritable output is refused before
    anything is measured). See `_profile_model`."""
    with costtable.lock_table(out_path):
        return _profile_model(spec, opts, out_path, progress)


@dataclass
class Run:
    """One profile run: what was built (phase 1) and what every later phase reads."""

    spec: ModelSpec
    opts: ProfileOptions
    out_path: Path
    progress: Progress
    started: float
    model: Any
    parts: build.Parts
    args: Any
    info: ModelInfo
    dtype: str
    quant: dict[str, int] | None
    dt: Any
    generated: bool
    method: rows.Method
    chain_k: int
    sigs: list
    counts: list[int]
    batches: list[int]
    chunks: list[int]
    chunk_context: int | None
    tp_grid: list[int]
    # set by later phases
    measured_by_sig: dict = field(default_factory=dict)
    units: Any = None
    x1: Any = None
    templates: list = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.parts.layers)

    @property
    def prefill_chain_s(self) -> float:
        """Prefill passes shorter than this are timed in a chain (rows.prefill_lengths); 0
        when blocks are timed alone (--chain-blocks 1, --every-layer)."""
        return rows.PREFILL_CHAIN_PASS_S if self.chain_k > 1 else 0.0

    @property
    def order(self) -> list[str]:
        return ["embed"] + [f"layers.{i}" for i in range(self.n_layers)] + ["head"]

    def want(self) -> dict[str, Any]:
        """This run's identity (see `identity`), the machine's fields excluded."""
        o = self.opts
        return {"config_hash": self.info.config_hash, "dtype": self.dtype,
                "quantization": self.quant, "prefill_tokens": self.method.prefill_tokens,
                "decode_context": self.method.decode_context, "batch": o.batch,
                "clock": o.clock, "settle_s": float(o.settle_s),
                "decode_max_steps": int(o.decode_max_steps), "chain_blocks": self.chain_k,
                "prefill_chain_s": self.prefill_chain_s,
                "decode_batch": self.batches,
                "batch_chain_s": float(o.batch_chain_s) if len(self.batches) > 1 else 0.0,
                "prefill_chunk": self.chunks,
                "prefill_chunk_context": self.chunk_context if self.chunks else None,
                "tp_shares": self.tp_grid}


def _profile_model(spec: ModelSpec, opts: ProfileOptions | None, out_path,
                   progress=None) -> CostTable:
    """Measure every row of `spec` on this machine and write the cost table to `out_path`
    (atomically, after every row; complete=True at the end). Returns the table.

    Phases: build (the lazy model, precision, grids), resume (the table already at the
    path), plan (progress units, the memory check), measure rows (each block with its batch,
    chunk and tensor-parallel grids: `_measure_block`), finish.

    `progress`: None, a `Progress` (e.g. report.ProgressBar), or a function taking event dicts
    (see CallbackProgress). Raises UserError for bad options or a mismatching table at
    `out_path`."""
    run = _build(spec, opts or ProfileOptions(), Path(out_path), _as_progress(progress))
    existing, done = _resume(run)
    if existing is not None and existing.complete and not done:
        return existing
    table = _start_table(run, existing, done)
    write = _writer(run, table, done)
    _plan(run, table, done)
    _measure_rows(run, table, done, write)
    _finish(run, table, write)
    return table


def _as_progress(progress) -> Progress:
    if progress is None:
        return Progress()
    if not hasattr(progress, "row_done") and callable(progress):
        return CallbackProgress(progress)
    return progress


def _build(spec: ModelSpec, opts: ProfileOptions, out_path: Path, progress: Progress) -> Run:
    """Phase 1: check the options, build the lazy model, choose precision and grids."""
    check_options(opts)
    kind = device.backend()
    if opts.clock == "process" and kind != "cpu":
        raise UserError(f"--clock process measures CPU time, which says nothing about work on "
                        f"the {kind} GPU; use --clock wall (the default) here")
    started = time.perf_counter()
    if opts.settle_s is None:
        opts = replace(opts, settle_s=SETTLE_UNDER_QUOTA_S if device.cpu_quota_cores() else 0.0)
    model = build.skeleton(spec)
    parts = build.model_parts(model)
    args = getattr(model, "args", None)
    n_layers = len(parts.layers)
    local_dt = None
    if spec.source == "local":
        dt = build.floating_dtype(parts.layers[0]) if n_layers else None
        local_dt = build.dtype_name(dt) if dt is not None else None
    dtype, quant = resolve_precision(spec, opts, kind, local_dt)
    tp = tp_grid(opts, spec.config, spec.name, quant["group_size"] if quant else None)
    if tp and n_layers:
        why = tpslice.check_block(parts.layers[0])
        if why:
            raise UserError(f"--tp-shares: {spec.name}'s blocks cannot be sliced into "
                            f"tensor-parallel ranks ({why}); use --tp-shares none")
    info = model_info(spec, args)
    info.n_layers = n_layers
    generated = spec.source != "local"
    method = rows.Method(prefill_tokens=list(opts.prefill_tokens),
                         decode_context=list(opts.decode_context), warmup=opts.warmup,
                         repeats=opts.repeats, max_rel_spread=opts.max_rel_spread,
                         max_rounds=opts.max_rounds, batch=opts.batch, seed=opts.seed,
                         clock=opts.clock, settle_s=opts.settle_s,
                         decode_min_sample_s=opts.decode_min_sample_s,
                         decode_max_steps=opts.decode_max_steps)
    chunks = list(opts.prefill_chunk or [])
    return Run(spec=spec, opts=opts, out_path=out_path, progress=progress, started=started,
               model=model, parts=parts, args=args, info=info, dtype=dtype, quant=quant,
               dt=build.mx_dtype(dtype), generated=generated, method=method,
               chain_k=1 if opts.every_layer else max(1, int(opts.chain_blocks)),
               # structure of every block, from the lazy skeleton (nothing evaluated here)
               sigs=[build.structure(b, with_dtype=not generated) for b in parts.layers],
               counts=[build.param_count(b) for b in parts.layers],
               batches=decode_batch_grid(opts), chunks=chunks,
               chunk_context=(opts.prefill_chunk_context if opts.prefill_chunk_context
                              is not None else max(opts.decode_context)) if chunks else None,
               tp_grid=tp)


def _resume(run: Run) -> tuple[CostTable | None, dict[str, LayerRow]]:
    """Phase 2: the table already at the output path. Returns (existing table, its rows by
    name): a complete table of this run with no rows to add comes back with no rows (nothing
    to measure); a table of another run is refused."""
    existing = None if run.opts.restart else _load_existing(run.out_path)
    if existing is None:
        return None, {}
    want, have = run.want(), identity(existing)
    diff = [k for k, v in want.items() if have[k] != v]
    if not diff:
        here = device.describe(run.dtype, microbench=False)
        diff = [k for k, v in (("host", here.host), ("device", here.name),
                               ("backend", here.backend)) if have[k] != v]
    if diff:
        k = diff[0]
        raise UserError(f"{run.out_path} holds a {'complete' if existing.complete else 'partial'}"
                        f" table of another run ({k}: {have.get(k)!r} there, "
                        f"{(want.get(k) if k in want else 'this machine')!r} now); use "
                        "--restart to overwrite it or --out for another file")
    if existing.complete and existing.n_layers == run.n_layers:
        run.progress.note(f"{run.out_path} is already complete for this model and these "
                          "options; nothing to measure (use --restart to measure again)")
        return existing, {}
    return existing, {r.name: r for r in existing.rows}


def _method_record(run: Run) -> dict[str, Any]:
    """The table's `method`: how every number was measured (prose for readers, typed fields
    for the resume check)."""
    opts, info = run.opts, run.info
    meth = {"warmup": opts.warmup, "repeats": opts.repeats, "statistic": "median",
            "max_rel_spread": opts.max_rel_spread, "max_rounds": opts.max_rounds,
            "remeasure": "a point whose spread exceeds max_rel_spread is measured again (up "
                         "to max_rounds rounds, the tightest kept) unless its round took "
                         "over 60 s",
            "batch": opts.batch, "every_layer": opts.every_layer,
            "weights": "generated (normal noise, right shapes and dtype)" if run.generated
            else f"real weights from {run.spec.path}",
            "prefill": "block: P tokens into an empty KV cache; embed: P token ids; head: "
                       "final norm + LM head on the last position only",
            "decode": "one token with the KV cache filled to the context (written directly); "
                      "embed/head do not depend on the context: measured once",
            "sharing": "every block measured" if opts.every_layer else
                       "blocks of identical structure carry the first one's measurement "
                       "(measured_from)",
            "tied_head": "head reads the embed row's matrix; its bytes are counted in embed"
                         if info.tie_word_embeddings else None,
            "timing": "mx.eval of outputs and cache + mx.synchronize",
            "clock": opts.clock,
            "flush_caches": True,
            "cache_flush": "a 64 MiB buffer is read (untimed) before every timed run so "
                           "weights come from memory, not cache",
            "settle_s": opts.settle_s,
            "settle": "idle this long after the untimed setup (cache rewind and flush), "
                      "before each timed run starts, as a pipeline stage idles while it waits "
                      "for its input: under a CPU quota the setup's CPU would otherwise be "
                      "repaid as throttling inside the timed run (default: 0.02 s under a CPU "
                      "quota, 0 without one)",
            "chain_blocks": run.chain_k,
            "chain": "block decode is timed inside a chain of up to chain_blocks distinct "
                     "blocks of its structure (the next ones of the model, their own weights), "
                     "one graph, one evaluation, one pass per sample after the settle, as a "
                     "stage runs its blocks; the row holds the chain's time / k. Prefill: in "
                     "the first n of that chain, n per prefill length (prefill_chain_blocks) "
                     "as many blocks as one pass of prefill_chain_s seconds holds by one "
                     "block's pass (1: the block alone). Peak memory: an untimed run of the "
                     "block alone",
            "prefill_chain_s": run.prefill_chain_s,
            "decode_min_sample_s": opts.decode_min_sample_s,
            "decode_max_steps": opts.decode_max_steps,
            "decode_steps": "block decode: when one step is shorter than decode_min_sample_s, "
                            "each timed sample runs up to decode_max_steps steps back to back "
                            "(the cache rewound between them, inside the clock) and records "
                            "their mean, as a stage runs its blocks back to back: a single "
                            "short step after an idle overruns a CPU quota by up to a tick "
                            "and repays it after the clock stops",
            "profiler": "profiler (mlx-measured-split)"}
    meth.update(_grid_method(run))
    return meth


def _grid_method(run: Run) -> dict[str, Any]:
    out: dict[str, Any] = {
        "decode_batch": "one decode step of B streams (grids.decode_batch), each with the "
                        "context's KV cache, timed in the chain of distinct blocks as batch 1; "
                        "the chain keeps fewer blocks where a pass of fewer already lasts "
                        "batch_chain_s (estimated as B x the batch-1 step), listed per block in "
                        "decode_batch_chain_blocks; embed / head: B tokens / B last positions",
        "batch_chain_s": float(run.opts.batch_chain_s)}
    if run.chunks:
        out["prefill_chunk"] = ("block alone: a chunk of c tokens (grids.prefill_chunk) with "
                                "grids.prefill_chunk_context tokens already in its KV cache, "
                                "causal within the chunk; embed: c token ids; head: the last "
                                "position of the chunk")
    if run.tp_grid:
        out["tensor_parallel"] = ("one rank holding k of the n KV heads (k x q_per_kv query "
                                  "heads, round(intermediate x k / n) MLP columns, to the "
                                  "quantization group), sliced from each block of the chain "
                                  "(profiler/tpslice.py), timed as the whole block; the two "
                                  "all-reduces per block are excluded; k = n is the block's "
                                  "own measurement")
    return out


def _start_table(run: Run, existing: CostTable | None, resumed: dict[str, LayerRow]
                 ) -> CostTable:
    """Phase 3: the table this run fills (a resumed one keeps its rows, device, method)."""
    if existing is not None and resumed:
        dev = existing.device
        run.progress.note(f"resuming {run.out_path}: {len(resumed)} of {run.n_layers + 2} rows "
                          "already measured, skipping them")
    else:
        run.progress.note("measuring the device (memory bandwidth, matmul throughput)..."
                          if run.opts.microbench else
                          "describing the device (microbenchmarks skipped)")
        dev = device.describe(run.dtype, microbench=run.opts.microbench)
    meth = _method_record(run)
    if existing is not None and resumed:
        meth = {**existing.method, **{k: v for k, v in meth.items()
                                      if k not in existing.method}}
    tp = None
    if run.tp_grid:
        n_heads, n_kv, qpk = tpslice.heads(run.spec.config)
        tp = (existing.tensor_parallel if existing is not None and resumed and
              existing.tensor_parallel else
              grids.tp_section(n_kv, qpk, run.tp_grid, run.info.hidden_size, run.dt.size))
    return CostTable(model=run.info, dtype=run.dtype, quantization=run.quant, device=dev,
                     prefill_tokens=run.method.prefill_tokens,
                     decode_context=run.method.decode_context, rows=[], method=meth,
                     complete=False, created=existing.created if (existing and resumed) else "",
                     decode_batch=list(run.batches), prefill_chunk=list(run.chunks),
                     prefill_chunk_context=run.chunk_context, tensor_parallel=tp)


def _writer(run: Run, table: CostTable, done: dict[str, LayerRow]):
    """`write()`: the rows done so far, peak memory and wall time, atomically to the path."""
    meth = table.method
    meth["_wall_before"] = float(meth.get("profile_wall_s", 0.0))

    def write() -> None:
        table.rows = [done[n] for n in run.order if n in done]
        meth["peak_rss_bytes"] = max(device.peak_rss_bytes(), int(meth.get("peak_rss_bytes", 0)))
        meth["profile_wall_s"] = round(
            float(meth.get("_wall_before", 0.0)) + time.perf_counter() - run.started, 2)
        costtable.write_table(table, run.out_path)

    return write


def _plan(run: Run, table: CostTable, done: dict[str, LayerRow]) -> None:
    """Phase 4: which block measurement each block carries, the progress bar's work units
    (~ parameters x tokens processed), and the one-row memory check."""
    run.measured_by_sig = {}
    for i in range(run.n_layers):
        r = done.get(f"layers.{i}")
        if r is not None and r.measured_from == r.name:
            run.measured_by_sig.setdefault(run.sigs[i], r.name)
    m = run.method
    tok_block = (sum(m.prefill_tokens) + len(m.decode_context) * sum(run.batches)
                 + sum(run.chunks)) * (1 + sum(k for k in run.tp_grid[:-1]) /
                                       max(run.tp_grid[-1] if run.tp_grid else 1, 1))
    tok_head = len(m.prefill_tokens) + sum(run.batches) + len(run.chunks)
    parts = run.parts
    head_params = (build.param_count(parts.lm_head) if parts.lm_head is not None
                   else build.param_count(parts.embed))
    embed_params = build.param_count(parts.embed)

    def units(name: str, i: int | None) -> float:
        # making weights real costs about as much as ~2 tokens of compute (measured on CPU)
        if name == "embed":
            return 2.0 * embed_params
        if name == "head":
            return head_params * (tok_head + 2)
        return run.counts[i] * (tok_block + 2)

    run.units = units
    plan_sigs: set = set(run.measured_by_sig)
    total = 0.0
    for i, name in enumerate(run.order):
        li = i - 1 if name.startswith("layers.") else None
        if name in done:
            continue
        if li is not None and not run.opts.every_layer:
            if run.sigs[li] in plan_sigs:
                continue
            plan_sigs.add(run.sigs[li])
        total += units(name, li)
    run.progress.start(total, len(run.order) - len(done))
    # One row must fit: refuse up front rather than swap (estimate: parameters x bytes each).
    q, dt = run.quant, run.dt
    per_param = (q["bits"] / 8 + 2 * dt.size / q["group_size"]) if q else dt.size
    biggest = max(run.counts + [embed_params, head_params]) * per_param
    usable = table.device.memory_usable_bytes
    if biggest > usable > 0:
        raise UserError(f"the largest layer of {run.spec.name} needs about "
                        f"{biggest / 2**30:.1f} GiB in {run.dtype}"
                        f"{' ' + str(q['bits']) + '-bit' if q else ''}, but only "
                        f"{usable / 2**30:.1f} GiB is usable here; quantize (--bits 4) or use a "
                        "smaller dtype")


def _measure_rows(run: Run, table: CostTable, done: dict[str, LayerRow], write) -> None:
    """Phase 5: every row not done yet, in order, the table written after each."""
    run.x1 = rows.hidden(run.opts.batch, 1, run.info.hidden_size, run.dt,
                         seed=run.opts.seed + 3)
    rows.flush_caches()  # allocate the flush buffer now, outside every row's peak memory
    run.templates = _template_caches(run.model, run.n_layers)
    for name in run.order:
        if name in done:
            continue
        run.progress.row_started(name)
        if name in ("embed", "head"):
            done[name] = (_measure_embed if name == "embed" else _measure_head)(run)
            write()
            run.progress.row_done(name, run.units(name, None), True)
            continue
        i = int(name.split(".")[1])
        source = None if run.opts.every_layer else run.measured_by_sig.get(run.sigs[i])
        if source is not None:
            done[name] = replace(done[source], name=name, layer=i, measured_from=source)
            _share_tp_rows(table, source, i)
            build.release(run.parts, i)
            write()
            run.progress.row_done(name, 0.0, False)
            continue
        done[name] = _measure_block(run, table, i, done)
        run.measured_by_sig.setdefault(run.sigs[i], name)
        write()
        run.progress.row_done(name, run.units(name, i), True)


def _measure_block(run: Run, table: CostTable, i: int, done: dict[str, LayerRow]) -> LayerRow:
    """Block i: materialised (with the next blocks of its structure for the decode chain),
    its peak memory from an untimed pass alone, its prefill and decode (rows.time_chain),
    then its batch, chunk and tensor-parallel grids (profiler.grids) on the same chain."""
    o, parts, m = run.opts, run.parts, run.method
    H, dt = run.info.hidden_size, run.dt
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    block = build.materialise(parts.layers[i], generated=run.generated, dtype=dt,
                              quant=run.quant, seed=o.seed + 1000 + i)
    mx.reset_peak_memory()  # peak while running (weights included), not while generating
    wbytes = build.param_bytes(block)
    kvb = rows.kv_bytes_per_token(block, run.templates[i], run.x1)
    rows.peak_pass(block, run.templates[i], H, dt, m)
    peak = max(mx.get_peak_memory() - base, 0)
    members = _chain_members(i, run.sigs, done, run.chain_k, wbytes,
                             table.device.memory_usable_bytes)
    for j in members[1:]:
        build.materialise(parts.layers[j], generated=run.generated, dtype=dt, quant=run.quant,
                          seed=o.seed + 1000 + j)
    chain = [parts.layers[j] for j in members]
    caches = [run.templates[j] for j in members]
    pre_n = rows.prefill_lengths(chain, caches, H, dt, m, run.prefill_chain_s)
    table.method.setdefault("prefill_chain_blocks", {})[f"layers.{i}"] = pre_n
    t_pre, t_dec = rows.time_chain(chain, caches, H, dt, m, pre_n)
    bt, lengths = grids.batch_grid_timings(
        chain, caches, H, dt, m, run.batches, t_dec, o.batch_chain_s,
        (table.device.memory_usable_bytes, int(wbytes), kvb))
    table.method.setdefault("decode_batch_chain_blocks", {})[f"layers.{i}"] = lengths
    extra = grids.batch_fields(bt)
    if run.chunks:
        extra.update(grids.chunk_fields(rows.time_chunks(
            block, run.templates[i], H, dt, m, run.chunks, run.chunk_context)))
    row = _row_from(t_pre, t_dec, name=f"layers.{i}", kind="block", layer=i,
                    weight_bytes=int(wbytes), activation_bytes_per_token=H * dt.size,
                    kv_bytes_per_token=kvb, peak_memory_bytes=int(peak),
                    measured_from=f"layers.{i}", **extra)
    if run.tp_grid:
        whole = {"name": row.name, "layer": i, "weight_bytes": row.weight_bytes,
                 "kv_bytes_per_token": kvb, "prefill_s": row.prefill_s,
                 "prefill_spread": row.prefill_spread, "decode_s": row.decode_s,
                 "decode_spread": row.decode_spread}
        table.tensor_parallel["rows"] += grids.tp_share_rows(
            chain, caches, run.spec.config, run.tp_grid, whole, H, dt, m, run.x1,
            grids.down_group_size(block))
    del block, chain
    for j in members:
        build.release(parts, j)
    return row


def _share_tp_rows(table: CostTable, source: str, i: int) -> None:
    """Block i carries `source`'s measurement: its tensor-parallel rows too."""
    for r in (table.tensor_parallel or {}).get("rows", []):
        if r["measured_from"] == source and i not in r["layers"]:
            r["layers"].append(i)


def _finish(run: Run, table: CostTable, write) -> None:
    """Phase 6: complete=True, the load at the end, the last write."""
    table.complete = True
    table.method.pop("_wall_before", None)
    try:
        table.method["load_average_at_end"] = round(__import__("os").getloadavg()[0], 2)
    except OSError:
        pass
    note = device.load_note()
    if note:
        run.progress.note(note)
    write()
    run.progress.finish()


def _chain_members(i: int, sigs: list, done: dict, k: int, block_bytes: int,
                   usable_bytes: int) -> list[int]:
    """The blocks timed together with block i: i and the next blocks of the same structure not
    yet measured, up to k in all, and no more than a quarter of usable memory holds."""
    if usable_bytes > 0 and block_bytes > 0:
        k = min(k, max(1, int(usable_bytes // 4 // block_bytes)))
    out = [i]
    for j in range(i + 1, len(sigs)):
        if len(out) >= k:
            break
        if sigs[j] == sigs[i] and f"layers.{j}" not in done:
            out.append(j)
    return out


def _template_caches(model, n_layers: int) -> list:
    """One empty cache per block, of the kind the model uses (KVCache for llama)."""
    if hasattr(model, "make_cache"):
        return list(model.make_cache())
    from mlx_lm.models.cache import KVCache

    return [KVCache() for _ in range(n_layers)]


def _measure_embed(run: Run) -> LayerRow:
    parts, m = run.parts, run.method
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    parts.set_embed(build.materialise(parts.embed, generated=run.generated, dtype=run.dt,
                                      quant=run.quant, seed=m.seed + 10))
    parts.embed_ready = True
    mx.reset_peak_memory()
    wbytes = build.param_bytes(parts.embed)
    t_pre, t_dec, t_bat, t_chk = rows.time_embed(parts.embed, run.info.vocab_size, m,
                                                 _extra_batches(run), tuple(run.chunks))
    peak = max(mx.get_peak_memory() - base, 0)
    row = _row_from(t_pre, t_dec, name="embed", kind="embed", layer=None,
                    weight_bytes=int(wbytes),
                    activation_bytes_per_token=run.info.hidden_size * run.dt.size,
                    kv_bytes_per_token=0, peak_memory_bytes=int(peak), measured_from="embed",
                    **_grid_fields(run, t_dec, t_bat, t_chk))
    if not parts.tied:  # a tied head needs the matrix again: keep it until the head is done
        _drop(parts.container, "embed_tokens", parts.embed)
        parts.embed = None
    return row


def _measure_head(run: Run) -> LayerRow:
    parts, m, dt = run.parts, run.method, run.dt
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    parts.container.norm = parts.norm = build.materialise(
        parts.norm, generated=run.generated, dtype=dt, quant=None, seed=m.seed + 20)
    if parts.lm_head is not None:
        parts.set_head(build.materialise(parts.lm_head, generated=run.generated, dtype=dt,
                                         quant=run.quant, seed=m.seed + 21))
        wbytes = build.param_bytes(parts.norm) + build.param_bytes(parts.lm_head)
    else:
        # tied: the embedding matrix is the head (materialised by the embed row, or again
        # here after a resume)
        if not getattr(parts, "embed_ready", False):
            parts.set_embed(build.materialise(parts.embed, generated=run.generated, dtype=dt,
                                              quant=run.quant, seed=m.seed + 10))
        wbytes = build.param_bytes(parts.norm)
    mx.reset_peak_memory()
    head = rows.head_fn(parts.norm, parts.lm_head, parts.embed)
    t_pre, t_dec, t_bat, t_chk = rows.time_head(head, run.info.hidden_size, dt, m,
                                                _extra_batches(run), tuple(run.chunks))
    peak = max(mx.get_peak_memory() - base, 0)
    return _row_from(t_pre, t_dec, name="head", kind="head", layer=None,
                     weight_bytes=int(wbytes),
                     activation_bytes_per_token=int(run.info.vocab_size * dt.size),
                     kv_bytes_per_token=0, peak_memory_bytes=int(peak), measured_from="head",
                     **_grid_fields(run, t_dec, t_bat, t_chk))


def _extra_batches(run: Run) -> tuple[int, ...]:
    return tuple(b for b in run.batches if b != 1)


def _grid_fields(run: Run, t_dec, t_bat, t_chk) -> dict[str, Any]:
    """Batch and chunk fields of a row whose decode does not depend on the context (embed,
    head): the batch timings (batch grid after 1) are reported at every context, as decode is."""
    out = grids.batch_fields([[t, *t_bat] for t in t_dec])
    if run.chunks:
        out.update(grids.chunk_fields(t_chk))
    return out


def _drop(container, attr: str, module) -> None:
    """Free a materialised module's arrays: replace it in the model by an empty module."""
    import mlx.nn as nn

    setattr(container, attr, nn.Module())
    del module
    mx.clear_cache()
