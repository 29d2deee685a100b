"""`profile-link collective`: measure the all-reduce of a tensor-parallel group on mx.distributed.

A tensor-parallel stage does two all-reduces (sums) of its hidden state per block: a decode step
sums (1, 1, hidden) activations, a prefill (1, P, hidden). This measures, over the group's own
ranks (one process per node, the ring backend over TCP; loopback with `--local`, the testbed's
namespaces and link emulation through `measure_collective(hostfiles=, wrappers=)`):

- `all_sum`: `mx.distributed.all_sum` over the whole group (what a pure tensor plan runs, and
  what a backend with `Group.split` runs on a sub-group);
- `chain`: the runner's neighbour-chain all-reduce (exo_bridge.runner.tensor.Collective: reduce
  along the chain, broadcast back, 2 (k - 1) hops), which a group INSIDE a pipeline runs on the
  ring backend (no `Group.split`).

Sizes: one token's activation (hidden x activation bytes), one prompt's (prompt_tokens x hidden x
activation bytes) and their geometric mean. `warmup` untimed rounds, then `repeats` timed ones,
each round every size and both algorithms once (round robin), each call after a barrier and
`gap_ms` idle (a decode step's all-reduce follows compute);
rank 0 keeps the median and the spread ((max - min) / median, the cost table's definition).
From the smallest and largest size: bandwidth_Bps = (n_max - n_min) / (t_max - t_min),
latency_s = t_min - n_min / bandwidth_Bps (clipped at 0), the cost model's alpha + n / beta.

Written into the cluster file's `collectives` (format I3 in the round's interfaces: one entry per
sorted node set and op, replaced in place, under the file's lock, atomically, every other key
kept). The entry's `seconds` / `latency_s` / `bandwidth_Bps` are the algorithm the runner uses
on that backend (`algorithm`: "neighbour-chain" on ring); the other one is kept beside it as an
extra optional member (`mlx_all_sum` on ring, `chain` elsewhere). Why the chain on ring: see
exo_bridge/runner/tensor.py (it sleeps in select() where MLX's ring all_sum spins).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from profiler.errors import UserError
from profiler.files import atomic_write_json, locked

COLL_TAG = "PROFILE_LINK_COLLECTIVE "
OP = "all_sum"


def collective_sizes(hidden: int, dtype_bytes: int, prompt_tokens: int) -> list[int]:
    """Decode message, prefill message and their geometric mean, bytes (sorted, distinct)."""
    tok = hidden * dtype_bytes
    pre = prompt_tokens * tok
    mid = int(math.sqrt(tok * pre)) // 4 * 4
    return sorted({tok, max(tok, mid), pre})


def busy(seconds: float) -> None:
    """Compute (small matmuls) for `seconds` of wall time, as a rank computes its share of a
    block before the block's all-reduce. Under a CPU quota (the testbed's nodes) this spends the
    quota as the run does, so the all-reduce pays the same throttling and wake-ups."""
    import mlx.core as mx

    a = mx.ones((64, 64))
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        mx.eval(a @ a)


def _time_once(op, x, gap_s: float, barrier, busy_s: float = 0.0) -> float:
    import mlx.core as mx

    barrier()
    if gap_s:
        time.sleep(gap_s)
    if busy_s:
        busy(busy_s)
    t0 = time.perf_counter()
    mx.eval(op(x))
    return time.perf_counter() - t0


def rank_program(sizes: list[int], repeats: int, warmup: int, gap_s: float,
                 backend: str = "ring", busy_s: float = 0.0) -> dict[str, Any] | None:
    """Run in each of the group's processes (MLX_HOSTFILE / MLX_RANK set). Rank 0 returns
    {"k", "sizes_bytes", "all_sum": {"seconds", "spread"}, "chain": {...}}, the others None.

    Round robin: each repeat times every size with both algorithms once, so a slow spell of a
    shared machine hits all of them alike instead of one size (measured on the loaded testbed
    with one size after another: medians 1.8 / 9.4 / 1.7 ms for 4 / 12 / 32 KiB)."""
    import mlx.core as mx

    from exo_bridge.runner.stage_worker import ring_socket_fds
    from exo_bridge.runner.tensor import Collective

    g = mx.distributed.init(backend=backend, strict=True)
    k, r = g.size(), g.rank()
    if k < 2:
        raise UserError(f"profile-link collective needs a group of at least 2 ranks, got {k}")
    chain = Collective(g, list(range(k)), r, "chain", fds=ring_socket_fds())
    ones = mx.array([1.0])

    def barrier():  # the chain's own select()-wait: no rank spins before the timed call
        chain(ones)
        chain.seconds.clear()

    algos = {"all_sum": lambda x: mx.distributed.all_sum(x, group=g), "chain": chain}
    xs = [mx.ones((max(1, int(n) // 4),), dtype=mx.float32) for n in sizes]
    mx.eval(xs)
    times = {(name, i): [] for name in algos for i in range(len(xs))}
    for rep in range(warmup + repeats):
        for i, x in enumerate(xs):
            for name, op in algos.items():
                t = _time_once(op, x, gap_s, barrier, busy_s)
                if rep >= warmup:
                    times[name, i].append(t)
    res: dict[str, Any] = {"k": k, "sizes_bytes": [int(x.nbytes) for x in xs],
                           "repeats": repeats, "gap_ms": 1e3 * gap_s, "busy_ms": 1e3 * busy_s}
    for name in algos:
        ts = [times[name, i] for i in range(len(xs))]
        meds = [statistics.median(t) for t in ts]
        res[name] = {"seconds": meds, "min": [min(t) for t in ts], "max": [max(t) for t in ts],
                     "spread": [(max(t) - min(t)) / m if m > 0 else 0.0 for t, m in zip(ts, meds)]}
    return res if r == 0 else None


def fit_alpha_beta(sizes: list[int], seconds: list[float]) -> tuple[float, float | None]:
    """(latency_s, bandwidth_Bps) of t = alpha + n / beta, least squares over the sizes;
    bandwidth None when time does not grow with size (messages too small to tell: give a
    longer --prompt-tokens), alpha then the mean time. alpha is clipped at 0."""
    n = len(sizes)
    mx_, mt = sum(sizes) / n, sum(seconds) / n
    var = sum((x - mx_) ** 2 for x in sizes)
    slope = sum((x - mx_) * (t - mt) for x, t in zip(sizes, seconds)) / var if var else 0.0
    if slope <= 0:
        return mt, None
    return max(0.0, mt - slope * mx_), 1.0 / slope


def _fitted(d: dict[str, Any], sizes: list[int]) -> dict[str, Any]:
    lat, bw = fit_alpha_beta(sizes, d["seconds"])
    out = {"seconds": [round(x, 9) for x in d["seconds"]],
           "spread": [round(x, 4) for x in d["spread"]], "latency_s": round(lat, 9)}
    if bw is None:  # no growth with size: the largest message's rate is a lower bound
        bw = sizes[-1] / max(d["seconds"][-1], 1e-9)
        out["bandwidth_note"] = ("lower bound (largest size / its time): the time did not "
                                 "grow with the size; measure with a longer --prompt-tokens")
    out["bandwidth_Bps"] = round(bw, 1)
    return out


def entry_from(res: dict[str, Any], nodes: list[str], backend: str) -> dict[str, Any]:
    """The cluster file's `collectives` entry (format I3) of a rank-0 result.

    `seconds` etc. are the all-reduce AS THE RUNNER PERFORMS IT on this backend (ring: the
    neighbour chain, `"algorithm"` says so); `mlx_all_sum` keeps mx.distributed.all_sum's own
    numbers beside it (the runner's path for a pure tensor plan given `collective: all_sum`, and
    on backends with Group.split)."""
    sizes = res["sizes_bytes"]
    primary, other = ("chain", "all_sum") if backend == "ring" else ("all_sum", "chain")
    e: dict[str, Any] = {"nodes": list(nodes), "op": OP, "backend": backend,
                         "sizes_bytes": sizes, **_fitted(res[primary], sizes),
                         "algorithm": "neighbour-chain" if primary == "chain" else "all_sum",
                         "repeats": res.get("repeats"), "gap_ms": res.get("gap_ms"),
                         "busy_ms": res.get("busy_ms"),
                         "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    e["mlx_all_sum" if other == "all_sum" else "chain"] = _fitted(res[other], sizes)
    return e


# ----------------------------------------------------------------------------- processes


def rank_args(sizes: list[int], repeats: int, gap_ms: float, backend: str,
              busy_ms: float = 0.0) -> list[str]:
    """The `profile-link collective --rank-from-env` arguments of one rank."""
    return ["--sizes", json.dumps({str(n): n for n in sizes}), "--repeats", str(repeats),
            "--gap-ms", str(gap_ms), "--backend", backend, "--busy-ms", str(busy_ms)]


def measure_collective(k: int, sizes: list[int], *, hostfiles: list[str] | None = None,
                       wrappers: list[list[str]] | None = None, repeats: int = 10,
                       gap_ms: float = 5.0, timeout_s: float = 180.0,
                       backend: str = "ring", busy_ms: float = 0.0) -> dict[str, Any]:
    """Start the group's k ranks on this machine (loopback by default; the testbed passes
    per-rank hostfiles and namespace wrappers) and return rank 0's result. A rank that fails or
    a run past timeout_s is one UserError line naming the rank and its log."""
    from exo_bridge.profile_link import rank0_result, run_ranks_here

    outs = run_ranks_here("collective", rank_args(sizes, repeats, gap_ms, backend, busy_ms), k,
                          hostfiles, wrappers, timeout_s)
    return rank0_result(outs[0], COLL_TAG, "collective")


# ---------------------------------------------------------------------------- cluster file


def write_collective(cluster_path: str | Path, entry: dict[str, Any],
                     wait_s: float = 60.0) -> dict[str, Any]:
    """Put `entry` into the cluster file's `collectives`, replacing the entry of the same
    sorted node set and op; read-modify-write under the file's lock, atomic, every other key
    and entry kept. The file is checked field by field first; unknown nodes are refused."""
    path = Path(cluster_path)
    with locked(path, f"cluster file {path}", wait_s=wait_s):
        data = read_cluster_for_group(path, entry["nodes"])
        key = (tuple(sorted(entry["nodes"])), entry["op"])
        kept = [c for c in data.get("collectives") or []  # field-checked: a list of entries
                if (tuple(sorted(c["nodes"])), c["op"]) != key]
        data["collectives"] = kept + [entry]
        atomic_write_json(path, data, what=f"cluster file {path}")
    return entry


def read_cluster_for_group(cluster_path: str | Path, nodes: list[str]) -> dict[str, Any]:
    """The parsed, field-checked cluster file, with every node of the group in it."""
    from exo_bridge.profile_link import read_cluster_with

    return read_cluster_with(cluster_path, [("--nodes", x) for x in nodes])


def report(entry: dict[str, Any]) -> str:
    """Measured medians per size, both algorithms, and the fitted alpha / beta."""
    def fit(d):
        how = "lower bound" if d.get("bandwidth_note") else "fitted"
        return (f"latency {1e3 * d['latency_s']:.3f} ms (fitted), bandwidth "
                f"{d['bandwidth_Bps'] / 1e6:.1f} MB/s ({how})")

    other = entry.get("mlx_all_sum") or entry.get("chain")
    oname = "mx all_sum" if "mlx_all_sum" in entry else "chain"
    lines = [f"all-reduce over {', '.join(entry['nodes'])} ({entry['backend']} backend, "
             f"the runner's {entry['algorithm']}): {fit(entry)}; {oname}: {fit(other)}",
             f"  {'bytes':>10}  {entry['algorithm'] + ' ms':>22}  {oname + ' ms':>22}"
             "   (measured medians, spread = (max - min) / median)"]
    for i, n in enumerate(entry["sizes_bytes"]):
        lines.append(f"  {n:>10}  {1e3 * entry['seconds'][i]:11.3f} ({entry['spread'][i]:5.2f})"
                     f"     {1e3 * other['seconds'][i]:11.3f} ({other['spread'][i]:5.2f})")
    return "\n".join(lines)
