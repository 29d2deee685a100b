"""Discrete-event replay of a plan: requests arrive, prefill, decode through the ring of stages.

Model (the same semantics as graphsplit.costmodel; exo-current, whose all-gather lets one step
run at a time, is one server serving a token in tpot and a prompt in ttft): each stage is one server with a FIFO queue;
a job (a prompt's prefill, or one decode token of one stream) occupies stage s for its compute
time plus its outgoing transfer (synchronous send; the last stage sends the token id back to the
first), then joins stage s+1's queue. A stream's next token enters stage 0 when its previous token
has come back. At most `streams` requests are in flight; the others wait. Service times come from
the measured tables (decode at the context length, prefill at the prompt length).

Complexity O(E log E) for E = requests x (new_tokens + 1) x stages events.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import asdict, dataclass, field
from typing import Sequence

from graphsplit.costmodel import Workload, predict
from graphsplit.plan import Stage


@dataclass
class SimResult:
    requests: int
    ttft_s: float  # mean time from arrival to the first token
    tpot_s: float  # mean gap between a stream's consecutive tokens
    throughput_tps: float  # decode tokens / s while every stream is decoding (steady state)
    overall_tps: float  # all generated tokens / makespan
    makespan_s: float
    utilisation: dict[str, float]  # compute-busy fraction of the makespan, per node
    busy: dict[str, float] = field(default_factory=dict)  # compute + send fraction

    def to_dict(self):
        return asdict(self)


def simulate(cluster, stages: Sequence[Stage], workload: Workload = Workload(),
             runtime: str = "exo-current", requests: int | None = None, new_tokens: int = 32,
             arrival_rate: float | None = None, seed: int = 0) -> SimResult:
    """Replay `stages` on `requests` requests (default: one per stream), each generating
    `new_tokens` tokens; arrivals all at t = 0, or Poisson at `arrival_rate` per second."""
    stages = list(stages)
    S = len(stages)
    B = workload.streams
    n_req = requests if requests is not None else B
    pr = predict(cluster, stages, workload, runtime)
    nodes = [s.node for s in stages]
    if runtime == "exo-current":
        # the all-gather is a barrier every step: the ring serves one job at a time, a decode
        # token in tpot and a prompt in ttft (one server standing for every node)
        res = _replay(1, B, n_req, [pr.tpot_s], [0.0], [pr.ttft_s], [0.0], new_tokens,
                      _arrivals(n_req, arrival_rate, seed))
        share = {n: pr.stage_compute_s[n] / pr.tpot_s if pr.tpot_s else 0.0 for n in nodes}
        res.utilisation = {n: res.busy["0"] * share[n] for n in nodes}
        res.busy = {n: res.busy["0"] for n in nodes}
        return res
    P = workload.prompt_tokens
    m = pr.message_overhead_s
    dec_comp = [pr.stage_compute_s[n] for n in nodes]
    dec_send = [pr.stage_link_s[n] for n in nodes]
    pf_comp = [pr.stage_prefill_s[n] for n in nodes]
    pf_send = []
    for i, s in enumerate(stages):
        if S == 1:
            pf_send.append(0.0)
        elif i < S - 1:
            e = cluster.node(s.node).table.row(f"layers.{s.end_layer - 1}").activation_bytes_per_token
            pf_send.append(cluster.link(s.node, stages[i + 1].node).time(P * e) + m)
        else:
            pf_send.append(cluster.link(s.node, stages[0].node).time(workload.token_bytes) + m)
    res = _replay(S, B, n_req, dec_comp, dec_send, pf_comp, pf_send, new_tokens,
                  _arrivals(n_req, arrival_rate, seed))
    res.utilisation = {n: res.utilisation[str(i)] for i, n in enumerate(nodes)}
    res.busy = {n: res.busy[str(i)] for i, n in enumerate(nodes)}
    return res


def _arrivals(n_req: int, arrival_rate: float | None, seed: int) -> list[float]:
    rnd = random.Random(seed)
    arrivals = []
    t = 0.0
    for r in range(n_req):
        if arrival_rate:
            t += rnd.expovariate(arrival_rate)
        arrivals.append(t)
    return arrivals


def _replay(S, B, n_req, dec_comp, dec_send, pf_comp, pf_send, new_tokens, arrivals
            ) -> SimResult:
    """The event loop over S FIFO servers (stage i keyed "i" in utilisation / busy)."""
    # events: (time, seq, kind, request, stage); kinds: "arrive", "enter", "done"
    ev: list = []
    seq = 0

    def push(time, kind, req, st):
        nonlocal seq
        heapq.heappush(ev, (time, seq, kind, req, st))
        seq += 1

    for r, a in enumerate(arrivals):
        push(a, "arrive", r, 0)
    waiting: list[int] = []  # admitted later (more than B in flight)
    in_flight = 0
    queues: list[list] = [[] for _ in range(S)]  # heap of (enqueue time, seq, req)
    free = [True] * S
    produced = [0] * n_req  # tokens produced per request (the first by prefill)
    token_times: list[list[float]] = [[] for _ in range(n_req)]
    comp_busy = [0.0] * S
    all_busy = [0.0] * S
    qseq = 0

    def enqueue(st, req, now):
        nonlocal qseq
        heapq.heappush(queues[st], (now, qseq, req))
        qseq += 1
        start_if_free(st, now)

    def start_if_free(st, now):
        if free[st] and queues[st]:
            _, _, req = heapq.heappop(queues[st])
            free[st] = False
            prefill = produced[req] == 0
            c = pf_comp[st] if prefill else dec_comp[st]
            sd = pf_send[st] if prefill else dec_send[st]
            comp_busy[st] += c
            all_busy[st] += c + sd
            push(now + c + sd, "done", req, st)

    end = 0.0
    while ev:
        now, _, kind, req, st = heapq.heappop(ev)
        end = max(end, now)
        if kind == "arrive":
            if in_flight < B:
                in_flight += 1
                enqueue(0, req, now)
            else:
                waiting.append(req)
        elif kind == "done":
            free[st] = True
            if st < S - 1:
                enqueue(st + 1, req, now)
            else:
                produced[req] += 1
                token_times[req].append(now)
                if produced[req] < new_tokens:
                    enqueue(0, req, now)
                else:
                    in_flight -= 1
                    if waiting:
                        in_flight += 1
                        enqueue(0, waiting.pop(0), now)
            start_if_free(st, now)
    ttft = sum(tt[0] - a for tt, a in zip(token_times, arrivals)) / n_req
    gaps = [b - a for tt in token_times for a, b in zip(tt, tt[1:])]
    tpot = sum(gaps) / len(gaps) if gaps else 0.0
    # steady state: from the last first-token to the first last-token of the first B requests
    first_wave = token_times[:min(B, n_req)]
    lo = max(tt[0] for tt in first_wave)
    hi = min(tt[-1] for tt in first_wave)
    if hi > lo:
        n = sum(1 for tt in token_times for x in tt if lo < x <= hi)
        thr = n / (hi - lo)
    else:
        thr = 1 / tpot if tpot else 0.0
    total = sum(len(tt) for tt in token_times)
    return SimResult(requests=n_req, ttft_s=ttft, tpot_s=tpot, throughput_tps=thr,
                     overall_tps=total / end if end else 0.0, makespan_s=end,
                     utilisation={str(i): comp_busy[i] / end for i in range(S)},
                     busy={str(i): all_busy[i] / end for i in range(S)})
