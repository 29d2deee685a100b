#!/usr/bin/env python
"""The measured benchmark: our split against exo's on an emulated heterogeneous cluster.

One command (root, Linux; about 10-15 minutes on a 2-core machine):

    python bench/bench_testbed.py

Steps, all real:

1. A llama-shaped model directory with random weights (16 blocks, hidden 1024, float32, vocab
   4096; about 720 MB; several hundred ms per token on these CPUs) is written once under
   `~/.cache/mlx-split/` (`profiler.build.save_model_dir`).
2. The testbed (`exo_bridge.testbed`): 4 nodes with unequal CPU quotas (0.9, 0.5, 0.3, 0.25 of
   a core; they sum under the 2 cores) and unequal links (1-6 ms, 50-1000 Mbit/s), each node in
   its own network namespace and cgroup.
3. Each node is profiled UNDER ITS QUOTA, inside its namespace and cgroup: `profile-model DIR`
   at the benchmark's prompt length and decode context -> `data/bench/profiles/NODE.json`.
4. Every link is measured with `profile-link mlx` (mx.distributed send/recv between the two
   nodes' namespaces and cgroups, the runner's own path) over the emulated path and written
   into the cluster file (`data/bench/cluster.json`); `--link-method tcp` uses plain TCP.
5. exo-legacy's per-message overhead, measured over every link pair with the runner's own paths
   (`exo_bridge.runner.run.measure_message_overhead`: a ping-pong of one decode activation + token
   id, exo-legacy framing against the ring protocol, in the nodes' namespaces and cgroups),
   written into the cluster file's `runtimes` section with where it came from.
6. `graphsplit.api.make_plan` (what `split-model` runs) plans for latency under EACH runtime's
   cost model (mlx-pipeline, exo-legacy, exo-current) -> `data/bench/plan-RUNTIME.json`, with
   the baselines (exo legacy, current exo, even).
7. The runner (`exo_bridge.runner.run.run_stages`) runs, on the testbed, ours under each runtime's
   protocol (`ours@ring`, `ours@exo-legacy`, `ours@exo-current`), each exo baseline under its
   own runtime's protocol and the even split under ours: one process per stage in the stage's
   node (namespace + cgroup), ring hostfiles through the link emulation; measured TPOT / TTFT /
   tokens/s against the predictions of that runtime's cost model.

Prints the table and writes everything to `data/bench/result.json`. `--reuse` keeps existing
profiles and link measurements (re-runs only the splitter and the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_machine import line as steady_line, steadiness  # noqa: E402
from exo_bridge.profile_link import LinkMeasurement, write_link  # noqa: E402
from exo_bridge.runner.run import format_breakdown, format_table, model_spec, run_stages  # noqa: E402
from exo_bridge.testbed.bed import Testbed  # noqa: E402
from exo_bridge.testbed.spec import LinkSpec, NodeSpec, TestbedSpec  # noqa: E402
from exo_bridge.testbed.system import available  # noqa: E402
from graphsplit.plan import write_plan  # noqa: E402

MODEL_CONFIG = {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 16,
                "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4,
                "vocab_size": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                "max_position_embeddings": 2048, "torch_dtype": "float32"}
MODEL_NAME = "bench-llama-16x1024"
GB = 1 << 30
MB = 1 << 20

# id, cpu share, usable memory the splitter fits into, total / available memory exo's placement
# sees. The fast node is a small-RAM machine; the big-RAM machines are slow (the case where a
# memory-proportional split hurts).
NODES = [
    ("fast", 0.9, 400 * MB, 8 * GB),
    ("mid", 0.5, 600 * MB, 16 * GB),
    ("slow", 0.3, 900 * MB, 32 * GB),
    ("slowest", 0.25, 900 * MB, 64 * GB),
]
LINKS = [  # both ways: latency ms, rate Mbit/s
    ("fast", "mid", 1.0, 1000), ("fast", "slow", 2.0, 500), ("fast", "slowest", 4.0, 100),
    ("mid", "slow", 3.0, 200), ("mid", "slowest", 3.0, 200), ("slow", "slowest", 6.0, 50),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_model(d: Path, config: dict | None = None) -> Path:
    """The benchmark's model directory (random float32 weights of `config`, default this
    benchmark's), written once."""
    if (d / "config.json").exists() and (d / "model.safetensors").exists():
        return d
    from profiler.build import save_model_dir

    log(f"writing the benchmark model to {d}")
    return save_model_dir(d, config or MODEL_CONFIG, seed=0)


def profile_node(tb: Testbed, node: str, model_dir: Path, out: Path, prompt: int,
                 context: int, repeats: int = 7, extra: tuple[str, ...] = ()) -> None:
    """profile-model in the node's namespace and cgroup (`extra`: more profile-model flags)."""
    cmd = tb.wrapper(node) + [sys.executable, "-c",
                              "import sys; from profiler.cli import main; sys.exit(main())",
                              str(model_dir), "--out",
                              str(out), "--prefill-tokens", str(prompt), "--decode-context",
                              str(context), "--warmup", "2", "--repeats", str(repeats), "--quiet",
                              "--restart", *extra]
    # Wall clock on purpose: a CPU quota slows a node by throttling, which CPU time never sees
    # (`--clock process` would profile every quota-limited node at full speed).
    cmd += ["--clock", "wall"]
    t = time.time()
    cp = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if cp.returncode != 0:
        raise SystemExit(f"profiling {node} failed: {cp.stderr.strip()[-2000:]}")
    log(f"profiled {node} under its quota in {time.time() - t:.0f} s -> {out}")


def measure_link(tb: Testbed, x: str, y: str, hidden: int, tokens: int,
                 method: str = "mlx") -> LinkMeasurement:
    """One direction of a link measured on the testbed (`method` mlx: the runner's own path,
    see docs; else plain sockets)."""
    if method == "mlx":
        d = tb.measure_link_mlx(x, y, hidden, 4, tokens, repeats=8)
    else:
        d = tb.measure_link(x, y, hidden, 4, tokens, repeats=8)
    return LinkMeasurement(**{k: d[k] for k in ("host", "latency_ms", "bandwidth_gbps", "sizes",
                                                "repeats")})


def record_link(cluster_path: Path, x: str, y: str, m: LinkMeasurement,
                emulated: tuple[float, float]) -> None:
    """Write one direction into the cluster file; log it beside what the testbed emulates
    (latency ms, Mbit/s)."""
    write_link(cluster_path, x, y, m)
    log(f"link {x}->{y}: emulated {emulated[0]} ms {emulated[1]} Mbit/s, measured "
        f"{m.latency_ms:.3f} ms {1e3 * m.bandwidth_gbps:.1f} Mbit/s")


def write_cluster(path: Path, profiles: dict[str, Path]) -> None:
    data = {"model": MODEL_NAME,
            "nodes": [{"id": n, "profile": os.path.relpath(profiles[n], path.parent),
                       "memory_bytes": mem,
                       "total_bytes": tot, "available_bytes": tot}
                      for n, _, mem, tot in NODES],
            "links": [], "default_link": {"latency_ms": 5.0, "bandwidth_gbps": 0.1}}
    path.write_text(json.dumps(data, indent=1))


def write_overhead(tb: Testbed, cluster_path: Path, hidden: int, old: dict) -> None:
    """exo-legacy's per-message overhead into the cluster file's `runtimes` section, measured
    over every testbed link pair with the runner's own two paths (exo_bridge.runner.run.
    measure_message_overhead: a ping-pong of one decode activation + token id, ring protocol
    against the exo-legacy framing, both ranks in their nodes' namespaces and cgroups through
    the link emulation); the mean over the pairs is charged to every message."""
    from exo_bridge.runner.run import measure_message_overhead

    data = json.loads(cluster_path.read_text())
    if old.get("exo-legacy"):
        data["runtimes"] = old
        log(f"exo-legacy message overhead reused: {old['exo-legacy']}")
    else:
        per = {}
        for a, b, *_ in LINKS:
            with tb.ring([a, b]) as ring:
                r = measure_message_overhead(hidden, 40, hosts=ring.hosts,
                                             wrappers=ring.wrappers, hostfiles=ring.hostfiles)
            per[f"{a}-{b}"] = 1e3 * r["message_overhead_s"]
            log(f"exo-legacy message overhead {a}<->{b}: {per[f'{a}-{b}']:.3f} ms (round trip "
                f"ring {1e3 * r['ring_rtt_s']:.2f} ms, exo-legacy {1e3 * r['legacy_rtt_s']:.2f} "
                "ms, medians)")
        m = sum(per.values()) / len(per)
        src = ("measured: exo_bridge.runner.run.measure_message_overhead (ping-pong of one decode "
               "activation + token id, exo-legacy framing against the ring protocol, median "
               "round trips / 2) over the testbed pairs, mean of: "
               + ", ".join(f"{k} {v:.3f} ms" for k, v in per.items()))
        data["runtimes"] = {"exo-legacy": {"message_overhead_ms": round(m, 4), "source": src}}
        log(f"exo-legacy message overhead charged: {m:.3f} ms per message")
    cluster_path.write_text(json.dumps(data, indent=1))


def plan_runs(cluster_path: Path, out: Path, objective: str, P: int, context: int) -> list:
    """A plan per runtime (its own cost model), written to plan-RUNTIME.json; the rows to run:
    ours under each runtime's protocol, each exo baseline under its own runtime's protocol, and
    the even split under ours."""
    from graphsplit.api import make_plan
    from graphsplit.cluster import load_cluster
    from graphsplit.costmodel import Workload
    from graphsplit.plan import stages_from_json

    cluster = load_cluster(cluster_path)
    wl = Workload(prompt_tokens=P, context_tokens=context, streams=1)
    runs = []
    plans = {}
    for runtime, protocol in (("mlx-pipeline", "ring"), ("exo-legacy", "exo-legacy"),
                              ("exo-current", "exo-current")):
        plan = make_plan(cluster, objective, wl, runtime, False)
        plans[runtime] = plan
        write_plan(plan, out / f"plan-{runtime}.json")
        log(f"plan for {runtime}: {[(s.node, s.start_layer, s.end_layer) for s in plan.stages]}")
        runs.append((f"ours@{protocol}", plan.stages, plan.predicted, protocol))
    write_plan(plans["mlx-pipeline"], out / "plan.json")
    for b, runtime, protocol in (("exo-legacy", "exo-legacy", "exo-legacy"),
                                 ("exo-current", "exo-current", "exo-current"),
                                 ("even", "mlx-pipeline", "ring")):
        base = plans[runtime].baselines.get(b)
        if base:
            runs.append((f"{b}@{protocol}", stages_from_json(base["stages"], b),
                         base.get("predicted", {}), protocol))
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=str(ROOT / "data" / "bench"),
                    help="profiles, cluster, plan and result (default data/bench)")
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache" / "mlx-split" / MODEL_NAME),
                    help="where the 720 MB benchmark model is written once (outside the repo)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--reuse", action="store_true", help="keep existing profiles and links")
    ap.add_argument("--objective", default="latency")
    ap.add_argument("--link-method", choices=("mlx", "tcp"), default="mlx",
                    help="profile-link over mx.distributed (the runner's path, default) or TCP")
    ap.add_argument("--runs", type=int, default=3,
                    help="runs per split (round robin); the median-TPOT run is reported")
    ap.add_argument("--prefix", default="xbbench")
    ap.add_argument("--until", choices=("links", "plan", "all"), default="all",
                    help="stop after measuring (links), after planning (plan), or run all")
    args = ap.parse_args(argv)
    why = available()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    (out / "profiles").mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model(Path(args.model_dir))
    P, N = args.prompt_tokens, args.max_tokens
    context = P + N // 2  # the mean KV length a decode step sees
    spec = TestbedSpec([NodeSpec(n, cpu) for n, cpu, _, _ in NODES],
                       [LinkSpec(a, b, lat, rate) for a, b, lat, rate in LINKS],
                       default_latency_ms=5.0, default_rate_mbit=100, prefix=args.prefix)
    cluster_path = out / "cluster.json"
    results = []
    every: dict[str, list] = {}
    log(f"load average before: {os.getloadavg()[0]:.2f} (other work on the machine adds noise; "
        "the testbed's cgroups get a high cpu.shares to keep it off the nodes)")
    steady0 = steadiness()
    log(steady_line(steady0, "at start"))
    with Testbed(spec) as tb:
        log("testbed up: " + ", ".join(f"{n}={tb.ip(n)} cpu {c}" for n, c, _, _ in NODES))
        profiles = {n: out / "profiles" / f"{n}.json" for n, *_ in NODES}
        for n, *_ in NODES:
            if not (args.reuse and profiles[n].exists()):
                profile_node(tb, n, model_dir, profiles[n], P, context)
        before = json.loads(cluster_path.read_text()) if cluster_path.exists() else {}
        old_links = before.get("links", []) if args.reuse else []
        write_cluster(cluster_path, profiles)
        hidden = MODEL_CONFIG["hidden_size"]
        for a, b, lat, rate in LINKS:
            for x, y in ((a, b), (b, a)):
                prev = [lk for lk in old_links if (lk["from"], lk["to"]) == (x, y)]
                if prev:
                    m = LinkMeasurement(host="reused", latency_ms=prev[0]["latency_ms"],
                                        bandwidth_gbps=prev[0]["bandwidth_gbps"],
                                        sizes=prev[0].get("measured", {}).get("sizes", {}))
                else:
                    m = measure_link(tb, x, y, hidden, max(P, 256), args.link_method)
                record_link(cluster_path, x, y, m, (lat, rate))
        write_overhead(tb, cluster_path, hidden, before.get("runtimes", {}) if args.reuse else {})
        if args.until == "links":
            log(f"stopping after the links: {cluster_path}")
            return 0
        runs = plan_runs(cluster_path, out, args.objective, P, context)
        if args.until == "plan":
            return 0
        mspec = model_spec(str(model_dir), None)
        every: dict[str, list] = {label: [] for label, *_ in runs}
        for rep in range(args.runs):  # round robin, so slow drifts of the machine hit all splits
            for label, stages, pred, protocol in runs:
                order = [s.node for s in stages]
                log(f"running {label} ({rep + 1}/{args.runs}): " + " ".join(
                    f"{s.node}[{s.start_layer},{s.end_layer})" for s in stages))
                with tb.ring(order) as ring:
                    r = run_stages(stages, mspec, P, N, label=label, predicted=pred,
                                   hosts=ring.hosts, hostfiles=ring.hostfiles,
                                   wrappers=ring.wrappers, timeout_s=900, protocol=protocol)
                every[label].append(r)
                log(f"{label}: tpot {1e3 * r.tpot_s:.1f} ms (pred "
                    f"{1e3 * pred.get('tpot_s', float('nan')):.1f}), ttft {1e3 * r.ttft_s:.1f} ms")
        for label, *_ in runs:  # the run with the median time per token represents the split
            rs = sorted(every[label], key=lambda x: x.tpot_s)
            results.append(rs[len(rs) // 2])
    table = format_table(results)
    details = "\n".join(format_breakdown(r) for r in results)
    details += "\n" + "\n".join(
        f"{label}: every run tpot ms " + ", ".join(f"{1e3 * x.tpot_s:.1f}" for x in rs)
        + "; ttft ms " + ", ".join(f"{1e3 * x.ttft_s:.0f}" for x in rs)
        for label, rs in every.items())
    steady1 = steadiness()
    print(table)
    print()
    print(details)
    print(steady_line(steady0, "at start"))
    print(steady_line(steady1, "at end"))
    (out / "result.json").write_text(json.dumps(
        {"loadavg_at_end": os.getloadavg(), "steadiness": [steady0, steady1], "prompt_tokens": P, "max_tokens": N, "context": context, "nodes": NODES,
         "links": LINKS, "table": table, "breakdown": details, "results": [r.to_dict() for r in results],
         "all_runs": {k: [x.to_dict() for x in v] for k, v in every.items()}}, indent=1))
    log(f"wrote {out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
