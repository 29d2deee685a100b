#!/usr/bin/env python
"""Fidelity benchmark: does the sum of a cost table's rows predict the whole model?

One command (about 10 minutes on a 2-core CPU machine with the defaults):

    python bench/bench_fidelity.py

For each model (built-in architectures of three sizes, generated weights, the profiler's
default precision: 4-bit, float32 activations on the CPU build) it

1. profiles the model with `profile_model` (the profiler's defaults, device microbenchmarks
   included; grids from the options)
   into `data/bench/fidelity/<model>.json`;
2. runs the self-check (`profiler.selfcheck.self_check`) with `--repeats` end-to-end runs per
   grid point, the rows re-timed in turn with them;
3. prints, for prefill and decode at every grid point: the table's prediction (sum of rows),
   the end-to-end median with its spread ((max-min)/median over the repeats, and p10-p90
   of the per-repeat error), the error of the table and of the rows re-timed now, and whether
   it is within the target (5%) - or, where the end-to-end runs themselves spread wider than
   that, that this machine's noise is larger than the target.

4. then (as root, where the cgroup v1 CPU controller is mounted; `--no-testbed` skips it) runs
   `bench/bench_stages.py`: the testbed's per-stage compute under its CPU quotas against the
   stage's rows (re-timed in the same round, and from the profile), on the testbed
   benchmark's splits and the even split (a topology its planner never chose);
5. measures this machine's steadiness before and after (`bench/bench_machine.py`: the same
   fixed computation timed back to back; on a shared VM the core's speed can move by 2x over
   seconds, which no method inside it can remove) and prints it under the tables.

Everything printed is measured, or derived from measurements (errors, sums). The rows and
every sample are written to `data/bench/fidelity.json` (and `data/bench/stages.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_machine import line, quantiles, steadiness  # noqa: E402
from profiler.models import resolve_model  # noqa: E402
from profiler.profile import ProfileOptions, profile_model  # noqa: E402
from profiler.selfcheck import self_check  # noqa: E402

MODELS = ["qwen2.5-0.5b", "llama-3.2-1b", "qwen2.5-1.5b"]
TARGET = 0.05


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def pct(v: float) -> str:
    return f"{100 * v:+.1f}%"


def verdict(err: float, noise: float) -> str:
    if abs(err) <= TARGET:
        return "within 5%"
    if noise > TARGET:
        return f"off; noise {100 * noise:.0f}% > 5%"
    return "OFF"


def run_model(name: str, args, out_dir: Path) -> list[dict]:
    spec = resolve_model(name)
    # the profiler's defaults (the device microbenchmarks included: they also warm a fresh
    # process up, as profile-model does before its first row)
    opts = ProfileOptions(prefill_tokens=args.prefill, decode_context=args.decode,
                          restart=True, chain_blocks=args.chain_blocks)
    t0 = time.perf_counter()
    table = profile_model(spec, opts, out_dir / f"{name}.json")
    prof_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = self_check(spec, table, repeats=args.repeats)
    check_s = time.perf_counter() - t0
    out = []
    for p in res.points:
        e2e = p.measured_samples
        med = statistics.median(e2e)
        noise = (max(e2e) - min(e2e)) / med if med else 0.0
        per = [(p.predicted_s - m) / m for m in e2e]  # table vs each end-to-end run
        now = [(r - m) / m for r, m in zip(p.now_samples, e2e)]  # paired, same repeat
        out.append({"model": name, "phase": p.phase, "x": p.x, "predicted_s": p.predicted_s,
                    "measured_s": med, "measured_samples": e2e, "noise": noise,
                    "error": p.error, "error_p10_p90": quantiles(per),
                    "error_now": statistics.median(now) if now else 0.0,
                    "error_now_p10_p90": quantiles(now) if now else (0.0, 0.0),
                    "now_samples": p.now_samples, "profile_s": round(prof_s, 1),
                    "check_s": round(check_s, 1), "dtype": table.dtype,
                    "quantization": table.quantization, "weight_bytes": res.weight_bytes,
                    "chain_max_abs_diff": res.chain_max_abs_diff})
    return out


def format_rows(rows: list[dict]) -> str:
    head = (f"{'model':<14} {'phase':<8} {'x':>4} {'rows ms':>9} {'e2e ms':>9} {'spread':>7} "
            f"{'error':>7} {'p10..p90':>15} {'now err':>8} {'p10..p90':>15}  verdict (table; "
            f"rows now)")
    lines = [head, "-" * len(head)]
    for r in rows:
        lo, hi = r["error_p10_p90"]
        nlo, nhi = r["error_now_p10_p90"]
        lines.append(
            f"{r['model']:<14} {r['phase']:<8} {r['x']:>4} {r['predicted_s'] * 1e3:>9.1f} "
            f"{r['measured_s'] * 1e3:>9.1f} {100 * r['noise']:>6.1f}% {pct(r['error']):>7} "
            f"{pct(lo) + '..' + pct(hi):>15} {pct(r['error_now']):>8} "
            f"{pct(nlo) + '..' + pct(nhi):>15}  {verdict(r['error'], r['noise'])}; "
            f"{verdict(r['error_now'], r['noise'])}")
    lines.append("rows ms: the table's rows summed (derived); e2e ms: whole model end to end, "
                 "median of the repeats (measured); spread: (max-min)/median of the e2e runs "
                 "(measured noise); error: (rows - e2e)/e2e (derived), p10..p90 over the "
                 "repeats; now err: the rows re-timed in turn with each e2e run, summed, "
                 "paired error (median, p10..p90); verdicts: the table's error, then the "
                 "paired one (the method, without the machine's drift since the profile)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description="sum of rows vs end to end, several models")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--prefill", type=_ints, default=[4],
                    help="prefill tokens (comma list; default 4: quantized prefill is slow "
                         "on the CPU build)")
    ap.add_argument("--decode", type=_ints, default=[64, 256], help="decode contexts")
    ap.add_argument("--repeats", type=int, default=9, help="end-to-end runs per point")
    ap.add_argument("--chain-blocks", type=int, default=ProfileOptions().chain_blocks,
                    help="the profiler's chain length (1: each block alone, the old method)")
    ap.add_argument("--out", default=str(ROOT / "data" / "bench" / "fidelity.json"))
    ap.add_argument("--no-testbed", action="store_true",
                    help="skip the testbed's per-stage comparison (bench/bench_stages.py; "
                         "needs root and the cgroup v1 CPU controller)")
    args = ap.parse_args()
    out_dir = Path(args.out).parent / "fidelity"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load0 = os.getloadavg()[0]
    steady0 = steadiness()
    rows: list[dict] = []
    for name in args.models.split(","):
        print(f"{name}: profiling, then {args.repeats} end-to-end runs per point...",
              flush=True)
        rows += run_model(name, args, out_dir)
        print(format_rows([r for r in rows if r["model"] == name]), flush=True)
    stages = None if args.no_testbed else testbed_stages()
    steady1 = steadiness()
    print()
    print(f"python bench/bench_fidelity.py {' '.join(sys.argv[1:])}".strip())
    print(format_rows(rows))
    worst = max(abs(r["error"]) for r in rows)
    worst_now = max(abs(r["error_now"]) for r in rows)
    noisy = [r for r in rows if r["noise"] > TARGET]
    print(f"worst |error| {100 * worst:.1f}% (table), {100 * worst_now:.1f}% (rows now, "
          f"paired) over {len(rows)} points; "
          f"{len(noisy)} point(s) whose end-to-end runs spread more than 5% (this machine's "
          f"noise); load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"{(time.time() - started) / 60:.1f} min")
    if stages:
        print()
        print(stages)
    print(line(steady0, "at start"))
    print(line(steady1, "at end"))
    Path(args.out).write_text(json.dumps({"rows": rows, "argv": sys.argv[1:], "target": TARGET,
                                          "steadiness": [steady0, steady1]}, indent=1))
    return 0


def testbed_stages() -> str | None:
    """Run bench/bench_stages.py (its defaults) and return its table, or say why not."""
    import subprocess

    why = None
    if os.geteuid() != 0:
        why = "not root"
    elif not Path("/sys/fs/cgroup/cpu/cgroup.procs").exists():
        why = "no cgroup v1 CPU controller at /sys/fs/cgroup/cpu"
    if why:
        print(f"testbed stages skipped: {why} (run as root, or pass --no-testbed)", flush=True)
        return None
    print("testbed: per-stage compute under the CPU quotas (bench/bench_stages.py)...",
          flush=True)
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_stages.py")],
                       capture_output=True, text=True, timeout=3600)
    if p.returncode:
        print(f"testbed stages failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
        return None
    out = p.stdout
    return out[out.index("python bench/bench_stages.py"):].rstrip() if \
        "python bench/bench_stages.py" in out else out


if __name__ == "__main__":
    sys.exit(main())
