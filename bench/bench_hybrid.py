#!/usr/bin/env python
"""Hybrid benchmark: tensor-parallel stages inside a measured pipeline, on the emulated cluster.

One command (root, Linux; about 10 minutes on a 2-core machine, `--quick` about 4):

    python bench/bench_hybrid.py

Steps, all real:

1. A llama-shaped model directory, random float32 weights (8 blocks, hidden 1024, 16 query heads
   over 4 KV heads, vocab 4096; about 400 MB), written once under `~/.cache/mlx-split/`.
2. The testbed (`exo_bridge.testbed`, namespace prefix `xbhyb`): two FAST nodes joined by a
   fast link (f1, f2: half a core each, 0.2 ms, 1 Gbit/s) and two slow-linked ones (s1, s2), each
   node in its own network namespace and cgroup. The fast nodes have little memory (the planner
   may not put the whole model on the pair), the slow ones more (exo's memory-only placement
   prefers them).
3. Each node profiled UNDER ITS QUOTA (`profile-model DIR --tp-shares ...`: whole blocks and
   one tensor-parallel rank's share of a block), every link with `profile-link mlx`, and the
   all-reduce of each candidate group with `profile-link collective` (the runner's own paths, in
   the nodes' namespaces and cgroups, each call after half a block's compute: `--busy-ms`)
   -> `data/bench/hybrid/cluster.json`.
4. `split-model --hybrid` (graphsplit.hybrid.make.make_hybrid_plan) plans for latency under our
   runtime (mlx-pipeline) -> `plan.json`, with the pure-pipeline optimum and exo's placements
   (Pipeline: memory-proportional over the smallest cycle; Tensor: equal shares over the
   smallest cycle whose size divides the heads) as baselines.
5. The runner (`exo_bridge.runner.run.run_stages`, tensor groups by exo_bridge.runner.tensor)
   runs each split on the testbed: tensor-2 (the fast pair, equal shares, every layer), the pure
   pipeline, the hybrid, exo's Tensor and Pipeline placements and ours; measured TPOT / TTFT
   against the cost model's prediction for that split (graphsplit.costmodel.predict). exo's
   Pipeline placement runs under exo's own per-token protocol (`exo-current`); exo's Tensor
   placement runs on our runner (the ring protocol: exo's tensor protocol is not emulated here).

Prints the table, each row's verdict (within 15 %?) and whether the measurement agrees where the
prediction says the hybrid wins; writes everything to `data/bench/hybrid/result.json`.
`--reuse` keeps existing profiles and measurements, `--quick` runs fewer tokens and one run per
split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_machine import line as steady_line, steadiness  # noqa: E402
from bench_testbed import MODEL_CONFIG as TESTBED_MODEL  # noqa: E402
from bench_testbed import ensure_model as testbed_ensure_model  # noqa: E402
from bench_testbed import log, measure_link, record_link  # noqa: E402
from bench_testbed import profile_node as testbed_profile_node  # noqa: E402

from exo_bridge.profile_collective import collective_sizes, entry_from, measure_collective  # noqa: E402
from exo_bridge.profile_collective import write_collective  # noqa: E402
from exo_bridge.runner.run import format_table, model_spec, run_stages  # noqa: E402
from exo_bridge.runner.tensor import hybrid_layout  # noqa: E402
from exo_bridge.testbed.bed import Testbed  # noqa: E402
from exo_bridge.testbed.spec import LinkSpec, NodeSpec, TestbedSpec  # noqa: E402
from exo_bridge.testbed.system import available  # noqa: E402

MODEL_CONFIG = {**TESTBED_MODEL, "num_hidden_layers": 8}  # bench_testbed's model, 8 blocks
MODEL_NAME = "bench-llama-8x1024-kv4"
MB = 1 << 20
# id, cpu share, usable memory the planner fits into, available memory exo's placement sees
# Per block 44 MB of float32 weights; embedding and head 16 MB each. 180 MB holds 3 whole blocks
# (+ embedding or head) or 6 half blocks of a tensor pair (+ both, as the cost model counts them
# on every member), so neither the fast pair's pipeline nor its tensor group holds all 8 blocks.
NODES = [
    ("f1", 0.55, 180 * MB, 250 * MB),
    ("f2", 0.55, 180 * MB, 250 * MB),
    ("s1", 0.35, 600 * MB, 300 * MB),
    ("s2", 0.25, 600 * MB, 300 * MB),
]
LINKS = [  # both ways: latency ms, rate Mbit/s
    ("f1", "f2", 0.2, 1000), ("f1", "s1", 3.0, 200), ("f2", "s1", 3.0, 200),
    ("f1", "s2", 3.0, 200), ("f2", "s2", 3.0, 200), ("s1", "s2", 4.0, 100),
]
GROUPS = [("f1", "f2"), ("s1", "s2"), ("f2", "s1")]  # candidate tensor groups, measured
TOLERANCE = 0.15


def profile_node(tb: Testbed, node: str, model_dir: Path, out: Path, prompt: int,
                 context: int, repeats: int) -> None:
    """bench_testbed's profile-model run, with the tensor-parallel shares (decode batch 1, no
    chunk grid)."""
    testbed_profile_node(tb, node, model_dir, out, prompt, context, repeats,
                         ("--tp-shares", "1,2,3", "--decode-batch", "1", "--prefill-chunk",
                          "none"))


def write_cluster(path: Path, profiles: dict[str, Path], keep: dict) -> None:
    data = {"model": MODEL_NAME,
            "nodes": [{"id": n, "profile": os.path.relpath(profiles[n], path.parent),
                       "memory_bytes": mem, "available_bytes": avail, "total_bytes": avail}
                      for n, _, mem, avail in NODES],
            "links": keep.get("links", []), "collectives": keep.get("collectives", []),
            "default_link": {"latency_ms": 5.0, "bandwidth_gbps": 0.1}}
    path.write_text(json.dumps(data, indent=1))


def measure_links(tb: Testbed, cluster_path: Path, P: int, reuse: bool) -> None:
    have = {(lk["from"], lk["to"]) for lk in json.loads(cluster_path.read_text())["links"]}
    for a, b, lat, rate in LINKS:
        for x, y in ((a, b), (b, a)):
            if reuse and (x, y) in have:
                continue
            record_link(cluster_path, x, y, measure_link(tb, x, y, MODEL_CONFIG["hidden_size"],
                                                         max(P, 64)), (lat, rate))


def busy_ms(profiles: dict[str, Path], group: tuple[str, ...], context: int) -> float:
    """Half of one member's measured block decode at the group's equal share: the compute a rank
    does before each of a block's two all-reduces (from its profile, under its quota)."""
    from profiler.costtable import read_table, tp_block_seconds

    k = MODEL_CONFIG["num_key_value_heads"] // len(group)
    return max(1e3 * tp_block_seconds(read_table(profiles[n]), 0, k, "decode", context)[0] / 2
               for n in group)


def measure_groups(tb: Testbed, cluster_path: Path, profiles: dict[str, Path], P: int,
                   context: int, reuse: bool, repeats: int) -> None:
    """`profile-link collective` over each candidate group, ranks in the nodes' namespaces and
    cgroups through the link emulation, each call after computing as long as a member computes
    half a block (`--busy-ms`): under a CPU quota an all-reduce right after compute pays
    throttling and wake-ups that one after idling does not (measured here: 1.3-3.8 ms idle,
    3.9-15 ms after 10 ms of compute, 4 KiB, fast pair)."""
    have = {tuple(sorted(c["nodes"])) for c in
            json.loads(cluster_path.read_text()).get("collectives", [])}
    sizes = collective_sizes(MODEL_CONFIG["hidden_size"], 4, P)
    for g in GROUPS:
        if reuse and tuple(sorted(g)) in have:
            continue
        busy = busy_ms(profiles, g, context)
        with tb.ring(list(g)) as ring:
            res = measure_collective(len(g), sizes, hostfiles=ring.hostfiles,
                                     wrappers=ring.wrappers, repeats=repeats, gap_ms=0.0,
                                     busy_ms=busy)
        e = write_collective(cluster_path, entry_from(res, list(g), "ring"))
        log(f"all-reduce {'+'.join(g)} after {busy:.1f} ms of compute: " + ", ".join(
            f"{n} B {1e3 * t:.2f} ms" for n, t in zip(e["sizes_bytes"], e["seconds"]))
            + f" (mx all_sum: {', '.join(f'{1e3 * t:.2f}' for t in e['mlx_all_sum']['seconds'])}"
            " ms)")


def _tensor2(L: int, inter: int):
    from graphsplit.hybrid.shares import tensor_stage

    return [tensor_stage(["f1", "f2"], [2, 2], 0, L, inter)]


def _is_hybrid(stages) -> bool:
    return len(stages) > 1 and any(s.tensor is not None for s in stages)


def plan_rows(cluster_path: Path, out: Path, P: int, context: int) -> list[tuple]:
    """(label, stages, prediction, protocol) per row; the plan written to plan.json."""
    from graphsplit.cluster import load_cluster
    from graphsplit.costmodel import Workload, predict
    from graphsplit.hybrid.make import make_hybrid_plan
    from graphsplit.plan import stages_from_json, write_plan

    cluster = load_cluster(cluster_path)
    wl = Workload(prompt_tokens=P, context_tokens=context, streams=1)
    plan = make_hybrid_plan(cluster, "latency", wl, "mlx-pipeline",
                            cluster_file=str(cluster_path))
    write_plan(plan, out / "plan.json")
    L, inter = cluster.n_layers, MODEL_CONFIG["intermediate_size"]
    log(f"our plan: {_show(plan.stages)} ({plan.solver.get('proven', '?')}: "
        f"{plan.solver.get('message', '')})")

    def row(label, stages, runtime="mlx-pipeline", protocol="ring"):
        return (label, stages, predict(cluster, stages, wl, runtime).to_dict(), protocol)

    rows = [row("tensor-2", _tensor2(L, inter))]
    pipe = plan.baselines.get("pipeline", {}).get("stages")
    if pipe:
        rows.append(row("pipeline", stages_from_json(pipe, "pipeline")))
    hyb = plan.stages if _is_hybrid(plan.stages) else _hybrid_fallback(cluster, wl, L, inter)
    if hyb:
        rows.append(row("hybrid", hyb))
    for b, runtime, protocol in (("exo-current-tensor", "mlx-pipeline", "ring"),
                                 ("exo-current", "exo-current", "exo-current")):
        base = plan.baselines.get(b) or {}
        if base.get("stages"):
            rows.append(row(f"exo-{'tensor' if 'tensor' in b else 'pipeline'}",
                            stages_from_json(base["stages"], b), runtime, protocol))
        else:
            log(f"{b}: {base.get('error', 'no placement')}")
    rows.append(row("ours", plan.stages))
    return rows


def _hybrid_fallback(cluster, wl, L: int, inter: int):
    """The fast pair's group for all but the last layers and s1 for the rest: the best such
    cut by the cost model (when our plan is not itself a hybrid)."""
    from graphsplit.costmodel import predict
    from graphsplit.hybrid.shares import tensor_stage
    from graphsplit.plan import Stage

    best = None
    for cut in range(1, L):
        st = [tensor_stage(["f1", "f2"], [2, 2], 0, cut, inter), Stage("s1", cut, L)]
        p = predict(cluster, st, wl, "mlx-pipeline")
        if p.fits and (best is None or p.tpot_s < best[0]):
            best = (p.tpot_s, st)
    return best[1] if best else None


def _show(stages) -> str:
    return " ".join(f"{'+'.join(s.members)}[{s.start_layer},{s.end_layer})"
                    + (f"kv{'/'.join(map(str, s.tensor.kv_heads))}" if s.tensor else "")
                    for s in stages)


def run_rows(tb: Testbed, rows: list[tuple], model_dir: Path, P: int, N: int,
             runs: int) -> dict[str, list]:
    mspec = model_spec(str(model_dir), None)
    every: dict[str, list] = {label: [] for label, *_ in rows}
    for rep in range(runs):  # round robin: slow drifts of the machine hit every split
        for label, stages, pred, protocol in rows:
            order = [r.node for r in hybrid_layout(stages, MODEL_CONFIG)]
            log(f"running {label} ({rep + 1}/{runs}): {_show(stages)} ranks {order}")
            with tb.ring(order) as ring:
                r = run_stages(stages, mspec, P, N, label=label, predicted=pred,
                               hosts=ring.hosts, hostfiles=ring.hostfiles,
                               wrappers=ring.wrappers, timeout_s=600, protocol=protocol)
            every[label].append(r)
            log(f"{label}: tpot {1e3 * r.tpot_s:.1f} ms (pred {1e3 * pred['tpot_s']:.1f}), "
                f"ttft {1e3 * r.ttft_s:.1f} ms (pred {1e3 * pred['ttft_s']:.1f})")
    return every


def verdicts(results: list, rows: list[tuple]) -> list[str]:
    """Per row: TPOT and TTFT within TOLERANCE of the prediction? And where the prediction
    says the hybrid beats every other row that is not ours, does the measurement?"""
    lines = []
    for r in results:
        e = r.errors_pct()
        ok = [k for k in ("tpot_s", "ttft_s") if e[k] is not None and abs(e[k]) <= 100 * TOLERANCE]
        lines.append(f"{r.label:<14} tpot {e['tpot_s']:+6.1f}%  ttft {e['ttft_s']:+6.1f}%  "
                     f"{'within' if len(ok) == 2 else 'NOT within'} {TOLERANCE:.0%}"
                     + ("" if r.predicted.get("fits", True) else
                        "  (predicted not to fit the declared memory; run anyway)"))
    by = {r.label: r for r in results}
    if "hybrid" in by:
        h = by["hybrid"]
        others = [r for r in results if r.label not in ("hybrid", "ours")
                  and r.stages != h.stages]
        pw = [r.label for r in others if h.predicted["tpot_s"] < r.predicted["tpot_s"]]
        mw = [r.label for r in others if h.tpot_s < r.tpot_s]
        lines.append(f"hybrid predicted faster (TPOT) than: {', '.join(pw) or 'none'}; "
                     f"measured faster than: {', '.join(mw) or 'none'}; agree where predicted: "
                     f"{'yes' if set(pw) <= set(mw) else 'NO: ' + ', '.join(sorted(set(pw) - set(mw)))}")
    return lines


def allreduce_lines(results: list, cluster_path: Path) -> list[str]:
    """Per tensor row: the measured all-reduce of a decode step inside the run (median per call
    over the group's members, from the ranks' own timings: it includes waiting for the slower
    member's blocks) against the group's measured collective at that size (what the cost model
    charges per call)."""
    import statistics

    from graphsplit.cluster import load_cluster

    cluster = load_cluster(cluster_path)
    nbytes = MODEL_CONFIG["hidden_size"] * 4
    out = []
    for r in results:
        for s in r.stages:
            if s.tensor is None:
                continue
            calls = []
            for rk in r.ranks:
                if rk.get("group_ranks") and r.ranks[rk["group_ranks"][0]]["stage"] == \
                        [s.start_layer, s.end_layer]:
                    calls += rk["allreduce_s"][2 * s.n_layers:]  # decode steps only
            col = cluster.collective(s.tensor.nodes)
            if calls and col is not None:
                out.append(f"{r.label}: {'+'.join(s.tensor.nodes)} all-reduce per call, decode: "
                           f"in the run {1e3 * statistics.median(calls):.2f} ms (median over "
                           f"{len(calls)} calls, both members), measured alone "
                           f"{1e3 * col.time(nbytes):.2f} ms")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=str(ROOT / "data" / "bench" / "hybrid"))
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache" / "mlx-split" / MODEL_NAME))
    ap.add_argument("--quick", action="store_true",
                    help="fewer tokens, fewer repeats, one run per split")
    ap.add_argument("--reuse", action="store_true", help="keep existing profiles and measurements")
    ap.add_argument("--runs", type=int, default=None, help="runs per split (default 3, quick 1)")
    ap.add_argument("--prefix", default="xbhyb", help="testbed namespace prefix (unique)")
    args = ap.parse_args(argv)
    why = available()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    (out / "profiles").mkdir(parents=True, exist_ok=True)
    model_dir = testbed_ensure_model(Path(args.model_dir), MODEL_CONFIG)
    P, N = (8, 6) if args.quick else (16, 10)
    runs = args.runs or (1 if args.quick else 3)
    context = P + N // 2  # the mean KV length a decode step sees
    spec = TestbedSpec([NodeSpec(n, cpu) for n, cpu, _, _ in NODES],
                       [LinkSpec(a, b, lat, rate) for a, b, lat, rate in LINKS],
                       default_latency_ms=5.0, default_rate_mbit=100, prefix=args.prefix)
    cluster_path = out / "cluster.json"
    log(f"load average before: {os.getloadavg()[0]:.2f} (a shared machine: other work adds "
        "noise)")
    steady0 = steadiness()
    log(steady_line(steady0, "at start"))
    t0 = time.time()
    with Testbed(spec) as tb:
        profiles = {n: out / "profiles" / f"{n}.json" for n, *_ in NODES}
        for n, *_ in NODES:
            if not (args.reuse and profiles[n].exists()):
                profile_node(tb, n, model_dir, profiles[n], P, context, 3 if args.quick else 5)
        keep = json.loads(cluster_path.read_text()) if args.reuse and cluster_path.exists() \
            else {}
        write_cluster(cluster_path, profiles, keep)
        measure_links(tb, cluster_path, P, args.reuse)
        measure_groups(tb, cluster_path, profiles, P, context, args.reuse,
                       8 if args.quick else 20)
        rows = plan_rows(cluster_path, out, P, context)
        every = run_rows(tb, rows, model_dir, P, N, runs)
    results = []
    for label, *_ in rows:  # the run with the median TPOT represents the split
        rs = sorted(every[label], key=lambda x: x.tpot_s)
        results.append(rs[len(rs) // 2])
    table = format_table(results)
    lines = verdicts(results, rows) + allreduce_lines(results, cluster_path)
    steady1 = steadiness()
    lines += [steady_line(steady0, "at start"), steady_line(steady1, "at end")]
    print(table)
    print()
    print("\n".join(lines))
    print(f"(measured on the testbed, prompt {P}, {N} new tokens, median of {runs} run(s) per "
          f"split; predicted by graphsplit's cost model from the measured profiles, links and "
          f"collectives; load average at the end {os.getloadavg()[0]:.2f}; "
          f"{time.time() - t0:.0f} s)")
    (out / "result.json").write_text(json.dumps(
        {"loadavg_at_end": os.getloadavg(), "prompt_tokens": P, "max_tokens": N,
         "nodes": NODES, "links": LINKS, "table": table, "verdicts": lines,
         "results": [r.to_dict() for r in results],
         "all_runs": {k: [x.to_dict() for x in v] for k, v in every.items()}}, indent=1,
        default=str))
    log(f"wrote {out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
