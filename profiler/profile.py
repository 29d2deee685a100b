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

from profiler import build, costtable, device, rows
from profiler.costtable import CostTable, LayerRow, ModelInfo
from profiler.errors import UserError
from profiler.models import ModelSpec, config_hash

DEFAULT_PREFILL = [16, 64]
DEFAULT_DECODE = [64, 256]


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


def check_grids(prefill: list[int], decode: list[int]) -> None:
    for name, g in (("--prefill-tokens", prefill), ("--decode-context", decode)):
        if not g or any((not isinstance(v, int)) or v <= 0 for v in g):
            raise UserError(f"{name} {g} must be positive integers, e.g. 16,64")
        if any(b <= a for a, b in zip(g, g[1:])):
            raise UserError(f"{name} {g} must be strictly increasing, e.g. 16,64")


def check_options(opts: ProfileOptions) -> None:
    """Reject impossible options with one line each, before anything is measured."""
    check_grids(opts.prefill_tokens, opts.decode_context)
    if opts.repeats < 1 or opts.warmup < 0 or opts.batch < 1:
        raise UserError("--repeats and --batch must be >= 1 and --warmup >= 0")
    if opts.bits not in ("auto", None, 0) and int(opts.bits) not in (2, 3, 4, 5, 6, 8):
        raise UserError(f"--bits {opts.bits} is not supported; use 2, 3, 4, 5, 6 or 8, or "
                        "--no-quant")
    if int(opts.group_size) not in (32, 64, 128):
        raise UserError(f"--group-size {opts.group_size} is not supported; use 32, 64 or 128")
    if opts.clock not in ("wall", "process"):
        raise UserError(f"--clock {opts.clock} is not known; use wall or process")
    if not opts.max_rel_spread > 0:
        raise UserError("--max-spread must be > 0, e.g. 0.15")


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


def _profile_model(spec: ModelSpec, opts: ProfileOptions | None, out_path,
                   progress=None) -> CostTable:
    """Measure every row of `spec` on this machine and write the cost table to `out_path`
    (atomically, after every row; complete=True at the end). Returns the table.

    `progress`: None, a `Progress` (e.g. report.ProgressBar), or a function taking event dicts
    (see CallbackProgress). Raises UserError for bad options or a mismatching table at
    `out_path`."""
    opts = opts or ProfileOptions()
    if progress is None:
        progress = Progress()
    elif not hasattr(progress, "row_done") and callable(progress):
        progress = CallbackProgress(progress)
    out_path = Path(out_path)
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
    dt = build.mx_dtype(dtype)
    generated = spec.source != "local"
    info = model_info(spec, args)
    info.n_layers = n_layers
    hidden_size = info.hidden_size
    method = rows.Method(prefill_tokens=list(opts.prefill_tokens),
                         decode_context=list(opts.decode_context), warmup=opts.warmup,
                         repeats=opts.repeats, max_rel_spread=opts.max_rel_spread,
                         max_rounds=opts.max_rounds, batch=opts.batch, seed=opts.seed,
                         clock=opts.clock, settle_s=opts.settle_s,
                         decode_min_sample_s=opts.decode_min_sample_s,
                         decode_max_steps=opts.decode_max_steps)

    chain_k = 1 if opts.every_layer else max(1, int(opts.chain_blocks))
    # Structure of every block, from the lazy skeleton (nothing is evaluated here).
    sigs = [build.structure(b, with_dtype=not generated) for b in parts.layers]
    counts = [build.param_count(b) for b in parts.layers]

    existing = None if opts.restart else _load_existing(out_path)
    resumed: dict[str, LayerRow] = {}
    if existing is not None:
        want = {"config_hash": info.config_hash, "dtype": dtype, "quantization": quant,
                "prefill_tokens": method.prefill_tokens, "decode_context": method.decode_context,
                "batch": opts.batch, "clock": opts.clock, "settle_s": float(opts.settle_s),
                "decode_max_steps": int(opts.decode_max_steps),
                "chain_blocks": chain_k}
        have = identity(existing)
        diff = [k for k, v in want.items() if have[k] != v]
        if not diff:
            here_host = device.describe(dtype, microbench=False)
            for k, v in (("host", here_host.host), ("device", here_host.name),
                         ("backend", here_host.backend)):
                if have[k] != v:
                    diff.append(k)
        if diff:
            k = diff[0]
            raise UserError(f"{out_path} holds a {'complete' if existing.complete else 'partial'}"
                            f" table of another run ({k}: {have.get(k)!r} there, "
                            f"{(want.get(k) if k in want else 'this machine')!r} now); use "
                            "--restart to overwrite it or --out for another file")
        if existing.complete and existing.n_layers == n_layers:
            progress.note(f"{out_path} is already complete for this model and these options; "
                          "nothing to measure (use --restart to measure again)")
            return existing
        resumed = {r.name: r for r in existing.rows}

    if existing is not None and resumed:
        dev = existing.device
        progress.note(f"resuming {out_path}: {len(resumed)} of {n_layers + 2} rows already "
                      "measured, skipping them")
    else:
        progress.note("measuring the device (memory bandwidth, matmul throughput)..."
                      if opts.microbench else "describing the device (microbenchmarks skipped)")
        dev = device.describe(dtype, microbench=opts.microbench)

    meth = {"warmup": opts.warmup, "repeats": opts.repeats, "statistic": "median",
            "max_rel_spread": opts.max_rel_spread, "max_rounds": opts.max_rounds,
            "remeasure": "a point whose spread exceeds max_rel_spread is measured again (up "
                         "to max_rounds rounds, the tightest kept) unless its round took "
                         "over 60 s",
            "batch": opts.batch, "every_layer": opts.every_layer,
            "weights": "generated (normal noise, right shapes and dtype)" if generated
            else f"real weights from {spec.path}",
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
            "chain_blocks": chain_k,
            "chain": "block decode is timed inside a chain of up to chain_blocks distinct "
                     "blocks of its structure (the next ones of the model, their own weights), "
                     "one graph, one evaluation, one pass per sample after the settle, as a "
                     "stage runs its blocks; the row holds the chain's time / k. Prefill: the "
                     "block alone. Peak memory: an untimed run of the block alone",
            "decode_min_sample_s": opts.decode_min_sample_s,
            "decode_max_steps": opts.decode_max_steps,
            "decode_steps": "block decode: when one step is shorter than decode_min_sample_s, "
                            "each timed sample runs up to decode_max_steps steps back to back "
                            "(the cache rewound between them, inside the clock) and records "
                            "their mean, as a stage runs its blocks back to back: a single "
                            "short step after an idle overruns a CPU quota by up to a tick "
                            "and repays it after the clock stops",
            "profiler": "profiler (mlx-measured-split)"}
    if existing is not None and resumed:
        meth = {**existing.method, **{k: v for k, v in meth.items() if k not in
                                      existing.method}}

    table = CostTable(model=info, dtype=dtype, quantization=quant, device=dev,
                      prefill_tokens=method.prefill_tokens, decode_context=method.decode_context,
                      rows=[], method=meth, complete=False,
                      created=existing.created if (existing and resumed) else "")

    order = ["embed"] + [f"layers.{i}" for i in range(n_layers)] + ["head"]
    done: dict[str, LayerRow] = {n: resumed[n] for n in order if n in resumed}

    def write() -> None:
        table.rows = [done[n] for n in order if n in done]
        table.method["peak_rss_bytes"] = max(device.peak_rss_bytes(),
                                             int(table.method.get("peak_rss_bytes", 0)))
        table.method["profile_wall_s"] = round(
            float(meth.get("_wall_before", 0.0)) + time.perf_counter() - started, 2)
        costtable.write_table(table, out_path)

    meth["_wall_before"] = float(meth.get("profile_wall_s", 0.0))

    # Which block measurement each block carries.
    measured_by_sig: dict[tuple, str] = {}
    for i in range(n_layers):
        r = done.get(f"layers.{i}")
        if r is not None and r.measured_from == r.name:
            measured_by_sig.setdefault(sigs[i], r.name)

    # Work units for the ETA: ~ parameters x tokens processed.
    tok_block = sum(method.prefill_tokens) + len(method.decode_context)
    tok_head = len(method.prefill_tokens) + 1
    head_params = (build.param_count(parts.lm_head) if parts.lm_head is not None
                   else build.param_count(parts.embed))
    embed_params = build.param_count(parts.embed)

    def units(name: str, i: int | None) -> float:
        # making weights real costs about as much as ~2 tokens of compute (measured on CPU)
        if name == "embed":
            return 2.0 * embed_params
        if name == "head":
            return head_params * (tok_head + 2)
        return counts[i] * (tok_block + 2)

    plan_sigs: set = set(measured_by_sig)
    total = 0.0
    for i, name in enumerate(order):
        li = i - 1 if name.startswith("layers.") else None
        if name in done:
            continue
        if li is not None and not opts.every_layer:
            if sigs[li] in plan_sigs:
                continue
            plan_sigs.add(sigs[li])
        total += units(name, li)
    progress.start(total, len(order) - len(done))

    # One row must fit: refuse up front rather than swap (estimate: parameters x bytes each).
    per_param = (quant["bits"] / 8 + 2 * dt.size / quant["group_size"]) if quant else dt.size
    biggest = max(counts + [embed_params, head_params]) * per_param
    if biggest > dev.memory_usable_bytes > 0:
        raise UserError(f"the largest layer of {spec.name} needs about {biggest / 2**30:.1f} GiB "
                        f"in {dtype}{' ' + str(quant['bits']) + '-bit' if quant else ''}, but "
                        f"only {dev.memory_usable_bytes / 2**30:.1f} GiB is usable here; "
                        "quantize (--bits 4) or use a smaller dtype")

    x1 = rows.hidden(opts.batch, 1, hidden_size, dt, seed=opts.seed + 3)
    rows.flush_caches()  # allocate the flush buffer now, outside every row's peak memory
    template_caches = _template_caches(model, n_layers)
    act_bytes = hidden_size * dt.size

    for name in order:
        if name in done:
            continue
        progress.row_started(name)
        if name == "embed":
            row = _measure_embed(parts, generated, dt, quant, info, method, act_bytes)
            done[name] = row
            write()
            progress.row_done(name, units(name, None), True)
            continue
        if name == "head":
            row = _measure_head(parts, generated, dt, quant, info, method)
            done[name] = row
            write()
            progress.row_done(name, units(name, None), True)
            continue
        i = int(name.split(".")[1])
        source = None if opts.every_layer else measured_by_sig.get(sigs[i])
        if source is not None:
            ref = done[source]
            done[name] = replace(ref, name=name, layer=i, measured_from=source)
            build.release(parts, i)
            write()
            progress.row_done(name, 0.0, False)
            continue
        block = parts.layers[i]
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        build.materialise(block, generated=generated, dtype=dt, quant=quant,
                          seed=opts.seed + 1000 + i)
        mx.reset_peak_memory()  # peak while running (weights included), not while generating
        wbytes = build.param_bytes(block)
        kvb = rows.kv_bytes_per_token(block, template_caches[i], x1)
        rows.peak_pass(block, template_caches[i], hidden_size, dt, method)
        peak = max(mx.get_peak_memory() - base, 0)
        members = _chain_members(i, sigs, done, chain_k, wbytes, dev.memory_usable_bytes)
        for j in members[1:]:
            build.materialise(parts.layers[j], generated=generated, dtype=dt, quant=quant,
                              seed=opts.seed + 1000 + j)
        t_pre, t_dec = rows.time_chain([parts.layers[j] for j in members],
                                       [template_caches[j] for j in members], hidden_size, dt,
                                       method)
        done[name] = _row_from(t_pre, t_dec, name=name, kind="block", layer=i,
                               weight_bytes=int(wbytes), activation_bytes_per_token=act_bytes,
                               kv_bytes_per_token=kvb, peak_memory_bytes=int(peak),
                               measured_from=name)
        measured_by_sig.setdefault(sigs[i], name)
        del block
        for j in members[1:]:
            build.release(parts, j)
        build.release(parts, i)
        write()
        progress.row_done(name, units(name, i), True)

    table.complete = True
    table.method.pop("_wall_before", None)
    try:
        table.method["load_average_at_end"] = round(__import__("os").getloadavg()[0], 2)
    except OSError:
        pass
    note = device.load_note()
    if note:
        progress.note(note)
    write()
    progress.finish()
    return table


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


def _measure_embed(parts: build.Parts, generated: bool, dt, quant, info: ModelInfo,
                   method: rows.Method, act_bytes: int) -> LayerRow:
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    parts.set_embed(build.materialise(parts.embed, generated=generated, dtype=dt, quant=quant,
                                      seed=method.seed + 10))
    parts.embed_ready = True
    mx.reset_peak_memory()
    wbytes = build.param_bytes(parts.embed)
    t_pre, t_dec = rows.time_embed(parts.embed, info.vocab_size, method)
    peak = max(mx.get_peak_memory() - base, 0)
    row = _row_from(t_pre, t_dec, name="embed", kind="embed", layer=None,
                    weight_bytes=int(wbytes), activation_bytes_per_token=act_bytes,
                    kv_bytes_per_token=0, peak_memory_bytes=int(peak), measured_from="embed")
    if not parts.tied:  # a tied head needs the matrix again: keep it until the head is done
        _drop(parts.container, "embed_tokens", parts.embed)
        parts.embed = None
    return row


def _measure_head(parts: build.Parts, generated: bool, dt, quant, info: ModelInfo,
                  method: rows.Method) -> LayerRow:
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    parts.container.norm = parts.norm = build.materialise(
        parts.norm, generated=generated, dtype=dt, quant=None, seed=method.seed + 20)
    if parts.lm_head is not None:
        parts.set_head(build.materialise(parts.lm_head, generated=generated, dtype=dt,
                                         quant=quant, seed=method.seed + 21))
        wbytes = build.param_bytes(parts.norm) + build.param_bytes(parts.lm_head)
    else:
        # tied: the embedding matrix is the head (materialised by the embed row, or again
        # here after a resume)
        if not getattr(parts, "embed_ready", False):
            parts.set_embed(build.materialise(parts.embed, generated=generated, dtype=dt,
                                              quant=quant, seed=method.seed + 10))
        wbytes = build.param_bytes(parts.norm)
    mx.reset_peak_memory()
    head = rows.head_fn(parts.norm, parts.lm_head, parts.embed)
    t_pre, t_dec = rows.time_head(head, info.hidden_size, dt, method)
    peak = max(mx.get_peak_memory() - base, 0)
    logits_bytes = info.vocab_size * dt.size
    return _row_from(t_pre, t_dec, name="head", kind="head", layer=None,
                     weight_bytes=int(wbytes), activation_bytes_per_token=int(logits_bytes),
                     kv_bytes_per_token=0, peak_memory_bytes=int(peak), measured_from="head")


def _drop(container, attr: str, module) -> None:
    """Free a materialised module's arrays: replace it in the model by an empty module."""
    import mlx.nn as nn

    setattr(container, attr, nn.Module())
    del module
    mx.clear_cache()
