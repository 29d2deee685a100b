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
    prefill_tokens = prefill_tokens or table.prefill_tokens
    decode_context = decode_context or table.decode_context
    m = table.method
    dt = build.mx_dtype(table.dtype)
    quant = table.quantization
    generated = spec.source != "local"
    if progress is not None:
        progress.note(f"self-check: running {spec.name} end to end ({fmt_bytes(need)} of "
                      "weights)...")

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
    head = rows.head_fn(parts.norm, parts.lm_head, parts.embed)
    templates = (list(model.make_cache()) if hasattr(model, "make_cache") else None)
    if templates is None:
        from mlx_lm.models.cache import KVCache

        templates = [KVCache() for _ in range(n)]
    from mlx_lm.models.base import create_attention_mask

    def forward(ids, caches):
        h = parts.embed(ids)
        mask = create_attention_mask(h, caches[0])
        for layer, c in zip(parts.layers, caches):
            h = layer(h, mask, c)
        return head(h)

    flush = bool(m.get("flush_caches", True))
    clock = m.get("clock", "wall")
    settle_s = float(m.get("settle_s", 0.0))  # as the table was measured (measure.time_fn)
    warmup = max(2, int(m.get("warmup", 1)))
    repeats = int(repeats) if repeats else max(5, int(m.get("repeats", 3)))
    batch = int(m.get("batch", 1))
    vocab = table.model.vocab_size
    hidden_size = table.model.hidden_size
    res = SelfCheckResult(model=spec.name, weight_bytes=need)
    measured_blocks = sorted({int(r.measured_from.split(".")[1]) for r in table.rows
                              if r.kind == "block"})
    # each measured block re-timed as the table timed it: inside a chain of up to
    # method.chain_blocks blocks that carry its measurement (1: alone, older tables)
    chain_k = max(1, int(m.get("chain_blocks", 1)))
    chains = {i: [j for j, r in enumerate(r for r in table.rows if r.kind == "block")
                  if r.measured_from == f"layers.{i}" and j >= i][:chain_k]
              for i in measured_blocks}
    per: dict[str, int] = {}  # what a re-timed row's sample is divided by (chain length)

    # correctness: the hand chain is the model's own forward
    ids = mx.random.randint(0, vocab, (batch, min(prefill_tokens)), key=mx.random.key(5))
    ours = forward(ids, [copy.deepcopy(t) for t in templates])
    theirs = model(ids)[:, -1:, :]
    res.chain_max_abs_diff = float(mx.max(mx.abs(ours.astype(mx.float32)
                                                 - theirs.astype(mx.float32))).item())

    def paired(fns):
        """Time the end-to-end run and the measured rows in turn, `repeats` times, so that
        both see the same machine (medians; the e2e spread too)."""
        samples = {k: [] for k in fns}
        for rep in range(warmup + repeats):
            for k, (fn, setup) in fns.items():
                if setup is not None:
                    setup()
                if flush:
                    rows.flush_caches()
                mx.synchronize()
                if settle_s > 0:
                    time.sleep(settle_s)
                t0 = now()
                fn()
                mx.synchronize()
                if rep >= warmup:
                    samples[k].append((now() - t0) / per.get(k, 1))
        med = {k: statistics.median(v) for k, v in samples.items()}
        e2e = samples["e2e"]
        last[:] = [samples]
        return med, (max(e2e) - min(e2e)) / med["e2e"] if med["e2e"] else 0.0

    last: list = []

    def point(phase, x, predicted, med, spread):
        s = last[0]
        names = [r.measured_from for r in table.rows]
        now = [sum(s[nm][i] for nm in names) for i in range(len(s["e2e"]))]
        return CheckPoint(phase, x, predicted, med["e2e"], spread,
                          sum(med[nm] for nm in names), list(s["e2e"]), now)

    now = time.process_time if clock == "process" else time.perf_counter

    def table_sum(kind, k, x):
        if kind == "prefill":
            return (sum(r.prefill_s[k] for r in table.rows) if k is not None else
                    sum(table.prefill_time(r, x) for r in table.rows))
        return (sum(r.decode_s[k] for r in table.rows) if k is not None else
                sum(table.decode_time(r, x) for r in table.rows))

    for j, p in enumerate(prefill_tokens):
        ids = mx.random.randint(0, vocab, (batch, p), key=mx.random.key(30 + j))
        xp = rows.hidden(batch, p, hidden_size, dt, seed=40 + j)
        mx.eval(ids)

        def run(ids=ids):
            caches = [copy.deepcopy(t) for t in templates]
            out = forward(ids, caches)
            mx.eval(out, *[a for c in caches for a in rows.cache_arrays(c)])

        per.clear()  # prefill: each block alone (rows.time_chain)

        def block_run(i, xp=xp):
            def fn():
                cs = [copy.deepcopy(templates[i])]
                y, mask = xp, create_attention_mask(xp, cs[0])
                for j, c in zip([i], cs):
                    y = parts.layers[j](y, mask, c)
                mx.eval(y, *[a for c in cs for a in rows.cache_arrays(c)])
            return fn

        fns = {"e2e": (run, None), "embed": (lambda ids=ids: mx.eval(parts.embed(ids)), None),
               "head": (lambda xp=xp: mx.eval(head(xp)), None)}
        for i in measured_blocks:
            fns[f"layers.{i}"] = (block_run(i), None)
        med, spread = paired(fns)
        k = table.prefill_tokens.index(p) if p in table.prefill_tokens else None
        res.points.append(point("prefill", p, table_sum("prefill", k, p), med, spread))

    x1 = rows.hidden(batch, 1, hidden_size, dt, seed=9)
    ids1 = mx.random.randint(0, vocab, (batch, 1), key=mx.random.key(77))
    for j, c in enumerate(decode_context):
        caches = [rows.fill_cache(parts.layers[i], templates[i], c, x1, seed=300 + i)
                  for i in range(n)]

        def step(caches=caches):
            out = forward(ids1, caches)
            mx.eval(out, *[a for cc in caches for a in rows.cache_arrays(cc)])

        def rewind(caches=caches, c=c):
            for cc in caches:
                rows.rewind(cc, c)

        def block_step(i, caches=caches, c=c):
            def fn():
                y, mask = x1, create_attention_mask(x1, caches[chains[i][0]])
                for j in chains[i]:
                    y = parts.layers[j](y, mask, caches[j])
                mx.eval(y, *[a for j in chains[i] for a in rows.cache_arrays(caches[j])])

            def setup():
                for j in chains[i]:
                    rows.rewind(caches[j], c)
            return fn, setup

        per.update({f"layers.{i}": len(js) for i, js in chains.items()})
        fns = {"e2e": (step, rewind), "embed": (lambda: mx.eval(parts.embed(ids1)), None),
               "head": (lambda: mx.eval(head(x1)), None)}
        for i in measured_blocks:
            fns[f"layers.{i}"] = block_step(i)
        med, spread = paired(fns)
        k = table.decode_context.index(c) if c in table.decode_context else None
        res.points.append(point("decode", c, table_sum("decode", k, c), med, spread))
        del caches
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
