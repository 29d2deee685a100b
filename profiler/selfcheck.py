"""Self-check: run the whole model end to end and compare with the sum of the table's rows.

The whole model (embed -> every block -> final norm -> LM head on the last position, the same
dtype and quantization as the table) is materialised - only where it fits in usable memory -
and timed exactly as the rows were: prefill of P tokens into empty caches, and one decode step
with every block's KV cache filled to C tokens. Predicted is the sum of the rows' measured
times (derived); measured is the end-to-end time. The rows are also re-timed in turn with
the end-to-end runs, as the table timed them (block decode inside a chain of the blocks that
carry its measurement, up to `method.chain_blocks`; prefill, embed and head alone), so both
see the same machine state; every sample is kept (`CheckPoint.measured_samples`,
`now_samples`) for the spread.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import mlx.core as mx

from profiler import build, rows
from profiler.costtable import CostTable
from profiler.errors import UserError
from profiler.models import ModelSpec
from profiler.report import fmt_bytes


@dataclass
class CheckPoint:
    phase: str  # prefill | decode
    x: int  # prompt tokens or context
    predicted_s: float  # sum of rows (derived)
    measured_s: float  # end to end (measured)
    spread: float
    predicted_now_s: float = 0.0  # sum of the rows re-timed alongside the end-to-end runs
    measured_samples: list[float] = field(default_factory=list)  # every end-to-end run (s)
    now_samples: list[float] = field(default_factory=list)  # rows re-timed, summed, per repeat

    @property
    def error_now(self) -> float:
        """(rows re-timed now - measured) / measured: the decomposition itself, free of the
        machine's drift between the profile and the check."""
        return ((self.predicted_now_s - self.measured_s) / self.measured_s
                if self.measured_s and self.predicted_now_s else 0.0)

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_s - self.measured_s) / self.measured_s if self.measured_s else 0.0


@dataclass
class SelfCheckResult:
    model: str
    points: list[CheckPoint] = field(default_factory=list)
    chain_max_abs_diff: float | None = None  # hand chain vs mlx-lm's own forward (logits)
    weight_bytes: int = 0

    @property
    def max_abs_error(self) -> float:
        return max((abs(p.error) for p in self.points), default=0.0)

    @property
    def max_abs_error_now(self) -> float:
        return max((abs(p.error_now) for p in self.points), default=0.0)


def model_bytes(table: CostTable) -> int:
    return sum(r.weight_bytes for r in table.rows)


@dataclass
class _Whole:
    """The whole model materialised as the table measured it, run as a hand chain."""
    model: object
    parts: object
    head: object
    templates: list  # one empty KV cache per block, deep-copied per run
    mask: object  # mlx_lm.models.base.create_attention_mask

    def forward(self, ids, caches):
        h = self.parts.embed(ids)
        mask = self.mask(h, caches[0])
        for layer, c in zip(self.parts.layers, caches):
            h = layer(h, mask, c)
        return self.head(h)


def _build_whole(spec: ModelSpec, table: CostTable) -> _Whole:
    """Every row materialised with the seeds, dtype and quantization the profile used."""
    dt = build.mx_dtype(table.dtype)
    quant = table.quantization
    generated = spec.source != "local"
    model = build.skeleton(spec)
    parts = build.model_parts(model)
    n = len(parts.layers)
    for i in range(n):
        parts.layers[i] = build.materialise(parts.layers[i], generated=generated, dtype=dt,
                                            quant=quant, seed=1000 + i)
    parts.set_embed(build.materialise(parts.embed, generated=generated, dtype=dt, quant=quant,
                                      seed=10))
    parts.container.norm = parts.norm = build.materialise(parts.norm, generated=generated,
                                                          dtype=dt, quant=None, seed=20)
    if parts.lm_head is not None:
        parts.set_head(build.materialise(parts.lm_head, generated=generated, dtype=dt,
                                         quant=quant, seed=21))
    templates = (list(model.make_cache()) if hasattr(model, "make_cache") else None)
    if templates is None:
        from mlx_lm.models.cache import KVCache

        templates = [KVCache() for _ in range(n)]
    from mlx_lm.models.base import create_attention_mask

    return _Whole(model, parts, rows.head_fn(parts.norm, parts.lm_head, parts.embed),
                  templates, create_attention_mask)


@dataclass
class _Timing:
    """How the table was timed (its `method`), so the check times the same way."""
    flush: bool
    now: object  # the clock
    settle_s: float
    warmup: int
    repeats: int
    batch: int

    @classmethod
    def of(cls, table: CostTable, repeats: int | None) -> "_Timing":
        m = table.method
        return cls(flush=bool(m.get("flush_caches", True)),
                   now=time.process_time if m.get("clock", "wall") == "process"
                   else time.perf_counter,
                   settle_s=float(m.get("settle_s", 0.0)),  # as measure.time_fn
                   warmup=max(2, int(m.get("warmup", 1))),
                   repeats=int(repeats) if repeats else max(5, int(m.get("repeats", 3))),
                   batch=int(m.get("batch", 1)))


def _paired(fns: dict, tm: _Timing, per: dict[str, int]):
    """Time the end-to-end run and the measured rows in turn, `tm.repeats` times, so that both
    see the same machine. `fns`: name -> (fn, setup or None); `per`: what a name's sample is
    divided by (its chain length). Returns (medians, e2e spread, every sample)."""
    samples = {k: [] for k in fns}
    for rep in range(tm.warmup + tm.repeats):
        for k, (fn, setup) in fns.items():
            if setup is not None:
                setup()
            if tm.flush:
                rows.flush_caches()
            mx.synchronize()
            if tm.settle_s > 0:
                time.sleep(tm.settle_s)
            t0 = tm.now()
            fn()
            mx.synchronize()
            if rep >= tm.warmup:
                samples[k].append((tm.now() - t0) / per.get(k, 1))
    med = {k: statistics.median(v) for k, v in samples.items()}
    e2e = samples["e2e"]
    return med, (max(e2e) - min(e2e)) / med["e2e"] if med["e2e"] else 0.0, samples


def _point(table: CostTable, phase: str, x: int, fns: dict, tm: _Timing,
           per: dict[str, int]) -> CheckPoint:
    """One grid point: the rows' sum from the table (derived) against the end-to-end time and
    the rows re-timed now (measured)."""
    med, spread, s = _paired(fns, tm, per)
    grid = table.prefill_tokens if phase == "prefill" else table.decode_context
    k = grid.index(x) if x in grid else None
    if phase == "prefill":
        predicted = (sum(r.prefill_s[k] for r in table.rows) if k is not None else
                     sum(table.prefill_time(r, x) for r in table.rows))
    else:
        predicted = (sum(r.decode_s[k] for r in table.rows) if k is not None else
                     sum(table.decode_time(r, x) for r in table.rows))
    names = [r.measured_from for r in table.rows]
    now = [sum(s[nm][i] for nm in names) for i in range(len(s["e2e"]))]
    return CheckPoint(phase, x, predicted, med["e2e"], spread,
                      sum(med[nm] for nm in names), list(s["e2e"]), now)


def _prefill_point(w: _Whole, table: CostTable, tm: _Timing, j: int, p: int,
                   chains: dict[int, list[int]]) -> CheckPoint:
    """Prefill of `p` tokens into empty caches; each measured block re-timed as the table
    timed it: in the first n of its chain, n = method.prefill_chain_blocks (1: alone)."""
    lengths = table.method.get("prefill_chain_blocks", {})
    dt = build.mx_dtype(table.dtype)
    ids = mx.random.randint(0, table.model.vocab_size, (tm.batch, p), key=mx.random.key(30 + j))
    xp = rows.hidden(tm.batch, p, table.model.hidden_size, dt, seed=40 + j)
    mx.eval(ids)

    def run():
        caches = [copy.deepcopy(t) for t in w.templates]
        out = w.forward(ids, caches)
        mx.eval(out, *[a for c in caches for a in rows.cache_arrays(c)])

    def block_run(js):
        def fn():
            rows.chain_pass([w.parts.layers[i] for i in js], xp,
                            [copy.deepcopy(w.templates[i]) for i in js])
        return fn

    grid = list(table.prefill_tokens)  # the table's chain length at p, or at the nearest P
    g = grid.index(p) if p in grid else min(range(len(grid)), key=lambda k: abs(grid[k] - p))
    pre = {i: chain[:max(1, int(lengths.get(f"layers.{i}", [1] * len(grid))[g]))]
           for i, chain in chains.items()}

    fns = {"e2e": (run, None), "embed": (lambda: mx.eval(w.parts.embed(ids)), None),
           "head": (lambda: mx.eval(w.head(xp)), None)}
    for i, js in pre.items():
        fns[f"layers.{i}"] = (block_run(js), None)
    return _point(table, "prefill", p, fns, tm, {f"layers.{i}": len(js)
                                                 for i, js in pre.items()})


def _decode_point(w: _Whole, table: CostTable, tm: _Timing, c: int,
                  chains: dict[int, list[int]]) -> CheckPoint:
    """One decode step with every cache filled to `c`; each measured block re-timed inside
    its chain (rows.time_chain)."""
    dt = build.mx_dtype(table.dtype)
    x1 = rows.hidden(tm.batch, 1, table.model.hidden_size, dt, seed=9)
    ids1 = mx.random.randint(0, table.model.vocab_size, (tm.batch, 1), key=mx.random.key(77))
    caches = [rows.fill_cache(w.parts.layers[i], w.templates[i], c, x1, seed=300 + i)
              for i in range(len(w.parts.layers))]

    def step():
        out = w.forward(ids1, caches)
        mx.eval(out, *[a for cc in caches for a in rows.cache_arrays(cc)])

    def rewind():
        for cc in caches:
            rows.rewind(cc, c)

    def block_step(i):
        def fn():
            rows.chain_pass([w.parts.layers[j] for j in chains[i]], x1,
                            [caches[j] for j in chains[i]])

        def setup():
            for j in chains[i]:
                rows.rewind(caches[j], c)
        return fn, setup

    fns = {"e2e": (step, rewind), "embed": (lambda: mx.eval(w.parts.embed(ids1)), None),
           "head": (lambda: mx.eval(w.head(x1)), None)}
    for i in chains:
        fns[f"layers.{i}"] = block_step(i)
    return _point(table, "decode", c, fns, tm, {f"layers.{i}": len(js)
                                                for i, js in chains.items()})


def self_check(spec: ModelSpec, table: CostTable, progress=None, prefill_tokens=None,
               decode_context=None, memory_fraction: float = 0.6,
               repeats: int | None = None) -> SelfCheckResult:
    """Run the whole model and compare with the table (see the module docstring).
    `repeats`: end-to-end runs per grid point (default max(5, the table's repeats))."""
    need = model_bytes(table)
    usable = table.device.memory_usable_bytes
    if need > memory_fraction * usable:
        raise UserError(f"self-check needs the whole model in memory ({fmt_bytes(need)}) but "
                        f"only {fmt_bytes(usable)} is usable here; the cost table is written, "
                        "run the self-check on a smaller model")
    if progress is not None:
        progress.note(f"self-check: running {spec.name} end to end ({fmt_bytes(need)} of "
                      "weights)...")
    w = _build_whole(spec, table)
    tm = _Timing.of(table, repeats)
    res = SelfCheckResult(model=spec.name, weight_bytes=need)
    # correctness: the hand chain is the model's own forward
    ids = mx.random.randint(0, table.model.vocab_size,
                            (tm.batch, min(prefill_tokens or table.prefill_tokens)),
                            key=mx.random.key(5))
    ours = w.forward(ids, [copy.deepcopy(t) for t in w.templates])
    theirs = w.model(ids)[:, -1:, :]
    res.chain_max_abs_diff = float(mx.max(mx.abs(ours.astype(mx.float32)
                                                 - theirs.astype(mx.float32))).item())
    measured_blocks = sorted({int(r.measured_from.split(".")[1]) for r in table.rows
                              if r.kind == "block"})
    # each measured block re-timed as the table timed it: inside a chain of up to
    # method.chain_blocks blocks that carry its measurement (1: alone, older tables)
    chain_k = max(1, int(table.method.get("chain_blocks", 1)))
    blocks = [r for r in table.rows if r.kind == "block"]
    chains = {i: [j for j, r in enumerate(blocks)
                  if r.measured_from == f"layers.{i}" and j >= i][:chain_k]
              for i in measured_blocks}
    for j, p in enumerate(prefill_tokens or table.prefill_tokens):
        res.points.append(_prefill_point(w, table, tm, j, p, chains))
    for c in decode_context or table.decode_context:
        res.points.append(_decode_point(w, table, tm, c, chains))
    return res


def format_result(res: SelfCheckResult) -> str:
    lines = [f"self-check {res.model}: whole model end to end vs the sum of the table's rows",
             f"{'phase':<8} {'tokens':>7} {'predicted ms':>13} {'measured ms':>12} "
             f"{'error':>8} {'rows now ms':>12} {'error':>8}",
             f"{'':<8} {'':>7} {'(table, sum)':>13} {'(end to end)':>12} {'(derived)':>8} "
             f"{'(sum)':>12} {'(derived)':>8}"]
    for p in res.points:
        lines.append(f"{p.phase:<8} {p.x:>7} {p.predicted_s * 1e3:>13.2f} "
                     f"{p.measured_s * 1e3:>12.2f} {100 * p.error:>+7.1f}% "
                     f"{p.predicted_now_s * 1e3:>12.2f} {100 * p.error_now:>+7.1f}%")
    lines.append("predicted: sum of the table's rows (derived from measurements); rows now: "
                 "the same rows re-timed in turn with the end-to-end runs, summed (derived), "
                 "which checks the layer decomposition itself on the same machine state")
    if res.chain_max_abs_diff is not None:
        lines.append(f"layer chain vs mlx-lm's own forward: max |logit diff| "
                     f"{res.chain_max_abs_diff:.3g}")
    verdict = "agree within 10%" if res.max_abs_error <= 0.10 else \
        f"differ by up to {100 * res.max_abs_error:.1f}%"
    verdict_now = "within 10%" if res.max_abs_error_now <= 0.10 else \
        f"up to {100 * res.max_abs_error_now:.1f}% off"
    lines.append(f"table predictions and measured time {verdict}; rows re-timed now: "
                 f"{verdict_now}")
    from profiler.device import load_note

    note = load_note()
    if note:
        lines.append(note)
    return "\n".join(lines)
