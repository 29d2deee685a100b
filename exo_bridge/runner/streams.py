"""Many streams through one pipeline: the runtime batching patterns, run for real and measured.

Two patterns (plan field `serving.pattern`, INTERFACES I5), both run by every rank in the same
order, so every message on a link arrives in the order it is expected:

* ``batch-through`` (current exo, `ExoBatchGenerator`): one batch of up to `max_batch` streams
  (exo's `EXO_MAX_CONCURRENT_REQUESTS`, default 8) crosses all stages together, one step after
  the other with no overlap; more streams than `max_batch` wait and run as the next batch (a
  queued request joins when a slot frees; with equal lengths that is a wave). Under
  `--protocol exo-current` each batch also runs exo's per-token protocol: exo's prefill
  sequence over the whole batch, the last hidden state all-gathered every decode step, the head
  on every rank.
* ``micro-batch`` (ours, mlx-pipeline / ring): the B streams in ceil(B / m) micro-batches of m,
  each micro-batch with its own KV caches on every stage; rank 0 sends micro-batch j on as soon
  as it has embedded it, so stage s works on micro-batch j while stage s + 1 works on j - 1, and
  the last rank's token ids for j come back to rank 0 while the others are in flight (the
  existing send / recv to the ring neighbour, nothing else). The all-gather of exo-current is
  a barrier every step, so micro-batches cannot overlap under it: refused.

Prompts: B distinct deterministic prompts of the SAME length P (`stream_prompts`), so a batch
needs no padding or per-stream masks; the greedy tokens of every stream equal a single-stream
generation of its prompt (tests/test_runner_streams.py checks it against one process).

Measured (rank 0's clock, from the barrier that starts the run; every stream is submitted at
that instant): per stream the arrival time of each token, hence TTFT (first arrival) and TPOT
((last - first) / (n - 1)); aggregate decode tokens/s over steady decoding (`steady_decode`:
per wave, the tokens arriving after every stream has its first token and before the first one
ends, over that time: the rate the cost model's throughput is); and end-to-end tokens/s = B N /
the last arrival. Per rank: the compute of every pass (input
available -> output evaluated) with its phase and batch size, for `--calibrate`.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

PATTERNS = ("batch-through", "micro-batch")
DEFAULT_MAX_BATCH = 8  # exo: EXO_MAX_CONCURRENT_REQUESTS default (src/exo/shared/constants.py)


# ------------------------------------------------------------------------------- schedule


def stream_prompts(vocab_size: int, n: int, streams: int, seed: int = 0) -> list[list[int]]:
    """`streams` distinct deterministic prompts of n token ids each (stream 0 is the
    single-stream prompt `run.make_prompt(vocab, n, seed)`)."""
    out: list[list[int]] = []
    s = seed
    while len(out) < streams:
        rng = random.Random(s)
        p = [rng.randrange(vocab_size) for _ in range(n)]
        if p not in out or s - seed > 64 * streams:  # (a tiny vocab and n may run out)
            out.append(p)
        s += 1
    return out


def waves(streams: int, pattern: str, micro_batch: int, max_batch: int) -> list[list[list[int]]]:
    """The schedule as stream indices: a list of waves (run one after the other), each a list
    of micro-batches that are in flight together.

    batch-through: waves of min(B, max_batch) streams, one batch each (no overlap);
    micro-batch: one wave of ceil(B / m) micro-batches of m (the last may be smaller)."""
    idx = list(range(streams))
    if pattern == "batch-through":
        return [[idx[i:i + max_batch]] for i in range(0, streams, max_batch)]
    if pattern == "micro-batch":
        return [[idx[i:i + micro_batch] for i in range(0, streams, micro_batch)]]
    raise ValueError(f"pattern {pattern!r} is not one of {', '.join(PATTERNS)}")


# ----------------------------------------------------------------------- worker (one rank)


class _Record:
    """Rank 0's view: each stream's tokens and their arrival times since the start."""

    def __init__(self, streams: int, t0: float):
        self.t0 = t0
        self.tokens: list[list[int]] = [[] for _ in range(streams)]
        self.times: list[list[float]] = [[] for _ in range(streams)]

    def add(self, members: list[int], ids: list[int]) -> None:
        t = time.perf_counter() - self.t0
        for i, tok in zip(members, ids):
            self.tokens[i].append(int(tok))
            self.times[i].append(t)


def pipeline_wave(stage, prompts: list[list[int]], mbs: list[list[int]], max_tokens: int,
                  rec: _Record | None) -> None:
    """One wave of micro-batches `mbs` through the ring / exo-legacy pipeline (see the module
    docstring). Every rank runs the same passes in the same order: prefill of micro-batch 0..M-1,
    then per decode step micro-batch 0..M-1; rank 0 receives micro-batch j's ids just before
    it needs them, so the other micro-batches stay in flight meanwhile."""
    caches = [stage.new_caches() for _ in mbs]
    P = len(prompts[mbs[0][0]])
    back = stage.first and not stage.last  # rank 0 waits for the last rank's ids
    cur: list[list[int] | None] = [None] * len(mbs)

    def done(j, tok):
        cur[j] = [int(t) for t in tok.tolist()]
        if rec is not None:
            rec.add(mbs[j], cur[j])

    for j, mb in enumerate(mbs):
        tok = stage.advance([prompts[i] for i in mb] if stage.first else None, P, caches[j],
                            len(mb), "prefill")
        if stage.first and stage.last:
            done(j, tok)
    for _ in range(1, max_tokens):
        for j, mb in enumerate(mbs):
            if back:
                done(j, stage.recv_tokens(len(mb)))
            tok = stage.advance([[t] for t in cur[j]] if stage.first else None, 1, caches[j],
                                len(mb), "decode")
            if stage.first and stage.last:
                done(j, tok)
    if back:
        for j, mb in enumerate(mbs):
            done(j, stage.recv_tokens(len(mb)))


def exo_current_wave(stage, prompts: list[list[int]], mb: list[int], max_tokens: int,
                     rec: _Record | None) -> None:
    """One batch under current exo's protocol: exo's prefill sequence (prompt[:-1], prompt[-1]
    without the all-gather, caches trimmed by 2, a barrier, the last two prompt tokens again
    with it) over the whole batch, then decode with the all-gather and the head on every rank.
    Every rank samples (and records) the same ids."""
    import mlx.core as mx

    stage.caches = stage.new_caches()
    batch = [prompts[i] for i in mb]
    k = len(stage.passes)
    stage.exo_current_pass([p[:-1] for p in batch], gather=False)
    stage.exo_current_pass([p[-1:] for p in batch], gather=False)
    for c in stage.caches:
        c.trim(2)
    if stage.group is not None:
        mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=stage.group))
    stage.exo_current_pass([p[-2:-1] for p in batch], gather=True)
    cur = stage.exo_current_pass([p[-1:] for p in batch], gather=True)
    stage.passes[k:] = [("ttft", len(mb))] * (len(stage.passes) - k)  # up to the first token
    if rec is not None:
        rec.add(mb, cur)
    for _ in range(1, max_tokens):
        cur = stage.exo_current_pass([[t] for t in cur], gather=True)
        if rec is not None:
            rec.add(mb, cur)


def run_schedule(stage, prompts: list[list[int]], sched: list[list[list[int]]],
                 max_tokens: int, rec: _Record | None) -> None:
    for mbs in sched:
        if stage.protocol == "exo-current":
            for mb in mbs:  # batch-through only (checked by the host)
                exo_current_wave(stage, prompts, mb, max_tokens, rec)
        else:
            pipeline_wave(stage, prompts, mbs, max_tokens, rec)


def serve(stage, job: dict[str, Any], load_s: float) -> dict[str, Any]:
    """A rank's whole serving run: warm-up of the same schedule (short prompts, a few tokens;
    caches and timings then dropped), a barrier, the measured run. Returns this rank's result
    (rank 0, and every rank under exo-current: each stream's tokens and arrival times)."""
    import mlx.core as mx

    prompts = job["prompts"]
    sched = waves(len(prompts), job["pattern"], int(job["micro_batch"]), int(job["max_batch"]))
    wp, wt = int(job.get("warmup_prompt", 8)), int(job.get("warmup_tokens", 2))
    if wt > 0:
        short = [p[: max(2, min(wp, len(p)))] for p in prompts]
        run_schedule(stage, short, sched, wt, None)
    stage.reset()
    if stage.group is not None:
        mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=stage.group))  # barrier
    samples = stage.first or stage.protocol == "exo-current"
    rec = _Record(len(prompts), time.perf_counter()) if samples else None
    run_schedule(stage, prompts, sched, int(job["max_tokens"]), rec)
    res: dict[str, Any] = {
        "rank": stage.rank, "stage": [stage.start, stage.end], "load_s": load_s,
        "protocol": stage.protocol, "pattern": job["pattern"],
        "passes": [[ph, b, c, w] for (ph, b), c, w in zip(stage.passes, stage.compute_s,
                                                          stage.wait_s)],
        "head_s": stage.head_s, "message_s": stage.message_s,
        "peak_memory_bytes": mx.get_peak_memory(),
    }
    if rec is not None:
        res["streams"] = [{"tokens": t, "times_s": x} for t, x in zip(rec.tokens, rec.times)]
    return res


# ----------------------------------------------------------------------- host: the numbers


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def pct_errors(measured: dict[str, float | None],
               predicted: dict[str, Any]) -> dict[str, float | None]:
    """(measured - predicted) / predicted in percent, per key (None where either is missing)."""
    out: dict[str, float | None] = {}
    for k, x in measured.items():
        p = predicted.get(k)
        out[k] = (100.0 * (x - p) / p) if (x is not None and p) else None
    return out


@dataclass
class ServeResult:
    """One multi-stream run, measured (rank 0's clock), beside the prediction."""
    label: str
    stages: list  # graphsplit.plan.Stage
    pattern: str
    protocol: str
    streams: int
    micro_batch: int
    max_batch: int
    prompt_tokens: int
    max_tokens: int
    tokens: list[list[int]]  # per stream
    times_s: list[list[float]]  # per stream: arrival of each token since the start
    predicted: dict[str, Any] = field(default_factory=dict)
    ranks: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def schedule(self) -> list[list[list[int]]]:
        return waves(self.streams, self.pattern, self.micro_batch, self.max_batch)

    def measured(self) -> dict[str, Any]:
        """TTFT / TPOT per stream, their medians and spreads, and the aggregate rates."""
        ttft = [t[0] for t in self.times_s]
        tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in self.times_s if len(t) > 1]
        n_decode, busy = steady_decode(self.times_s, self.schedule)
        end = max(t[-1] for t in self.times_s)
        med = _median(tpot)
        return {
            "throughput_tps": (n_decode / busy) if busy > 0 else None,
            "end_to_end_tps": sum(len(t) for t in self.times_s) / end if end > 0 else None,
            "tpot_s": med, "tpot_min_s": min(tpot) if tpot else None,
            "tpot_max_s": max(tpot) if tpot else None,
            "tpot_spread": ((max(tpot) - min(tpot)) / med) if med else None,
            "ttft_s": _median(ttft), "ttft_min_s": min(ttft), "ttft_max_s": max(ttft),
            "per_stream_ttft_s": ttft, "per_stream_tpot_s": tpot,
        }

    def errors_pct(self) -> dict[str, float | None]:
        m = self.measured()
        return pct_errors({k: m.get(k) for k in ("throughput_tps", "tpot_s", "ttft_s")},
                          self.predicted)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = [asdict(s) for s in self.stages]
        d["measured"] = self.measured()
        d["error_pct"] = self.errors_pct()
        return d


def steady_decode(times_s: list[list[float]], schedule) -> tuple[int, float]:
    """(tokens, seconds) of steady decoding, wave by wave: from the instant every stream of
    the wave has its first token (T0: later micro-batches' prefills are over) to the first
    instant one of them has its last (T1: none has drained yet), the tokens arriving in
    (T0, T1]. Between two arrivals of a periodic schedule this is exactly its rate. A wave too
    short to have such a window (N too small for its micro-batches) counts from its first
    arrival to its last instead."""
    tokens, busy = 0, 0.0
    for wave in schedule:
        members = [i for mb in wave for i in mb]
        t0 = max(times_s[i][0] for i in members)
        t1 = min(times_s[i][-1] for i in members)
        n = sum(1 for i in members for x in times_s[i] if t0 < x <= t1)
        if t1 <= t0 or n == 0:
            t0 = min(times_s[i][0] for i in members)
            t1 = max(times_s[i][-1] for i in members)
            n = sum(len(times_s[i]) - 1 for i in members)
        tokens, busy = tokens + n, busy + (t1 - t0)
    return tokens, busy


# --------------------------------------------------------------------------------- report


def ms_text(x) -> str:
    return "-" if x is None else f"{1e3 * x:.1f}"


def pct_text(x) -> str:
    return "-" if x is None else f"{x:+.1f}%"


def _f(x, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def table_rows(results: list[ServeResult]) -> tuple[list[str], list[list[str]]]:
    head = ["split", "stages", "pattern", "B", "m", "tok/s", "pred", "err", "tpot ms",
            "spread", "pred", "err", "ttft ms", "pred", "err"]
    rows = []
    for r in results:
        m, p, e = r.measured(), r.predicted, r.errors_pct()
        st = " ".join(f"{s.node}:{s.start_layer}-{s.end_layer}" for s in r.stages)
        mb = r.micro_batch if r.pattern == "micro-batch" else min(r.streams, r.max_batch)
        rows.append([r.label, st, f"{r.pattern}@{r.protocol}", str(r.streams), str(mb),
                     _f(m["throughput_tps"]), _f(p.get("throughput_tps")),
                     pct_text(e["throughput_tps"]), ms_text(m["tpot_s"]),
                     "-" if m["tpot_spread"] is None else f"{100 * m['tpot_spread']:.0f}%",
                     ms_text(p.get("tpot_s")), pct_text(e["tpot_s"]), ms_text(m["ttft_s"]),
                     ms_text(p.get("ttft_s")), pct_text(e["ttft_s"])])
    return head, rows


def print_table(results: list[ServeResult], title: str, caption: str = "") -> None:
    """A rich table on stdout: measured aggregate tokens/s, per-stream TPOT (median, spread =
    (max - min) / median over the streams), TTFT (median), each beside the prediction."""
    from rich.console import Console
    from rich.table import Table

    head, rows = table_rows(results)
    t = Table(title=title, caption=caption or None, caption_justify="left")
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i < 3 else "right", no_wrap=True)
    for row in rows:
        t.add_row(*row)
    width = sum(max(len(h), *(len(r[i]) for r in rows)) + 3 for i, h in enumerate(head))
    Console(width=max(100, width + 4)).print(t)
