"""One rank of a tensor-parallel transformer block, with any share of its KV heads and MLP columns.

    part = slice_block(block, args, kv_heads_range=(0, 2), mlp_cols_range=(0, 3584))
    y = part(x, mask, cache)          # this rank's share of the block, all-reduces left out
    part = slice_block(block, args, (2, 8), (3584, 14336),
                       reduce=lambda y: mx.distributed.all_sum(y, group=g))   # a real rank

The split is Megatron-LM's (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter
Language Models Using Model Parallelism", section 3), the one mlx-lm's `Model.shard()` applies with
`shard_linear(..., "all-to-sharded" / "sharded-to-all")` from mlx.nn.layers.distributed, but with
any share instead of equal ones and without a group:

* attention: q_proj, k_proj and v_proj keep the output rows of the rank's heads - KV heads
  [a, b) and their query heads [a * q_per_kv, b * q_per_kv) (whole KV-head groups, so grouped
  query attention stays within the rank); o_proj keeps the matching input columns and so
  produces a PARTIAL sum of the attention output;
* MLP: gate_proj and up_proj keep output rows [c, d) of the intermediate dimension, down_proj
  the matching input columns: again a partial sum.

The two partial sums are what the two all-reduces of a tensor-parallel block add up. With
`reduce=None` they are left as they are: the block then does exactly one rank's compute and
memory traffic, all-reduces excluded (what `profile-model --tp-shares` times), and its output
is not the model's; a bias of o_proj / down_proj is kept on the rank whose columns start at 0
only, so the sum of the partials holds it once. With `reduce` (e.g. an `mx.distributed.all_sum`
over the group) each partial sum is reduced where mlx-lm's ShardedToAllLinear reduces it
(right after the projection), then every rank adds the bias, and every rank holds the block's
output.

The result is a shallow copy of `block` of the same mlx-lm class: norms, rope and every other
member are shared with `block`, the sliced projections are new arrays (contiguous copies, so
`block`'s own weights can be freed and a column slice is not re-copied on every call).
Quantized projections (mlx QuantizedLinear) are sliced in their packed form: output rows
anywhere, input columns only at multiples of the group size.

Complexity: one copy of the rank's share of the projection weights.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx.nn as nn

ATTN_ROWS = ("q_proj", "k_proj", "v_proj")
MLP_ROWS = ("gate_proj", "up_proj")


class Reduced(nn.Module):
    """A projection whose (partial-sum) output goes through `reduce` before its bias is added,
    as mlx's ShardedToAllLinear does with `mx.distributed.all_sum`."""

    def __init__(self, linear: nn.Module, reduce, bias=None):
        super().__init__()
        self.linear = linear
        self._reduce = reduce
        if bias is not None:
            self.bias = bias

    def __call__(self, x: mx.array) -> mx.array:
        y = self._reduce(self.linear(x))
        return y + self.bias if "bias" in self else y


def heads(args) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, q_per_kv) of a model's args (a ModelArgs or a config dict)."""
    get = args.get if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))
    n = int(get("num_attention_heads"))
    kv = int(get("num_key_value_heads") or n)
    if kv <= 0 or n % kv:
        raise ValueError(f"{kv} key/value heads do not divide {n} attention heads")
    return n, kv, n // kv


def _check_range(name: str, r, limit: int) -> tuple[int, int]:
    a, b = (int(v) for v in r)
    if not 0 <= a < b <= limit:
        raise ValueError(f"{name} {tuple(r)} must satisfy 0 <= start < stop <= {limit}")
    return a, b


def _quantized(lin) -> bool:
    return "scales" in lin


def _own(a: mx.array) -> mx.array:
    return mx.contiguous(a)


def _rows(lin: nn.Module, a: int, b: int) -> nn.Module:
    """`lin` keeping output rows [a, b) (weight, scales, quantization biases, bias)."""
    out = copy.copy(lin)
    for k in ("weight", "scales", "biases", "bias"):
        if k in lin and lin[k] is not None:
            out[k] = _own(lin[k][a:b])
    return out


def _cols(lin: nn.Module, a: int, b: int, keep_bias: bool) -> nn.Module:
    """`lin` keeping input columns [a, b); its bias only when `keep_bias`."""
    out = copy.copy(lin)
    if _quantized(lin):
        g, bits = int(lin.group_size), int(lin.bits)
        if a % g or b % g:
            raise ValueError(f"quantized columns [{a}, {b}) must start and end at multiples of "
                             f"the group size {g}")
        out["weight"] = _own(lin["weight"][:, a * bits // 32: b * bits // 32])
        out["scales"] = _own(lin["scales"][:, a // g: b // g])
        if lin.get("biases") is not None:
            out["biases"] = _own(lin["biases"][:, a // g: b // g])
    else:
        out["weight"] = _own(lin["weight"][:, a:b])
    if "bias" in lin and not keep_bias:
        del out["bias"]
    return out


def _reduced(lin: nn.Module, reduce) -> nn.Module:
    if reduce is None:
        return lin
    bias = lin.get("bias")
    if bias is not None:
        lin = copy.copy(lin)
        del lin["bias"]
    return Reduced(lin, reduce, bias)


def slice_block(block: nn.Module, args, kv_heads_range: tuple[int, int],
                mlp_cols_range: tuple[int, int], reduce=None) -> nn.Module:
    """One tensor-parallel rank of `block` (an mlx-lm llama-style TransformerBlock:
    `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, plain or quantized Linear).

    `kv_heads_range` (a, b): the KV heads [a, b) this rank holds, with their query heads
    [a * q_per_kv, b * q_per_kv). `mlp_cols_range` (c, d): the intermediate columns [c, d).
    `args`: the model's args (ModelArgs or config dict; head counts are read from it).
    `reduce`: None (one rank's compute, all-reduces excluded) or a function applied to the
    attention's and the MLP's partial sums (e.g. `lambda y: mx.distributed.all_sum(y, group=g)`).

    Raises ValueError for ranges outside the block or quantized columns not on group
    boundaries. See the module docstring for the split and its reference."""
    attn, mlp = block.self_attn, block.mlp
    n, kv, qpk = heads(args)
    a, b = _check_range("kv_heads_range", kv_heads_range, kv)
    q_out = _out_dims(attn.q_proj)
    if q_out % n:
        raise ValueError(f"q_proj has {q_out} outputs, not a multiple of {n} heads")
    hd = q_out // n
    inter = _out_dims(mlp.gate_proj)
    c, d = _check_range("mlp_cols_range", mlp_cols_range, inter)

    new_attn = copy.copy(attn)
    new_attn.q_proj = _rows(attn.q_proj, a * qpk * hd, b * qpk * hd)
    new_attn.k_proj = _rows(attn.k_proj, a * hd, b * hd)
    new_attn.v_proj = _rows(attn.v_proj, a * hd, b * hd)
    # the bias of o_proj / down_proj: without reduce on the rank whose columns start at 0
    # (the partial sums add it once); with reduce on every rank, after the reduction
    new_attn.o_proj = _reduced(_cols(attn.o_proj, a * qpk * hd, b * qpk * hd,
                                     a == 0 or reduce is not None), reduce)
    new_attn.n_heads = (b - a) * qpk
    new_attn.n_kv_heads = b - a

    new_mlp = copy.copy(mlp)
    new_mlp.gate_proj = _rows(mlp.gate_proj, c, d)
    new_mlp.up_proj = _rows(mlp.up_proj, c, d)
    new_mlp.down_proj = _reduced(_cols(mlp.down_proj, c, d, c == 0 or reduce is not None),
                                 reduce)

    out = copy.copy(block)
    out.self_attn = new_attn
    out.mlp = new_mlp
    return out


def _out_dims(lin: nn.Module) -> int:
    return int(lin["weight"].shape[0])


def check_block(block: nn.Module) -> str | None:
    """None when `block` can be sliced by `slice_block`, else what it lacks (one phrase)."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if attn is None or mlp is None:
        return "no self_attn / mlp members"
    for owner, names in ((attn, ATTN_ROWS + ("o_proj",)), (mlp, MLP_ROWS + ("down_proj",))):
        for k in names:
            lin = getattr(owner, k, None)
            if not isinstance(lin, (nn.Linear, nn.QuantizedLinear)):
                return f"its {k} is not a Linear layer"
    if not all(hasattr(attn, k) for k in ("n_heads", "n_kv_heads")):
        return "its attention has no n_heads / n_kv_heads"
    return None


def shares(n_kv_heads: int, intermediate: int, kv_heads: list[int],
           group_size: int | None = None) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Contiguous ranges of consecutive ranks holding `kv_heads` KV heads each (summing to
    `n_kv_heads`): [((a, b), (c, d)), ...]. Rank r's MLP columns end at
    round(intermediate * (heads so far) / n_kv_heads), rounded to a multiple of `group_size`
    when given (quantized down_proj), so every rank holds round(intermediate * k / n) columns
    up to that rounding and the ranges tile [0, intermediate)."""
    if sum(kv_heads) != n_kv_heads or any(k < 1 for k in kv_heads):
        raise ValueError(f"shares {kv_heads} must be >= 1 each and sum to {n_kv_heads}")
    out, a, c = [], 0, 0
    for k in kv_heads:
        b = a + k
        d = mlp_columns(intermediate, b, n_kv_heads, group_size)
        out.append(((a, b), (c, d)))
        a, c = b, d
    return out


def mlp_columns(intermediate: int, k: int, n: int, group_size: int | None = None) -> int:
    """round(intermediate * k / n), to a multiple of `group_size` when given (never 0 for
    k >= 1, and `intermediate` itself at k == n)."""
    if k >= n:
        return intermediate
    v = round(intermediate * k / n)
    if group_size:
        v = max(group_size, round(v / group_size) * group_size)
    return min(v, intermediate)
