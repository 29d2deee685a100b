#!/usr/bin/env python
"""Many streams on the testbed: measured against predicted tokens/s, per batching pattern.

One command (root, Linux; about 10 minutes on a 2-core machine, `--quick` about 4):

    python bench/bench_serve.py

The emulated cluster of `bench/bench_testbed.py` (same 4 nodes, CPU quotas, links, model;
its own namespace prefix `xbserve`, so it never touches another run's testbed). The cost tables
and link measurements are that benchmark's (`data/bench/profiles`, `data/bench/cluster.json`,
copied into the output directory so nothing of theirs is changed), or taken afresh with
`--profile` (each node profiled under its quota, with a decode batch grid when the profiler
has one). Then, for B = 1, 4 and 8 streams and each runtime batching pattern:

* ``micro-batch`` (ours, runtime mlx-pipeline, ring protocol): B streams in micro-batches that
  fill the pipeline, each split at the micro-batch that serves it best (graphsplit.batching);
* ``batch-through`` (current exo, runtime exo-current, its protocol: all-gather + head on every
  rank): one batch of up to 8 streams crosses all stages, no overlap;

it plans (graphsplit.api) our throughput split, our latency split and the replica plan
(k independent pipelines, graphsplit.replicas), takes exo's placements (current exo's and legacy
exo's splits), serves B streams through each on the testbed (exo_bridge.runner.run.serve_stages:
one process per stage in its node's namespace and cgroup; a replica plan runs its pipelines at
once) and prints measured against predicted aggregate tokens/s, the ratio and the error of every
row, flags rows outside 10%, and checks, for every pair where the prediction says our split is
faster than exo's, whether the measurement agrees.

Writes `serve-result.json` (every run, every stream's tokens and times) to the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_testbed import (LINKS, MODEL_NAME, NODES, ensure_model, log,  # noqa: E402
                           profile_node)
from bench_machine import line as steady_line, steadiness  # noqa: E402
from exo_bridge.runner.run import model_spec, serve_prediction, serve_stages  # noqa: E402
from exo_bridge.testbed.bed import Testbed  # noqa: E402
from exo_bridge.testbed.spec import LinkSpec, NodeSpec, TestbedSpec  # noqa: E402
from exo_bridge.testbed.system import available  # noqa: E402

PATTERNS = (("micro-batch", "mlx-pipeline", "ring"),
            ("batch-through", "exo-current", "exo-current"))
MAX_BATCH = 8  # exo's EXO_MAX_CONCURRENT_REQUESTS default
TOLERANCE = 0.10


def prepare_cluster(out: Path, source: Path, tb, model_dir: Path, P: int, context: int,
                    profile: bool) -> Path:
    """The cluster file and tables in `out`: copied from `source` (bench_testbed's), or the
    nodes profiled afresh under their quotas (links and overheads still copied)."""
    (out / "profiles").mkdir(parents=True, exist_ok=True)
    data = json.loads((source / "cluster.json").read_text())
    for node in data["nodes"]:
        dst = out / "profiles" / f"{node['id']}.json"
        if profile:
            profile_node(tb, node["id"], model_dir, dst, P, context)
        else:
            shutil.copyfile(source / node["profile"], dst)
        node["profile"] = os.path.relpath(dst, out)
    path = out / "cluster.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def splits_for(cluster, cluster_path: Path, B: int, runtime: str, P: int, context: int,
               replicas: bool):
    """[(label, [(stages, streams, micro_batch)], prediction)] for one (B, pattern): a row is
    one pipeline, or several (a replica plan) run at once."""
    from graphsplit.api import make_plan, make_throughput_plan
    from graphsplit.batching import best_micro_batch
    from graphsplit.costmodel import Workload
    from graphsplit.plan import stages_from_json

    wl = Workload(prompt_tokens=P, context_tokens=context, streams=B)
    tp = make_throughput_plan(cluster, wl, runtime, False, cluster_file=str(cluster_path))
    lat = make_plan(cluster, "latency", wl, runtime, False, cluster_file=str(cluster_path))
    rows = [("ours-throughput", tp.stages), ("ours-latency", lat.stages)]
    for name in ("exo-current", "exo-legacy"):
        b = tp.baselines.get(name) or {}
        if b.get("stages"):
            rows.append((f"exo-placement:{name}", stages_from_json(b["stages"], name)))
    out, seen = [], {}
    for label, stages in rows:
        key = tuple((s.node, s.start_layer, s.end_layer) for s in stages)
        if key in seen:  # the same split: one run, both labels
            seen[key][0] += "=" + label
            continue
        m = 1
        if runtime == "mlx-pipeline":
            best = best_micro_batch(cluster, stages, wl, runtime)[0]
            m = best.batch if best else 1
        seen[key] = [label, [(stages, B, m)]]
        out.append(seen[key])
    if replicas and B > 1:
        rp = make_throughput_plan(cluster, wl, runtime, False, cluster_file=str(cluster_path),
                                  replicas=None)
        if rp.replicas:
            out.append(["replicas", [(stages_from_json(r["stages"], "replica"), r["streams"],
                                      r["serving"]["micro_batch"]) for r in rp.replicas]])
        else:
            log(f"B={B} {runtime}: the replica search chose one pipeline (no replica row)")
    return [tuple(x) for x in out]


def serve_row(tb, cluster, mspec, pipes, pattern: str, runtime: str, protocol: str, P: int,
              N: int) -> list:
    """Serve every pipeline of a row at once (threads); returns their ServeResults."""
    results: list = [None] * len(pipes)
    errors: list = []

    def one(i, stages, streams, m):
        try:
            pred = serve_prediction(cluster, stages, P, N, streams, runtime, pattern, m,
                                    MAX_BATCH)
            with tb.ring([s.node for s in stages]) as ring:
                results[i] = serve_stages(stages, mspec, P, N, streams, pattern=pattern,
                                          micro_batch=m, max_batch=MAX_BATCH, predicted=pred,
                                          protocol=protocol, timeout_s=600, seed=100 * i,
                                          warmup_prompt=4, warmup_tokens=2,
                                          hosts=ring.hosts, hostfiles=ring.hostfiles,
                                          wrappers=ring.wrappers)
        except Exception as e:  # reported below, with the row
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(i, *p)) for i, p in enumerate(pipes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return results


def summarise(results: list) -> dict:
    """A row's measured and predicted numbers (replicas: throughput summed, TPOT over all
    streams' median, the predictions' sum / max)."""
    import statistics

    ms = [r.measured() for r in results]
    tpots = [x for m in ms for x in m["per_stream_tpot_s"]]
    ttfts = [x for m in ms for x in m["per_stream_ttft_s"]]
    return {"meas_tps": sum(m["throughput_tps"] for m in ms),
            "pred_tps": sum(r.predicted["throughput_tps"] for r in results),
            "meas_tpot": statistics.median(tpots), "pred_tpot": max(
                r.predicted["tpot_s"] for r in results),
            "meas_ttft": statistics.median(ttfts),
            "stages": " | ".join(" ".join(f"{s.node}:{s.start_layer}-{s.end_layer}"
                                          for s in r.stages) for r in results),
            "m": ",".join(str(r.micro_batch if r.pattern == "micro-batch"
                              else min(r.streams, r.max_batch)) for r in results)}


def stage_breakdown(results: list) -> str:
    """Per stage: measured median decode compute / predicted (ms), m, for the error analysis
    (compute above its row: the node got less CPU than profiled; below: batching gained more
    than the table charges)."""
    import statistics

    parts = []
    for r in results:
        pc = r.predicted.get("stage_compute_s") or {}
        for st, rk in zip(r.stages, r.ranks):
            dec = [c for ph, _, c, _ in rk["passes"] if ph == "decode"]
            parts.append(f"{st.node} {1e3 * statistics.median(dec):.0f}/"
                         f"{1e3 * pc.get(st.node, 0.0):.0f}")
    return " | ".join(parts)


def print_report(rows: list[dict], loadavg: tuple) -> list[str]:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="many streams on the testbed: measured vs predicted aggregate tokens/s",
              caption=f"measured: one run per row, rank 0's clock (decode tokens / decoding "
              f"time); predicted: graphsplit.costmodel from the measured tables and links; "
              f"ratio = measured / predicted; flag = outside {TOLERANCE:.0%}. Load average "
              f"at start / end: {loadavg[0]:.2f} / {os.getloadavg()[0]:.2f}.",
              caption_justify="left")
    for i, h in enumerate(("B", "pattern", "split", "stages", "m", "tok/s", "pred", "ratio",
                           "err", "flag", "tpot ms", "pred")):
        t.add_column(h, justify="left" if i in (1, 2, 3) else "right", no_wrap=i != 3)
    for r in rows:
        ratio = r["meas_tps"] / r["pred_tps"]
        t.add_row(str(r["B"]), r["pattern"], r["label"], r["stages"], r["m"],
                  f"{r['meas_tps']:.2f}", f"{r['pred_tps']:.2f}", f"{ratio:.2f}",
                  f"{100 * (ratio - 1):+.1f}%", "OUT" if abs(ratio - 1) > TOLERANCE else "",
                  f"{1e3 * r['meas_tpot']:.0f}", f"{1e3 * r['pred_tpot']:.0f}")
    Console(width=200).print(t)
    lines = []
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["B"], r["pattern"]), []).append(r)
    for (B, pattern), rs in groups.items():
        ours = [r for r in rs if r["label"].startswith("ours-throughput")
                or "=ours-throughput" in r["label"]]
        if not ours:
            continue
        o = ours[0]
        for r in rs:
            if r is o or "exo-placement" not in r["label"]:
                continue
            if o["pred_tps"] > r["pred_tps"]:
                ok = o["meas_tps"] > r["meas_tps"]
                lines.append(f"B={B} {pattern}: predicted ours ({o['pred_tps']:.2f}) faster "
                             f"than {r['label']} ({r['pred_tps']:.2f}); measured "
                             f"{o['meas_tps']:.2f} vs {r['meas_tps']:.2f}: "
                             + ("agrees" if ok else "DISAGREES"))
    print("per stage, decode compute measured / predicted ms (median over the steps):")
    for r in rows:
        print(f"  B={r['B']} {r['pattern']} {r['label']}: {r['breakdown']}")
    out = sum(1 for r in rows if abs(r["meas_tps"] / r["pred_tps"] - 1) > TOLERANCE)
    lines.append(f"{len(rows) - out} of {len(rows)} rows within {TOLERANCE:.0%}; {out} outside")
    for ln in lines:
        print(ln)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=str(ROOT / "data" / "bench" / "serve"))
    ap.add_argument("--source", default=str(ROOT / "data" / "bench"),
                    help="bench_testbed's output: its cluster.json and profiles are copied")
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache" / "mlx-split" / MODEL_NAME))
    ap.add_argument("--prompt-tokens", type=int, default=8,
                    help="per stream (default 8: B prompts are prefilled on 0.25-core nodes)")
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument("--streams", default="1,4,8", help="comma-separated B values")
    ap.add_argument("--profile", action="store_true",
                    help="profile every node afresh under its quota instead of copying")
    ap.add_argument("--no-replicas", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="B = 1 and 4, 4 new tokens, no replica rows (about 4 minutes)")
    ap.add_argument("--prefix", default="xbserve")
    args = ap.parse_args(argv)
    why = available()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if args.quick:
        args.streams, args.max_tokens, args.no_replicas = "1,4", 4, True
    Bs = [int(x) for x in args.streams.split(",")]
    P, N = args.prompt_tokens, args.max_tokens
    context = P + N // 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model(Path(args.model_dir))
    spec = TestbedSpec([NodeSpec(n, cpu) for n, cpu, _, _ in NODES],
                       [LinkSpec(a, b, lat, rate) for a, b, lat, rate in LINKS],
                       default_latency_ms=5.0, default_rate_mbit=100, prefix=args.prefix)
    load0 = os.getloadavg()
    log(f"load average before: {load0[0]:.2f} (a shared machine: other work adds noise)")
    steady0 = steadiness()
    log(steady_line(steady0, "at start"))
    rows: list[dict] = []
    record: list[dict] = []
    t_start = time.time()
    with Testbed(spec) as tb:
        from graphsplit.cluster import load_cluster

        cpath = prepare_cluster(out, Path(args.source), tb, model_dir, P, context,
                                args.profile)
        cluster = load_cluster(cpath, calibration=False)
        mspec = model_spec(str(model_dir), None)
        for B in Bs:
            for pattern, runtime, protocol in PATTERNS:
                for label, pipes in splits_for(cluster, cpath, B, runtime, P, context,
                                               not args.no_replicas):
                    log(f"B={B} {pattern}: {label}: " + " | ".join(
                        " ".join(f"{s.node}[{s.start_layer},{s.end_layer})" for s in st)
                        + f" x{n} m{m}" for st, n, m in pipes))
                    try:
                        res = serve_row(tb, cluster, mspec, pipes, pattern, runtime, protocol,
                                        P, N)
                    except Exception as e:
                        log(f"  failed: {e}")
                        continue
                    row = {"B": B, "pattern": pattern, "label": label, **summarise(res),
                           "breakdown": stage_breakdown(res)}
                    rows.append(row)
                    record.append({**row, "runs": [r.to_dict() for r in res]})
                    log(f"  measured {row['meas_tps']:.2f} tok/s, predicted "
                        f"{row['pred_tps']:.2f}")
    steady1 = steadiness()
    lines = print_report(rows, load0)
    print(steady_line(steady0, "at start"))
    print(steady_line(steady1, "at end"))
    (out / "serve-result.json").write_text(json.dumps(
        {"prompt_tokens": P, "max_tokens": N, "context": context, "streams": Bs,
         "wall_s": time.time() - t_start, "loadavg_start": load0,
         "steadiness": [steady0, steady1], "loadavg_end": os.getloadavg(),
         "rows": record, "verdicts": lines}, indent=1, default=str))
    log(f"wrote {out / 'serve-result.json'} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
