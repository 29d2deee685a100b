#!/usr/bin/env python
"""Per-stage compute against the sum of its rows, under the testbed's CPU quotas.

    sudo python bench/bench_stages.py                       # the standard topology + "even"
    sudo python bench/bench_stages.py --stages 0.5:0-8,0.9:8-16

What the testbed's per-stage breakdown compares (a stage's measured compute, waiting
excluded, against the sum of the rows of that node's profile), without the network: for each
CPU share, a cgroup v1 CPU group with the testbed's period / quota and cpu.shares is made (root;
removed at the end), and inside it

1. the testbed's model (`bench-llama`: 16 blocks, hidden 1024, float32, vocab 4096, generated
   weights) is profiled by `profile_model` with the profiler's method (`--chain-blocks`,
   default the profiler's) and, for comparison, with each block alone (chain 1: the method
   before the change);
2. every stage on that node is run as the runner runs it: embed (first stage), its blocks and
   norm + head (last stage) as one graph, one mx.eval, one decode pass at the context after an
   idle of the profiler's settle (a stage waits for its input), `--rounds` times; its median
   and spread are printed beside the sum of the stage's rows from both tables.

Stages are `CPU:START-END` (blocks START..END-1; START 0 adds the embedding, END 16 the head).
The default lists the testbed benchmark's splits: ours (0.5:0-8, 0.9:8-16), exo-legacy's
(0.25:0-8, 0.3:8-12, 0.5:12-14, 0.9:14-16) and even (0.9:0-4, 0.5:4-8, 0.3:8-12, 0.25:12-16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_machine import line, quantiles, steadiness  # noqa: E402
from bench.exp_chain_vs_alone import BENCH_LLAMA, cpu_group, in_group  # noqa: E402

DEFAULT = ("0.5:0-8,0.9:8-16,0.25:0-8,0.3:8-12,0.5:12-14,0.9:14-16,0.9:0-4,0.5:4-8,"
           "0.3:8-12,0.25:12-16")
TARGET = 0.05


def spread(v: list[float]) -> float:
    """(p90 - p10) / median: the rounds' spread without its two extremes."""
    lo, hi = quantiles(v)
    return (hi - lo) / statistics.median(v)


def parse(stages: str) -> dict[float, list[tuple[int, int]]]:
    out: dict[float, list[tuple[int, int]]] = {}
    for s in stages.split(","):
        cpu, rng = s.split(":")
        a, b = rng.split("-")
        st = (int(a), int(b))
        if st not in out.setdefault(float(cpu), []):
            out[float(cpu)].append(st)
    return out


def node(args) -> int:
    """Inside the cgroup: profile, then time the stages; print one JSON line."""
    import mlx.core as mx
    from mlx_lm.models.base import create_attention_mask

    from profiler import build, rows
    from profiler.models import resolve_model
    from profiler.profile import ProfileOptions, profile_model

    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps(BENCH_LLAMA))
    spec = resolve_model(str(d / "config.json"))
    C = args.context
    base = dict(prefill_tokens=[16], decode_context=[C], microbench=False, bits=0,
                dtype="float32", restart=True)
    if args.repeats:
        base["repeats"] = args.repeats
    tables = {k: profile_model(spec, ProfileOptions(**base, chain_blocks=k), d / f"t{k}.json")
              for k in sorted({1, args.chain_blocks})}
    settle = tables[args.chain_blocks].method.get("settle_s", 0.0)
    model = build.skeleton(spec)
    parts = build.model_parts(model)
    dt = mx.float32
    n = len(parts.layers)
    for i in range(n):  # the same weights the profile generated for each block
        parts.layers[i] = build.materialise(parts.layers[i], generated=True, dtype=dt,
                                            quant=None, seed=1000 + i)
    parts.set_embed(build.materialise(parts.embed, generated=True, dtype=dt, quant=None, seed=10))
    parts.container.norm = parts.norm = build.materialise(parts.norm, generated=True, dtype=dt,
                                                          quant=None, seed=20)
    parts.set_head(build.materialise(parts.lm_head, generated=True, dtype=dt, quant=None,
                                     seed=21))
    head = rows.head_fn(parts.norm, parts.lm_head, parts.embed)
    templates = list(model.make_cache())
    H = BENCH_LLAMA["hidden_size"]
    x1 = rows.hidden(1, 1, H, dt, seed=9)
    caches = [rows.fill_cache(parts.layers[i], templates[i], C, x1, seed=300 + i)
              for i in range(n)]
    ids1 = mx.array([[7]], dtype=mx.int32)
    k = min(args.chain_blocks, n)
    m1 = rows.Method(prefill_tokens=[], decode_context=[C], warmup=0, repeats=1, max_rounds=1,
                     settle_s=settle, flush=True)

    def rows_now(a, b):
        """The stage's rows timed NOW by the profiler's own functions and method (embed alone,
        the decode chain of the first k blocks per block, head alone): one sample each."""
        t = 0.0
        if a == 0:
            t += rows.time_embed(parts.embed, BENCH_LLAMA["vocab_size"], m1)[1][0].median_s
        t += (b - a) * rows.time_decode_chain(parts.layers[:k], templates[:k], H, dt, m1,
                                              1)[0].median_s
        if b == n:
            t += rows.time_head(head, H, dt, m1)[1][0].median_s
        return t

    out = []
    for a, b in json.loads(args.node_stages):
        def stage(a=a, b=b):
            h = parts.embed(ids1) if a == 0 else x1
            mask = create_attention_mask(h, caches[a])
            for i in range(a, b):
                h = parts.layers[i](h, mask, caches[i])
            if b == n:
                h = head(h)
            mx.eval(h, *[x for i in range(a, b) for x in rows.cache_arrays(caches[i])])

        def stage_sample(a=a, b=b, stage=stage) -> float:
            """One decode pass timed the profiler's way (rows._t: caches rewound and flushed,
            the settle idled, as a stage waits for its input; then the clock)."""
            def rewind():
                for i in range(a, b):
                    rows.rewind(caches[i], C)
            return rows._t(stage, m1, setup=rewind).median_s

        samples, now = [], []
        stage_sample()  # warm-up
        for r in range(args.rounds):
            # paired: the stage and its rows re-timed in the same round (this machine's speed
            # drifts over seconds; bench/bench_machine.py), in alternating order
            if r % 2:
                now.append(rows_now(a, b))
                samples.append(stage_sample())
            else:
                samples.append(stage_sample())
                now.append(rows_now(a, b))
        names = (["embed"] if a == 0 else []) + [f"layers.{i}" for i in range(a, b)] + \
            (["head"] if b == n else [])
        sums = {k_: sum(t.row(nm).decode_s[0] for nm in names) for k_, t in tables.items()}
        out.append({"stage": [a, b], "samples": samples, "rows_now": now, "rows_s": sums})
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def run_node(cpu: float, stages: list[tuple[int, int]], args) -> list[dict]:
    with cpu_group(cpu, "fidstage") as cg:
        cmd = in_group(cg, [__file__, "--node-stages", json.dumps(stages), "--rounds",
                            str(args.rounds), "--context", str(args.context), "--chain-blocks",
                            str(args.chain_blocks), "--repeats", str(args.repeats)])
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            raise SystemExit(f"node {cpu}: {p.stderr[-2000:]}")
        res = json.loads(line[0][7:])
        for r in res:
            r["cpu"] = cpu
        return res


def main() -> int:
    ap = argparse.ArgumentParser(description="per-stage compute vs rows under CPU quotas")
    ap.add_argument("--stages", default=DEFAULT)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--context", type=int, default=22, help="decode context (the testbed's)")
    ap.add_argument("--chain-blocks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=0,
                    help="the profile's timed repeats per point (0: the profiler's default)")
    ap.add_argument("--node-stages", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "data" / "bench" / "stages.json"))
    args = ap.parse_args()
    if args.node_stages:
        return node(args)
    started = time.time()
    steady0 = steadiness()
    res = []
    for cpu, stages in parse(args.stages).items():
        print(f"node {cpu} core: profiling and timing {len(stages)} stage(s)...", flush=True)
        res += run_node(cpu, stages, args)
    steady1 = steadiness()
    k = args.chain_blocks
    head = (f"{'cpu':>5} {'stage':>7} {'measured ms':>11} {'spread':>7} {'rows now':>8} "
            f"{'p10..p90':>15} {'table':>7} {'alone':>7}  verdict (rows now, paired)")
    print(f"\npython bench/bench_stages.py {' '.join(sys.argv[1:])}".rstrip())
    print(head)
    print(f"{'':>5} {'':>7} {'(median)':>11} {'(p10-90)':>7} {'error':>8} {'':>15} "
          f"{'(chain ' + str(k) + ')':>7} {'(chain 1)':>7}")
    worst = worst_table = 0.0
    for r in res:
        s = r["samples"]
        med = statistics.median(s)
        sp = spread(s)
        paired = [(x - y) / y for x, y in zip(r["rows_now"], s)]
        e_now = statistics.median(paired)
        lo, hi = quantiles(paired)
        new, old = r["rows_s"][str(k)], r["rows_s"]["1"]
        e_new, e_old = (new - med) / med, (old - med) / med
        worst, worst_table = max(worst, abs(e_now)), max(worst_table, abs(e_new))
        v = "within 5%" if abs(e_now) <= TARGET else (
            f"off; noise {100 * sp:.0f}% > 5%" if sp > TARGET else "OFF")
        a, b = r["stage"]
        print(f"{r['cpu']:>5} {f'{a}-{b}':>7} {med * 1e3:>11.1f} {100 * sp:>6.1f}% "
              f"{100 * e_now:>+7.1f}% {100 * lo:>+6.1f}..{100 * hi:>+5.1f}% "
              f"{100 * e_new:>+6.1f}% {100 * e_old:>+6.1f}%  {v}")
    print("measured: the stage's decode pass (embed / blocks / head as one graph, one eval, "
          "after the settle), median over the rounds, spread (p90 - p10) / median; rows now: the "
          "stage's rows timed by the profiler's own functions in the same round (embed and head "
          f"alone, the decode chain of {k} blocks per block), error = median over the rounds of "
          "(rows now - stage) / stage, p10..p90 of it; table / alone: the sums of rows of the "
          "profiles taken before the rounds (chain k, chain 1) against the median (all derived "
          f"from measurements). worst |error| rows now {100 * worst:.1f}%, table "
          f"{100 * worst_table:.1f}%; {(time.time() - started) / 60:.1f} min")
    print(line(steady0, "at start"))
    print(line(steady1, "at end"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "stages": res,
                                          "steadiness": [steady0, steady1]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
