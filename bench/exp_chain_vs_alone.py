#!/usr/bin/env python
"""Experiment: one block timed alone (the profiler's rows) against a chain of distinct blocks
(what a pipeline stage and the whole model run), as a plain process and under a CPU quota.

    python bench/exp_chain_vs_alone.py --model qwen2.5-0.5b --blocks 8
    sudo python bench/exp_chain_vs_alone.py --model bench-llama --blocks 8 --cpu 0.5

`k` distinct blocks of the model are made real (generated weights, the profiler's dtype and
quantization). Every round times each mode once, in turn, so all modes see the same machine
state; medians over the rounds, with the spread (max - min) / median beside them. Modes:

* `rows`        each block as the profiler times it (rows.py): untimed cache rewind + 64 MiB
                cache flush, the settle idle (auto: 20 ms under a quota), then for decode up to
                8 steps of the SAME block back to back (the mean per step); summed over blocks
* `rows-1step`  the same with one step per sample (no back-to-back steps)
* `chain`       the k distinct blocks as one graph, one mx.eval (how a stage and the whole model
                run), after the same rewind + flush + settle
* `chain-evals` the k distinct blocks back to back, one mx.eval per block, one clock
* `chain-N`     the first N distinct blocks as one graph (per block: / N)
* `chain-x2`    (decode) the chain twice back to back per sample, the mean per pass
* `same-block`  block 0 k times (k caches) in one graph: one weight set re-read k times

Per mode: wall ms per block, process-CPU ms per block, and under a quota the throttled ms per
block (cgroup v1 cpu.stat throttled_time). --cpu F runs the measurement in a cgroup v1 CPU
group `/sys/fs/cgroup/cpu/fidexp-<pid>` with the testbed's period / quota for F cores and its cpu.shares (root);
the group is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_testbed import MODEL_CONFIG as BENCH_LLAMA  # noqa: E402 (the testbed's model)
CG = Path("/sys/fs/cgroup/cpu")


@contextlib.contextmanager
def cpu_group(cpu: float, tag: str):
    """A fresh cgroup v1 CPU group with the testbed's period / quota for `cpu` of a core
    (exo_bridge.testbed.spec.cfs_period_quota) and its cpu.shares (other work yields to it);
    removed afterwards. Root only."""
    from exo_bridge.testbed.spec import cfs_period_quota

    cg = CG / f"{tag}-{os.getpid()}-{int(cpu * 1000)}"
    cg.mkdir()
    try:
        period, quota = cfs_period_quota(cpu)
        (cg / "cpu.cfs_period_us").write_text(str(period))
        (cg / "cpu.cfs_quota_us").write_text(str(quota))
        (cg / "cpu.shares").write_text("100000")
        print(f"cgroup {cg}: period {period} us, quota {quota} us ({cpu} core)", flush=True)
        yield cg
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def in_group(cg: Path, argv: list[str]) -> list[str]:
    """`argv` (this interpreter and a script) as a command that first joins the group `cg`."""
    return ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$0" "$@"', sys.executable, *argv]


def in_cgroup(args) -> int:
    """Re-run this script inside a fresh CPU cgroup; remove the group afterwards."""
    with cpu_group(args.cpu, "fidexp") as cg:
        argv = [a for a in sys.argv[1:]]
        i = argv.index("--cpu")
        del argv[i:i + 2]
        return subprocess.call(in_group(cg, [__file__, *argv, "--cgroup", str(cg)]))


def throttled_ns(cgroup: str | None) -> int:
    if not cgroup:
        return 0
    for line in (Path(cgroup) / "cpu.stat").read_text().splitlines():
        k, v = line.split()
        if k == "throttled_time":
            return int(v)
    return 0


def build_blocks(name: str, k: int):
    import mlx.core as mx

    from profiler import build, device
    from profiler.models import resolve_model
    from profiler.profile import ProfileOptions, resolve_precision

    if name == "bench-llama":
        d = Path(tempfile.mkdtemp())
        (d / "config.json").write_text(json.dumps(BENCH_LLAMA))
        spec = resolve_model(str(d / "config.json"))
        dtype, quant = "float32", None  # as the testbed's model directory is stored
    else:
        spec = resolve_model(name)
        dtype, quant = resolve_precision(spec, ProfileOptions(), device.backend())
    model = build.skeleton(spec)
    parts = build.model_parts(model)
    dt = build.mx_dtype(dtype)
    blocks = [build.materialise(parts.layers[i], generated=True, dtype=dt, quant=quant,
                                seed=1000 + i) for i in range(k)]
    templates = list(model.make_cache()) if hasattr(model, "make_cache") else None
    if templates is None:
        from mlx_lm.models.cache import KVCache
        templates = [KVCache() for _ in range(k)]
    mx.eval([b.parameters() for b in blocks])
    return spec, dtype, quant, dt, int(spec.config["hidden_size"]), blocks, templates[:k]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b", help="built-in name or bench-llama")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--context", type=int, default=64, help="decode context")
    ap.add_argument("--prefill", type=int, default=16, help="prefill tokens (0: skip)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--cpu", type=float, default=0.0, help="run under this CPU quota (root)")
    ap.add_argument("--settle-ms", type=float, default=None, help="default: the profiler's")
    ap.add_argument("--modes", default="rows,rows-1step,chain,chain-evals,same-block")
    ap.add_argument("--no-flush", action="store_true", help="no cache flush before samples")
    ap.add_argument("--cgroup", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu > 0:
        return in_cgroup(args)

    import mlx.core as mx
    from mlx_lm.models.base import create_attention_mask

    from profiler import device, rows
    from profiler.profile import SETTLE_UNDER_QUOTA_S

    quota = device.cpu_quota_cores()
    settle = (args.settle_ms / 1e3 if args.settle_ms is not None else
              (SETTLE_UNDER_QUOTA_S if quota else 0.0))
    k = args.blocks
    spec, dtype, quant, dt, H, blocks, templates = build_blocks(args.model, k)
    print(f"{spec.name}: {k} distinct blocks, {dtype}"
          f"{' ' + str(quant['bits']) + '-bit' if quant else ''}, quota "
          f"{quota or 'none'}, settle {settle * 1e3:.0f} ms, flush {not args.no_flush}, {args.rounds} rounds, load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    modes = args.modes.split(",")
    x1 = rows.hidden(1, 1, H, dt, seed=101)
    C = args.context
    caches = [rows.fill_cache(b, t, C, x1, seed=200 + i) for i, (b, t) in
              enumerate(zip(blocks, templates))]
    same = [rows.fill_cache(blocks[0], templates[0], C, x1, seed=200) for _ in range(k)]

    def rewind_all(cs):
        for c in cs:
            rows.rewind(c, C)

    def sample(fn, setup, inner=1, between=None):
        """One timed sample as measure.time_fn takes it: setup + flush untimed, settle, clock."""
        setup()
        if not args.no_flush:
            rows.flush_caches()
        mx.synchronize()
        if settle > 0:
            time.sleep(settle)
        th0 = throttled_ns(args.cgroup)
        c0, t0 = time.process_time(), time.perf_counter()
        for j in range(inner):
            if j and between:
                between()
            fn()
        mx.synchronize()
        t1, c1 = time.perf_counter(), time.process_time()
        return (t1 - t0) / inner, (c1 - c0) / inner, (throttled_ns(args.cgroup) - th0) / 1e9 / inner

    def dec_step(b, c):
        def f():
            y = b(x1, create_attention_mask(x1, c), c)
            mx.eval(y, *rows.cache_arrays(c))
        return f

    def dec_chain(cs, bs, per_eval):
        def f():
            h = x1
            for b, c in zip(bs, cs):
                h = b(h, None, c)
                if per_eval:
                    mx.eval(h, *rows.cache_arrays(c))
            mx.eval(h, *[a for c in cs for a in rows.cache_arrays(c)])
        return f

    xp = rows.hidden(1, args.prefill, H, dt, seed=7) if args.prefill else None

    def pre_block(b, t):
        def f():
            c = copy.deepcopy(t)
            y = b(xp, create_attention_mask(xp, c), c)
            mx.eval(y, *rows.cache_arrays(c))
        return f

    def pre_chain(bs, ts, per_eval):
        def f():
            cs = [copy.deepcopy(t) for t in ts]
            h = xp
            mask = create_attention_mask(xp, cs[0])
            for b, c in zip(bs, cs):
                h = b(h, mask, c)
                if per_eval:
                    mx.eval(h, *rows.cache_arrays(c))
            mx.eval(h, *[a for c in cs for a in rows.cache_arrays(c)])
        return f

    def one_round(phase):
        out = {}
        if phase == "decode":
            if "rows" in modes:  # the profiler's method: up to 8 steps back to back
                s = [sample(dec_step(b, c), lambda c=c: rows.rewind(c, C), 8,
                            lambda c=c: rows.rewind(c, C)) for b, c in zip(blocks, caches)]
                out["rows"] = tuple(sum(v) for v in zip(*s))
            if "rows-1step" in modes:
                s = [sample(dec_step(b, c), lambda c=c: rows.rewind(c, C))
                     for b, c in zip(blocks, caches)]
                out["rows-1step"] = tuple(sum(v) for v in zip(*s))
            if "chain" in modes:
                out["chain"] = sample(dec_chain(caches, blocks, False),
                                      lambda: rewind_all(caches))
            for m in modes:  # chain-N: the first N blocks as one graph, scaled to k blocks
                if m.startswith("chain-") and m[6:].isdigit():
                    n = int(m[6:])
                    w, c, t = sample(dec_chain(caches[:n], blocks[:n], False),
                                     lambda n=n: rewind_all(caches[:n]))
                    out[m] = (w * k / n, c * k / n, t * k / n)
            if "chain-x2" in modes:  # the chain twice back to back (rewound between)
                out["chain-x2"] = sample(dec_chain(caches, blocks, False),
                                         lambda: rewind_all(caches), 2,
                                         lambda: rewind_all(caches))
            if "chain-evals" in modes:
                out["chain-evals"] = sample(dec_chain(caches, blocks, True),
                                            lambda: rewind_all(caches))
            if "same-block" in modes:
                out["same-block"] = sample(dec_chain(same, [blocks[0]] * k, False),
                                           lambda: rewind_all(same))
        else:
            if "rows" in modes or "rows-1step" in modes:
                s = [sample(pre_block(b, t), lambda: None) for b, t in zip(blocks, templates)]
                out["rows"] = tuple(sum(v) for v in zip(*s))
            if "chain" in modes:
                out["chain"] = sample(pre_chain(blocks, templates, False), lambda: None)
            for m in modes:
                if m.startswith("chain-") and m[6:].isdigit():
                    n = int(m[6:])
                    w, c, t = sample(pre_chain(blocks[:n], templates[:n], False), lambda: None)
                    out[m] = (w * k / n, c * k / n, t * k / n)
            if "chain-evals" in modes:
                out["chain-evals"] = sample(pre_chain(blocks, templates, True), lambda: None)
            if "same-block" in modes:
                out["same-block"] = sample(pre_chain([blocks[0]] * k, [templates[0]] * k,
                                                     False), lambda: None)
        return out

    phases = ["decode"] + (["prefill"] if args.prefill else [])
    results = {}
    for phase in phases:
        one_round(phase)  # warm-up round
        acc: dict[str, list] = {}
        for _ in range(args.rounds):
            for m, v in one_round(phase).items():
                acc.setdefault(m, []).append(v)
        results[phase] = acc
    print(f"{'phase':<8} {'mode':<12} {'wall ms/blk':>11} {'spread':>7} {'vs rows':>8} "
          f"{'cpu ms/blk':>10} {'throttled':>9}")
    print(f"{'':<8} {'':<12} {'(median)':>11} {'(max-min)':>7} {'(median)':>8} "
          f"{'(median)':>10} {'ms/blk':>9}")
    for phase, acc in results.items():
        ref = statistics.median(v[0] for v in acc["rows"]) if "rows" in acc else None
        for m, vals in acc.items():
            w = [v[0] / k for v in vals]
            med = statistics.median(w)
            sp = (max(w) - min(w)) / med if med else 0.0
            cpu = statistics.median(v[1] / k for v in vals)
            thr = statistics.median(v[2] / k for v in vals)
            rel = f"{100 * (med * k - ref) / ref:+7.1f}%" if ref else ""
            print(f"{phase + (' C=' + str(C) if phase == 'decode' else ' P=' + str(args.prefill)):<8} "
                  f"{m:<12} {med * 1e3:>11.2f} {100 * sp:>6.1f}% {rel:>8} {cpu * 1e3:>10.2f} "
                  f"{thr * 1e3:>9.2f}")
    print("all times measured (wall: perf_counter; cpu: process_time of this process; "
          "throttled: cgroup cpu.stat); 'vs rows' derived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
