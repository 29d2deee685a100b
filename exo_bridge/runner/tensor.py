"""Hybrid plans on mx.distributed: tensor-parallel groups with unequal shares inside a pipeline.

A hybrid plan is a pipeline of stages; a stage may be a tensor-parallel group (the plan's
`tensor` member: `{"nodes": [...], "kv_heads": [...], "mlp_columns": [...]}`). Each member of a
group holds a SLICE of every block of the stage (`profiler.tpslice.slice_block`, the same cut
`profile-model --tp-shares` times):

- attention: its whole KV heads [h0, h1) and their q_per_kv query heads each — the q/k/v rows
  of those heads and the o_proj COLUMNS that read them;
- MLP: its columns [c0, c1) of the intermediate size — gate/up rows, down_proj columns.

o_proj and down_proj then produce PARTIAL hidden states whose sum is the full one: the two
all-reduces per block (as mlx-lm's `shard()` places them). A bias of o_proj / down_proj is added
once, after the sum; the residual adds happen after the sum on every member, so every member
holds the full hidden state after each block. Shares may be unequal (whole KV heads, each >= 1).

Process layout (one world, every backend). Ranks are numbered stage by stage, the members of
one group contiguous, the group's first member (the plan stage's `node`) first:

    stage 0 = ranks [0, k0), stage 1 = ranks [k0, k0 + k1), ...

Every rank except 0 takes its input activation from rank - 1: a stage's first member (its
leader) from the previous stage's last member (which holds the full output after the last
all-reduce), every other member from its predecessor in the group, which forwards what it got
before computing (a broadcast along the chain, k - 1 hops). Rank 0 embeds the tokens; the last
rank applies norm + head, samples greedily and sends the token id back to rank 0. So every
pipeline message goes to a ring neighbour, which is all MLX's ring backend can reach
(stage_worker's docstring).

The group all-reduce (`Collective`, chosen by `choose_collective`), by backend:
- ring backend (the default, and the only one on Linux here): `Group.split` raises ("[ring]
  Group split not supported"), so the sum is built from neighbour send/recv: partials are
  reduced along the chain to the group's last member (acc_i = acc_{i-1} + y_i), which sends the
  total back along the chain, 2 (k - 1) hops; every member ends with the same bits. Each recv
  first sleeps in select() on the ring's sockets: MLX's own ring `all_sum` spins while it waits,
  which on shared cores or under CPU quotas steals the computing ranks' time (measured with
  `profile-link collective`: 3 ranks on 2 cores, 4 KiB: all_sum 22.9 ms, chain 2.6 ms; 2 ranks:
  all_sum 0.3 ms, chain 0.7 ms). The job may force `"collective": "all_sum"` when the group is
  the whole world (a pure tensor plan);
- a backend with `Group.split` (MPI; jaccl, a full mesh): `all_sum` on the world when the group
  is the world, else on `world.split(stage)`; where split raises, the chain.

Plain Python data flows in from `run.py` as the job's `groups` (see `hybrid_layout`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from profiler.errors import UserError


class TensorPlanError(UserError):
    """A hybrid plan the runner cannot run (a node in two places)."""


# ----------------------------------------------------------------------------- layout (no MLX)


@dataclass(frozen=True)
class RankSpec:
    """One process of a hybrid run: its node, its layers, its group and share."""

    node: str
    start: int
    end: int
    group: int  # pipeline stage index
    pos: int  # index inside the group
    kv: tuple[int, int]  # KV heads [h0, h1) (all heads for a plain stage)
    cols: tuple[int, int]  # MLP columns [c0, c1)


def model_dims(config: dict[str, Any]) -> dict[str, int]:
    """n_kv_heads, q_per_kv and intermediate size of a llama-like config."""
    cfg = config.get("text_config", config) if "num_attention_heads" not in config else config
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    return {"n_kv_heads": kv, "q_per_kv": heads // kv,
            "intermediate_size": int(cfg["intermediate_size"]),
            "hidden_size": int(cfg["hidden_size"])}


def hybrid_layout(stages: list[Any], config: dict[str, Any]) -> list[RankSpec]:
    """World ranks of a plan's stages, stage by stage, group members contiguous.

    `stages`: graphsplit.plan.Stage (with its optional `tensor`, a TensorSpec). A plain stage is
    one rank holding every head and column. Shares that do not cut the model the run loads, or
    a node in two stages: one UserError line."""
    from graphsplit.plan import check_tensor

    dims = model_dims(config)
    out: list[RankSpec] = []
    for g, s in enumerate(stages):
        t = s.tensor
        if t is None:
            out.append(RankSpec(s.node, s.start_layer, s.end_layer, g, 0,
                                (0, dims["n_kv_heads"]), (0, dims["intermediate_size"])))
            continue
        # the plan's own check, against the model the run loads (it may not be the plan's)
        check_tensor(s, g, "the model given to the run", dims["n_kv_heads"],
                     dims["intermediate_size"])
        t = t.to_dict()
        h = c = 0
        for i, (node, k, m) in enumerate(zip(t["nodes"], t["kv_heads"], t["mlp_columns"])):
            out.append(RankSpec(node, s.start_layer, s.end_layer, g, i, (h, h + k), (c, c + m)))
            h, c = h + k, c + m
    seen = [r.node for r in out]
    dup = sorted({x for x in seen if seen.count(x) > 1})
    if dup:
        raise TensorPlanError(f"node {dup[0]} appears in two stages or twice in a group; a "
                              "node runs one rank: re-plan")
    return out


def job_groups(ranks: list[RankSpec]) -> list[dict[str, Any]]:
    """The job's `groups`: per pipeline stage, its world ranks and each rank's share."""
    groups: list[dict[str, Any]] = []
    for r, spec in enumerate(ranks):
        if spec.group == len(groups):
            groups.append({"ranks": [], "kv": [], "cols": []})
        g = groups[spec.group]
        g["ranks"].append(r)
        g["kv"].append(list(spec.kv))
        g["cols"].append(list(spec.cols))
    return groups


# --------------------------------------------------------------------------- collectives


class Collective:
    """The all-reduce (sum) of one tensor group; see the module docstring for which backend
    does what. mode: "chain" (neighbour send/recv), "all_sum" (mx.distributed.all_sum over
    `group`: the world, or a sub-group from `Group.split`). `seconds` collects every call's
    time (the result's breakdown)."""

    def __init__(self, world, ranks: list[int], rank: int, mode: str = "chain", group=None,
                 fds=None):
        self.world, self.ranks, self.rank = world, ranks, rank
        self.pos, self.k = ranks.index(rank), len(ranks)
        self.mode, self.group = mode, group if group is not None else world
        self.fds = fds or []
        self.seconds: list[float] = []
        self.kind = "none" if self.k == 1 else (
            "neighbour-chain" if mode == "chain" else
            "all_sum" if self.group is world else "split+all_sum")

    def __call__(self, y):
        if self.k == 1:
            return y
        mx.eval(y)
        t0 = time.perf_counter()
        if self.mode == "all_sum":
            y = mx.distributed.all_sum(y, group=self.group)
            mx.eval(y)
        else:
            y = self._chain(y)
        self.seconds.append(time.perf_counter() - t0)
        return y

    def _chain(self, y):
        from exo_bridge.runner.stage_worker import wait_readable

        g, r = self.world, self.rank
        if self.pos > 0:  # reduce toward the group's last member
            wait_readable(self.fds)
            y = mx.distributed.recv_like(y, r - 1, group=g) + y
            mx.eval(y)
        if self.pos < self.k - 1:
            mx.eval(mx.distributed.send(y, r + 1, group=g))
            wait_readable(self.fds)  # the total comes back from the last member
            y = mx.distributed.recv_like(y, r + 1, group=g)
            mx.eval(y)
        if self.pos > 0:
            mx.eval(mx.distributed.send(y, r - 1, group=g))
        return y


def choose_collective(world, job: dict[str, Any], gi: int, ranks: list[int], rank: int,
                      fds) -> Collective:
    """The group's all-reduce for this job. `job["collective"]`: "auto" (default), "chain" or
    "all_sum" (the group must be the whole world). auto: on the ring backend the chain (no
    `Group.split`; and its select()-wait does not spin, see docs/exo-bridge.md); elsewhere
    all_sum on the world when the group is the world, else on `world.split(stage)`, falling
    back to the chain where split raises. Every rank calls split in the same order."""
    want = job.get("collective", "auto")
    backend = job.get("backend", "ring")
    if world is None or len(ranks) == 1:
        return Collective(world, ranks, rank, "chain", fds=fds)
    whole = len(ranks) == world.size()
    if want == "all_sum":
        if not whole:
            raise ValueError("collective all_sum needs the group to be the whole world; use "
                             "auto or chain for a group inside a pipeline")
        return Collective(world, ranks, rank, "all_sum", fds=fds)
    if want == "chain" or backend == "ring":
        return Collective(world, ranks, rank, "chain", fds=fds)
    if whole:
        return Collective(world, ranks, rank, "all_sum", fds=fds)
    sub = split_or_none(world, gi, ranks.index(rank))
    return Collective(world, ranks, rank, "all_sum" if sub is not None else "chain", sub, fds)


def split_or_none(world, color: int, key: int):
    """`world.split(color, key)` where the backend has it (MPI, jaccl), None where it raises
    (ring: "[ring] Group split not supported"). Every rank calls it, in the same order."""
    try:
        return world.split(color, key)
    except Exception:  # noqa: BLE001 - the backend's own refusal, whatever its type
        return None


def bias_after_sum(part, whole):
    """Every member adds o_proj's / down_proj's bias once, after the all-reduce (as mlx's
    ShardedToAllLinear does), so the members hold the same hidden state. profiler.tpslice keeps
    the bias on the member whose columns start at 0 only, also with `reduce` (right for its
    partial-sum timing, wrong for a run: the other members would miss it); put it back here."""
    for new, old in ((part.self_attn.o_proj, whole.self_attn.o_proj),
                     (part.mlp.down_proj, whole.mlp.down_proj)):
        if "bias" in old and "bias" not in new:
            new.bias = old.bias
    return part


# ------------------------------------------------------------------------------ the stage


def make_tensor_stage(job: dict[str, Any], rank: int, size: int, group):
    """The Stage of `rank` in a hybrid job (`job["groups"]`); stage_worker's hook."""
    from exo_bridge.runner.stage_worker import Stage, load_stage, make_caches, ring_socket_fds

    class TensorStage(Stage):
        """One member of a (possibly one-rank) group in a hybrid pipeline."""

        def __init__(self):
            import os

            self.rank, self.size, self.group = rank, size, group
            self.start, self.end = job["stages"][rank]
            self.first, self.last = rank == 0, rank == size - 1
            self.protocol = job.get("protocol", "ring")
            if self.protocol != "ring":
                raise ValueError("hybrid plans run under the ring protocol only")
            gi = next(i for i, g in enumerate(job["groups"]) if rank in g["ranks"])
            g = job["groups"][gi]
            pos = g["ranks"].index(rank)
            self.tail = pos == len(g["ranks"]) - 1  # sends the stage's output on
            self.fds = ring_socket_fds() if (group is not None and os.name == "posix"
                                             and os.path.isdir("/proc/self/fd")) else []
            self.collective = choose_collective(group, job, gi, g["ranks"], rank, self.fds)
            self.keep_logits = bool(job.get("return_logits"))
            self.model, self.inner, self.layers = load_stage(job["model"], self.start,
                                                             self.end, self.first, self.last)
            if len(g["ranks"]) > 1:  # keep only this member's share of every block
                from profiler.tpslice import slice_block

                cfg = job["model"]["config"]
                self.layers = [bias_after_sum(slice_block(
                    lay, cfg, tuple(g["kv"][pos]), tuple(g["cols"][pos]), self.collective), lay)
                    for lay in self.layers]
                self.inner.layers[self.start:self.end] = self.layers  # the whole blocks go
                mx.eval([lay.parameters() for lay in self.layers])
            self.hidden, self.act_dtype, self.header_sent = None, None, False
            self.reset()

        def reset(self):
            self.caches = make_caches(self.model, self.layers, self.start, self.end)
            self.compute_s, self.wait_s, self.head_s, self.message_s = [], [], [], []
            self.collective.seconds = []
            self.logits: list[list[float]] = []

        def step(self, tokens, L):
            from mlx_lm.models.base import create_attention_mask

            t_in = time.perf_counter()
            if self.first:
                h = self.inner.embed_tokens(mx.array([tokens], dtype=mx.int32))
                mx.eval(h)
            else:
                h = self._recv_activation(L)
            if not self.tail:  # forward the input along the group before computing
                self._send_activation(h)
            t0 = time.perf_counter()
            mask = create_attention_mask(h, self.caches[0] if self.caches else None)
            for layer, c in zip(self.layers, self.caches):
                h = layer(h, mask, cache=c)
            tok = None
            if self.last:
                logits = head_logits(self.model, self.inner, h)[:, -1, :]
                tok = mx.argmax(logits, axis=-1).astype(mx.int32)
                mx.eval(tok, logits)
                if self.keep_logits:
                    self.logits.append(logits.astype(mx.float32).reshape(-1).tolist())
            else:
                mx.eval(h)
            self.compute_s.append(time.perf_counter() - t0)
            self.wait_s.append(t0 - t_in)
            if self.tail and not self.last:
                self._send_activation(h)
            elif self.last and self.size > 1:
                mx.eval(mx.distributed.send(tok, 0, group=self.group))
            if self.first:
                if self.size > 1:
                    from exo_bridge.runner.stage_worker import wait_readable

                    wait_readable(self.fds)
                    tok = mx.distributed.recv((1,), mx.int32, self.size - 1, group=self.group)
                    mx.eval(tok)
                return int(tok.item())
            return None

    from exo_bridge.runner.stage_worker import head_logits

    return TensorStage()


def tensor_result(stage) -> dict[str, Any]:
    """The extra fields a hybrid rank reports: its group's collective and its time."""
    c = stage.collective
    out = {"collective": c.kind, "group_ranks": c.ranks, "allreduce_s": list(c.seconds)}
    if stage.logits:
        out["logits"] = stage.logits
    return out


def is_hybrid(stages: list[Any]) -> bool:
    return any(getattr(s, "tensor", None) is not None for s in stages)
