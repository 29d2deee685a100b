"""Shares of a tensor-parallel group, and what each runtime lets a plan do with them.

A rank's share is k whole KV heads (with their k x q_per_kv query heads) and the matching MLP
columns: round(intermediate_size x k / n), by largest remainder so the columns add up exactly
(mlx-lm's `shard_linear` cuts a weight into equal parts only; ours cuts at these boundaries).

Runtimes (read from their source):

* ``exo-legacy`` has no tensor parallelism at all: a shard is a layer range of one node
  (exo/inference/shard.py, e4238f9). A tensor stage is refused.
* ``exo-current`` runs tensor parallelism as ONE instance of TensorShardMetadata ranks, every
  rank all layers [0, n_layers), equal shares: its loader divides heads and KV heads by the
  group size (src/exo/worker/engines/mlx/auto_parallel.py, LlamaShardingStrategy) and its
  placement keeps only groups whose size divides hidden_size and num_key_value_heads
  (src/exo/master/placement.py place_instance). No mix with pipeline stages.
* ``mlx-pipeline`` (ours, `exo-bridge run`): tensor groups inside pipeline stages, unequal
  shares.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from graphsplit.plan import Stage, TensorSpec
from profiler.errors import UserError

TP_SHARES = ("any", "equal")


def compositions(n: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to write n as an ordered sum of `parts` positive integers (C(n-1, parts-1))."""
    if parts == 1:
        yield (n,)
        return
    for first in range(1, n - parts + 2):
        for rest in compositions(n - first, parts - 1):
            yield (first,) + rest


def share_vectors(n_kv: int, size: int, tp_shares: str = "any") -> list[tuple[int, ...]]:
    """The KV-head shares a group of `size` ranks may take: every composition, or with
    `tp_shares="equal"` the one equal split (none when `size` does not divide n_kv)."""
    if size > n_kv:
        return []
    if tp_shares == "equal":
        return [(n_kv // size,) * size] if n_kv % size == 0 else []
    return list(compositions(n_kv, size))


def mlp_columns(intermediate: int, kv_heads: Sequence[int]) -> tuple[int, ...]:
    """MLP columns per rank in proportion to its KV heads, summing to `intermediate` (floors,
    then the leftovers to the largest remainders, ties to the earlier rank)."""
    n = sum(kv_heads)
    raw = [intermediate * k / n for k in kv_heads]
    cols = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: -(raw[i] - cols[i]))[:intermediate - sum(cols)]:
        cols[i] += 1
    return tuple(cols)


def tensor_stage(nodes: Sequence[str], kv_heads: Sequence[int], start: int, end: int,
                 intermediate: int) -> Stage:
    """A stage over [start, end) run by the group `nodes` (the first one is the stage's node)."""
    return Stage(nodes[0], start, end,
                 TensorSpec(tuple(nodes), tuple(kv_heads), mlp_columns(intermediate, kv_heads)))


def equal_cut_problem(size: int, n_kv: int, hidden: int) -> str | None:
    """Why `size` equal ranks cannot cut this model (exo's rule), or None."""
    if size > n_kv:
        return f"{size} ranks but only {n_kv} KV heads"
    if n_kv % size:
        return f"{n_kv} KV heads do not divide by {size} ranks"
    if hidden % size:
        return f"hidden size {hidden} does not divide by {size} ranks"
    return None


def check_runtime_can_run(stages: Sequence[Stage], runtime: str, n_kv: int, hidden: int) -> None:
    """One UserError line when `runtime` cannot run a plan with these tensor stages: which
    stage, why (the runtime's source), and that `exo-bridge run` (mlx-pipeline) runs it."""
    tens = [(i, s) for i, s in enumerate(stages) if s.tensor is not None]
    if not tens:
        return
    i, s = tens[0]
    run = ("split for --runtime mlx-pipeline and run it with `exo-bridge run`, which runs "
           "tensor groups with unequal shares inside a pipeline")
    if runtime == "exo-legacy":
        raise UserError(f"stage {i} ({'+'.join(s.tensor.nodes)}) is tensor-parallel but legacy "
                        f"exo has no tensor parallelism (a shard is one node's layer range); "
                        f"{run}")
    if runtime != "exo-current":
        return
    if len(stages) > 1:
        raise UserError(f"stage {i} ({'+'.join(s.tensor.nodes)}) is tensor-parallel inside a "
                        "pipeline: current exo runs either one Tensor instance over all layers "
                        f"or a Pipeline instance, never both; {run}")
    if not s.tensor.equal:
        raise UserError(f"stage {i} has unequal shares {list(s.tensor.kv_heads)} KV heads: "
                        "current exo cuts every rank equally (heads // group size); re-split "
                        f"with --tp-shares equal, or {run}")
    why = equal_cut_problem(len(s.tensor.nodes), n_kv, hidden)
    if why:
        raise UserError(f"stage {i}: current exo cannot cut this model over "
                        f"{len(s.tensor.nodes)} nodes ({why}; exo's placement requires both "
                        f"to divide); use a group size that divides them, or {run}")
