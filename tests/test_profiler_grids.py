"""Batch and chunk grids, tensor-parallel shares: the slicing, the profiler's grids, the format."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from profiler import build, tpslice
from profiler.tiny import tiny_config


def _block(cfg, quant=None, seed=3):
    """Layer 0 of a model built from `cfg` with mlx-lm's own classes, random weights."""
    model_cls, _, _ = build.arch_classes(cfg)
    args = build.model_args(cfg)
    model = model_cls(args)
    block = model.layers[0]
    build.random_weights(block, mx.float32, seed)
    for lin in (block.self_attn, block.mlp):  # non-zero biases, so their placement is tested
        for k, m in lin.children().items():
            if isinstance(m, nn.Linear) and "bias" in m:
                m.bias = mx.random.normal(m.bias.shape, key=mx.random.key(seed + 7)) * 0.1
    if quant:
        build.quantize_module(block, quant["bits"], quant["group_size"])
    mx.eval(block.parameters())
    return block, args


def _tp_forward(parts, block, x, mask):
    """The block's output from its ranks, the all-reduces done by hand: a sum of partials."""
    n1 = block.input_layernorm(x)
    h = x + sum(p.self_attn(n1, mask, None) for p in parts)
    n2 = block.post_attention_layernorm(h)
    return h + sum(p.mlp(n2) for p in parts)


CASES = [
    # (config overrides, quantization, KV-head shares)
    (dict(model_type="llama"), None, [1, 3]),
    (dict(model_type="llama"), None, [2, 1, 1]),
    (dict(model_type="llama"), {"bits": 4, "group_size": 64}, [3, 1]),
    (dict(model_type="qwen2"), None, [1, 2, 1]),  # q/k/v biases, head_dim from hidden / heads
]


@pytest.mark.parametrize("over,quant,kv_shares", CASES)
def test_ranks_of_a_sliced_block_sum_to_the_whole_block(over, quant, kv_shares):
    cfg = tiny_config(n_layers=1, hidden=256, intermediate=512, heads=8, kv_heads=4, **over)
    if over["model_type"] == "llama":
        cfg.update(attention_bias=True, mlp_bias=True)  # o_proj / down_proj biases too
    block, args = _block(cfg, quant)
    gs = quant["group_size"] if quant else None
    ranges = tpslice.shares(4, 512, kv_shares, gs)
    parts = [tpslice.slice_block(block, args, kv, cols) for kv, cols in ranges]
    x = mx.random.normal((2, 5, 256), key=mx.random.key(1))
    mask = "causal"
    want = block(x, mask, None)
    got = _tp_forward(parts, block, x, mask)
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()
    for p, ((a, b), (c, d)) in zip(parts, ranges):
        assert type(p) is type(block) and type(p.self_attn) is type(block.self_attn)
        assert p.self_attn.n_kv_heads == b - a and p.self_attn.n_heads == 2 * (b - a)
        assert p.mlp.gate_proj.weight.shape[0] == d - c
    # the original block is untouched (still the whole block)
    assert block.self_attn.n_heads == 8 and mx.allclose(block(x, mask, None), want).item()


def test_sliced_block_decodes_with_its_own_share_of_the_kv_cache():
    """One rank with a KV cache: its cache holds its KV heads only, and a decode step of the
    ranks (prefill then one token, sums by hand) equals the whole block's."""
    from mlx_lm.models.cache import KVCache

    cfg = tiny_config(n_layers=1, hidden=256, intermediate=512, heads=8, kv_heads=4)
    block, args = _block(cfg)
    parts = [tpslice.slice_block(block, args, kv, c) for kv, c in tpslice.shares(4, 512, [1, 3])]
    x = mx.random.normal((1, 6, 256), key=mx.random.key(2))
    full_c, part_c = KVCache(), [KVCache() for _ in parts]

    def run(x, mask):
        n1 = block.input_layernorm(x)
        h = x + sum(p.self_attn(n1, mask, c) for p, c in zip(parts, part_c))
        return h + sum(p.mlp(block.post_attention_layernorm(h)) for p in parts)

    block(x[:, :5], "causal", full_c)
    run(x[:, :5], "causal")
    want = block(x[:, 5:], None, full_c)
    got = run(x[:, 5:], None)
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()
    assert [c.keys.shape[1] for c in part_c] == [1, 3] and full_c.keys.shape[1] == 4


def test_reduce_hook_reduces_the_partial_sums_then_adds_the_bias_once():
    """With `reduce`, o_proj / down_proj reduce their partial sums, then add the bias (as mlx's
    ShardedToAllLinear does around all_sum); the bias sits on the rank whose columns start at 0."""
    cfg = tiny_config(n_layers=1, hidden=256, intermediate=512, heads=8, kv_heads=4)
    cfg.update(attention_bias=True, mlp_bias=True)
    block, args = _block(cfg)
    ranges = tpslice.shares(4, 512, [2, 2])
    z = mx.random.normal((1, 3, 512), key=mx.random.key(5))
    bias = block.mlp.down_proj.bias
    plain = [tpslice.slice_block(block, args, kv, c) for kv, c in ranges]
    doubled = [tpslice.slice_block(block, args, kv, c, reduce=lambda y: 2 * y)
               for kv, c in ranges]
    outs = []
    for r, (p, q, (_, (c, d))) in enumerate(zip(plain, doubled, ranges)):
        y = p.mlp.down_proj(z[..., c:d])
        partial = y - bias if r == 0 else y
        want = 2 * partial + bias if r == 0 else 2 * partial
        assert mx.allclose(q.mlp.down_proj(z[..., c:d]), want, atol=1e-4).item()
        outs.append(y)
    assert mx.allclose(outs[0] + outs[1], block.mlp.down_proj(z), atol=1e-4).item()


@pytest.mark.parametrize("kv,cols,says", [
    ((0, 5), (0, 512), "kv_heads_range"), ((2, 2), (0, 512), "kv_heads_range"),
    ((0, 1), (0, 600), "mlp_cols_range"),
])
def test_slice_ranges_outside_the_block_are_refused(kv, cols, says):
    cfg = tiny_config(n_layers=1, hidden=256, intermediate=512, heads=8, kv_heads=4)
    block, args = _block(cfg)
    with pytest.raises(ValueError, match=says):
        tpslice.slice_block(block, args, kv, cols)


def test_quantized_columns_must_sit_on_group_boundaries():
    cfg = tiny_config(n_layers=1, hidden=256, intermediate=512, heads=8, kv_heads=4)
    block, args = _block(cfg, {"bits": 4, "group_size": 64})
    with pytest.raises(ValueError, match="group size 64"):
        tpslice.slice_block(block, args, (0, 1), (0, 100))
    assert tpslice.shares(4, 512, [1, 3], 64) == [((0, 1), (0, 128)), ((1, 4), (128, 512))]
    assert tpslice.mlp_columns(14336, 1, 8) == 1792 and tpslice.mlp_columns(100, 1, 3, 64) == 64
